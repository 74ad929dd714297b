"""Presence, frequency and repetition penalties: greedy tokens equal transformers' (its
``repetition_penalty``; presence and frequency as OpenAI defines them, applied to transformers' logits step by
step), also when the prompt's KV is reused from an earlier turn, under preemption and swap, across processes
and with async scheduling."""

from __future__ import annotations


import pytest
import torch

from fs_engine import LLM, LLMEngine, SamplingParams
from tests.conftest import random_prompts
from tests.integration.test_preemption import TIGHT, flip_priorities

NEW = 16


def reference(ref, prompt: list[int], new: int, presence: float = 0.0, frequency: float = 0.0,
              repetition: float = 1.0) -> list[int]:
    """Greedy tokens of transformers' model with the penalties applied to each step's logits by hand."""
    ids = list(prompt)
    counts: dict[int, int] = {}
    with torch.no_grad():
        for _ in range(new):
            x = torch.tensor([ids])
            logits = ref.model(x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
            if repetition != 1.0:
                seen = torch.tensor(sorted(set(ids)))
                values = logits[seen]
                logits[seen] = torch.where(values > 0, values / repetition, values * repetition)
            for token, n in counts.items():
                logits[token] -= frequency * n + presence
            token = int(logits.argmax())
            counts[token] = counts.get(token, 0) + 1
            ids.append(token)
    return ids[len(prompt):]


def test_repetition_penalty_matches_transformers_generate(tiny_model, hf_reference):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model, block_size=4)
    prompts = random_prompts(llm.engine.arch.vocab_size, [1, 7, 30], seed=9)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        ids = torch.tensor([prompt])
        expected = ref.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                      repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert out.token_ids == expected.tolist()


@pytest.mark.parametrize("presence,frequency,repetition", [(1.5, 0.0, 1.0), (0.0, 2.0, 1.0), (-1.0, 0.5, 1.3)])
def test_presence_and_frequency_penalties_match_their_definition(tiny_model_dirs, hf_reference, presence, frequency,
                                                                 repetition):
    model = tiny_model_dirs["llama"]
    ref = hf_reference(model)
    llm = LLM(model, block_size=4)
    prompts = random_prompts(llm.engine.arch.vocab_size, [3, 20], seed=4)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency, repetition_penalty=repetition)
    penalized, plain = llm.generate([prompts[0], prompts[0]], [params, SamplingParams(max_tokens=NEW, temperature=0,
                                                                                       ignore_eos=True)])
    assert penalized.token_ids == reference(ref, prompts[0], NEW, presence, frequency, repetition)
    assert penalized.token_ids != plain.token_ids  # (the penalties change something here)
    # batched with an unpenalized request, each row gets only its own penalties
    both = llm.generate(prompts, [params, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)])
    assert both[0].token_ids == penalized.token_ids
    assert both[1].token_ids == ref.greedy(prompts[1], NEW, stop_at_eos=False)


def test_the_repetition_penalty_covers_a_prompt_whose_kv_was_reused(tiny_model_dirs, hf_reference):
    """A second turn's history comes from the CPU store or the device, never through the worker's forward:
    its tokens are penalized all the same."""
    model = tiny_model_dirs["qwen3"]
    ref = hf_reference(model)
    llm = LLM(model, block_size=4)
    first = random_prompts(1000, [24], seed=6)[0]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    reply = llm.generate([first], params)[0].token_ids
    second = first + reply + [11, 12, 13]
    before = llm.stats()["reused_prefix_tokens"]
    out = llm.generate([second], params)[0].token_ids
    assert llm.stats()["reused_prefix_tokens"] > before
    assert out == reference(ref, second, NEW, repetition=1.8)


def test_penalties_survive_preemption_swap_processes_and_async_scheduling(tiny_model_dirs, hf_reference):
    model = tiny_model_dirs["qwen2"]
    ref = hf_reference(model)
    prompts = random_prompts(1000, [5, 40, 17, 60, 9, 33], seed=2)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, frequency_penalty=0.8,
                            repetition_penalty=1.2)
    engine = LLMEngine(model, multiprocess=True, async_scheduling=True, policy="priority", **TIGHT)
    try:
        outputs = flip_priorities(engine, prompts, params, seed=1)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats["num_swap_outs"] > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference(ref, prompt, NEW, frequency=0.8, repetition=1.2)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("repetition_penalty", 0), ("repetition_penalty", float("nan"))])
def test_a_penalty_out_of_range_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
