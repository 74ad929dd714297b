"""``compile=on``: the model's forward under torch.compile (Inductor) with attention as a custom op.

Greedy tokens must be those of the eager engine and of transformers, for every tiny architecture, also under
preemption, swap, reuse and chunked prefill; one compilation (at start-up) serves every step. Inductor's
first compilation takes seconds on this CPU, so each architecture compiles once here; later engines of the
same model hit Inductor's FX-graph cache.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fs_engine import LLM
from tests.conftest import ARCHS, random_prompts
from tests.integration.test_preemption import GREEDY, MAX_TOKENS, TIGHT, run_with_priority_flips

PROMPT_LENGTHS = [1, 5, 37, 18, 60, 9]


def runner_of(engine):
    return engine.executor.worker.runner


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(1000, PROMPT_LENGTHS, seed=7)


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tiny_model_dirs):
    return request.param, tiny_model_dirs[request.param]


@pytest.fixture(scope="module")
def eager_outputs(arch_model, prompts):
    llm = LLM(arch_model[1], block_size=4, compile="off")
    assert runner_of(llm.engine).compiled is None
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def test_compiled_greedy_matches_eager_and_transformers(arch_model, prompts, eager_outputs, hf_reference):
    arch, model = arch_model
    llm = LLM(model, block_size=4, compile="on")
    runner = runner_of(llm.engine)
    assert runner.compiled is not None and runner.forward is runner.compiled
    assert runner.forward_summary().startswith("compiled (1 graph")
    compiled = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    hf = hf_reference(model)
    assert compiled == eager_outputs
    assert compiled == [hf.greedy(p, MAX_TOKENS, stop_at_eos=False) for p in prompts]
    assert runner.num_compilations == 1, f"{arch}: recompiled after warm-up"


def test_compiled_logits_differ_from_eager_only_in_the_last_bits(arch_model, prompts):
    """The same step through the eager and the compiled forward: Inductor fuses the norms' reductions, so the
    logits may round differently, by float32 ulps, never by enough to move an argmax here."""
    from workers.compilation import forward_context

    llm = LLM(arch_model[1], block_size=4, compile="on", num_gpu_blocks=64)
    runner = runner_of(llm.engine)
    from ipc.messages import ScheduledChunk, StepPlan
    from workers.input_batch import InputBatch

    chunks, table = [], 0
    for i, p in enumerate(prompts):
        blocks = list(range(table, table + -(-len(p) // 4)))
        table += len(blocks)
        chunks.append(ScheduledChunk(f"p{i}", p, 0, blocks, sample=True))
    inputs = InputBatch(4, 16, runner.device, num_rows=len(chunks)).prepare(StepPlan(0, chunks))
    with torch.inference_mode():
        logits = {}
        for name, forward in (("eager", runner.model), ("compiled", runner.compiled)):
            with forward_context(runner.attn, inputs.meta):
                hidden = forward(inputs.token_ids, inputs.positions)
            logits[name] = runner.model.compute_logits(hidden[inputs.sample_rows])
    diff = (logits["eager"] - logits["compiled"]).abs().max().item()
    assert diff < 1e-3 * logits["eager"].abs().max().item(), diff
    assert torch.equal(logits["eager"].argmax(-1), logits["compiled"].argmax(-1))


def test_compiled_under_preemption_swap_reuse_and_chunking_never_recompiles(arch_model, prompts, eager_outputs):
    """Priority flips preempt and swap constantly, finished requests' KV is reused, a 16-token budget chunks
    the longer prompts, and batches take every size: the warm-up's one compilation serves all of it."""
    outs, stats = run_with_priority_flips(arch_model[1], prompts, compile="on", preemption_mode="swap",
                                          max_num_batched_tokens=16, **TIGHT)
    assert outs == eager_outputs
    assert stats["num_swap_outs"] >= 3 and stats["num_swap_ins"] >= 3
    assert stats["num_compilations"] == 1


def test_a_model_that_cannot_compile_falls_back_or_fails_clearly(tiny_model_dirs, monkeypatch, caplog):
    from workers.compilation import CompiledForward

    def broken(self, gm, example_inputs):
        raise RuntimeError("inductor is broken here\nsecond line")

    llm = LLM(tiny_model_dirs["qwen3"], block_size=4, compile="off")
    runner = runner_of(llm.engine)
    monkeypatch.setattr(CompiledForward, "_inductor", broken)
    torch._dynamo.reset()  # (the model's earlier compilations are cached per code object)
    with caplog.at_level(logging.WARNING, logger="workers.model_runner"):
        runner._compile(required=False)
    assert runner.compiled is None and runner.forward is runner.model
    assert "compile=auto: running the model eagerly, compilation failed" in caplog.text
    assert "inductor is broken here" in runner.forward_summary() and "second line" not in runner.forward_summary()
    assert [o.token_ids for o in llm.generate([[1, 2, 3]], GREEDY)][0]  # still serving, eagerly
    with pytest.raises(RuntimeError, match="compile=on: the model cannot be compiled .*inductor is broken here"):
        runner._compile(required=True)
    torch._dynamo.reset()


def test_unknown_compile_mode_is_rejected(tiny_model_dirs):
    with pytest.raises(ValueError, match="compile"):
        LLM(tiny_model_dirs["qwen3"], compile="sometimes")
