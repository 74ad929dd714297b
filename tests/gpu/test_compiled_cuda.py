"""``compile=on`` on CUDA: the Inductor-compiled forward, eagerly and captured in CUDA graphs, gives the eager
engine's greedy tokens (float32, Triton attention as the custom op), and one compilation serves every step."""

from __future__ import annotations

import pytest

from fs_engine import LLM, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def generate(model, prompts, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, device="cuda", dtype="float32", block_size=16, max_num_seqs=16, attention_backend="triton",
              **engine_args)
    return [o.token_ids for o in llm.generate(prompts, GREEDY)], llm


def test_compiled_and_compiled_graphs_match_eager_and_compile_once(tiny_model_dirs, hf_reference):
    model = tiny_model_dirs["qwen3"]
    prompts = random_prompts(512, [1, 7, 33, 120, 250], seed=5)
    eager, llm = generate(model, prompts, compile="off", enforce_eager=True)
    llm.engine.shutdown()
    for enforce_eager in (True, False):
        compiled, llm = generate(model, prompts, compile="on", enforce_eager=enforce_eager)
        runner = llm.engine.executor.worker.runner
        try:
            assert runner.compiled is not None and (runner.graphs is None) == enforce_eager
            assert compiled == eager, f"enforce_eager={enforce_eager}"
            assert llm.engine.stats()["num_compilations"] == 1
        finally:
            llm.engine.shutdown()
    ref = hf_reference(model)
    assert eager == [ref.greedy(p, 24, stop_at_eos=False) for p in prompts]


def test_compile_auto_is_on_for_cuda(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], device="cuda", dtype="float32", max_num_seqs=4)
    try:
        assert llm.engine.executor.forward.startswith("compiled (1 graph")
    finally:
        llm.engine.shutdown()
