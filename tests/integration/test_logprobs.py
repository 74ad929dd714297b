"""``SamplingParams.logprobs``: every output token's log-probability and the top alternatives, equal to
transformers' log-softmax of the same logits, also under preemption and swap, across processes and with
async scheduling."""

from __future__ import annotations


import pytest
import torch

from fs_engine import LLM, LLMEngine, SamplingParams
from tests.conftest import random_prompts
from tests.integration.test_preemption import TIGHT, flip_priorities

TOP = 3
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=TOP)


def hf_logprobs(ref, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab]: transformers' log-probabilities of each output position, in one forward."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = ref.model(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) - 1 + len(output)]


def assert_matches_transformers(ref, prompt, token_ids, logprobs, top: int = TOP) -> None:
    expected = hf_logprobs(ref, prompt, token_ids)
    assert logprobs is not None and len(logprobs) == len(token_ids)
    for step, (token, entry) in enumerate(zip(token_ids, logprobs)):
        row = expected[step]
        assert token in entry
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        assert len(entry) in (top, top + 1)  # the sampled token, and the top ones (which may include it)
        for t, value in entry.items():
            assert value == pytest.approx(row[t].item(), abs=1e-4)
        # the top ones are the most likely tokens (ties at the boundary aside: values are compared, not ids)
        best = sorted(entry.values(), reverse=True)[:top]
        assert best == pytest.approx(row.topk(top).values.tolist(), abs=1e-4)


def test_logprobs_match_transformers(tiny_model, hf_reference):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model, block_size=4)
    prompts = random_prompts(llm.engine.arch.vocab_size, [1, 9, 33], seed=3)
    for prompt, out in zip(prompts, llm.generate(prompts, PARAMS)):
        assert out.token_ids == ref.greedy(prompt, 12, stop_at_eos=False)
        assert_matches_transformers(ref, prompt, out.token_ids, out.logprobs)


def test_logprobs_are_the_models_distribution_whatever_the_sampling(tiny_model_dirs, hf_reference):
    """Sampled with temperature, top-k and top-p, a token's logprob is still that of the unmodified logits
    (as OpenAI's and vLLM's default); logprobs=0 gives the sampled token's alone; None gives none."""
    model = tiny_model_dirs["qwen2"]
    ref = hf_reference(model)
    llm = LLM(model, block_size=4)
    prompt = random_prompts(llm.engine.arch.vocab_size, [12], seed=5)[0]
    sampled = SamplingParams(max_tokens=8, temperature=1.7, top_k=5, top_p=0.9, seed=1, ignore_eos=True, logprobs=0)
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with_lp, without = llm.generate([prompt, prompt], [sampled, plain])
    assert [list(e) for e in with_lp.logprobs] == [[t] for t in with_lp.token_ids]
    expected = hf_logprobs(ref, prompt, with_lp.token_ids)
    for step, (token, entry) in enumerate(zip(with_lp.token_ids, with_lp.logprobs)):
        assert entry[token] == pytest.approx(expected[step, token].item(), abs=1e-4)
    assert without.logprobs is None


def test_logprobs_survive_preemption_swap_processes_and_async_scheduling(tiny_model_dirs, hf_reference):
    """Priority flips preempt and swap requests mid-generation, in a multi-process engine that plans the next
    step before the last one's tokens are back: every token's logprobs are still its own."""
    model = tiny_model_dirs["qwen3"]
    ref = hf_reference(model)
    prompts = random_prompts(1000, [5, 40, 17, 60, 9, 33], seed=2)
    engine = LLMEngine(model, multiprocess=True, async_scheduling=True, policy="priority", **TIGHT)
    try:
        outputs = flip_priorities(engine, prompts, PARAMS)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats["num_swap_outs"] > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == ref.greedy(prompt, 12, stop_at_eos=False)
        assert_matches_transformers(ref, prompt, out.token_ids, out.logprobs)


def test_a_simulated_device_reports_its_fake_tokens_as_certain(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], device="sim:h100")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5))[0]
    assert out.logprobs == [{t: 0.0} for t in out.token_ids]


@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_a_bad_logprobs_value_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=value)
