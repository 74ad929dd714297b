"""The correctness oracle: greedy output token-identical to Hugging Face transformers (float32, CPU)."""

from __future__ import annotations

import pytest

from fs_engine import LLM, SamplingParams
from tests.conftest import random_prompts

# 1 to 230 tokens: single-token prompts, exact block multiples, and prompts spanning many blocks
PROMPT_LENGTHS = [1, 2, 7, 16, 17, 33, 64, 129, 230]
MAX_TOKENS = 48

ENGINE_SHAPES = {
    # the defaults: whole prompts prefilled in one step
    "default": {},
    # 4-token blocks and a 37-token step budget: prompts prefilled in chunks over an already-cached
    # prefix, prefill and decode mixed in one step, generations crossing a dozen block boundaries
    "chunked": {"block_size": 4, "max_num_batched_tokens": 37},
}


def _prompts(vocab_size: int) -> list[list[int]]:
    return random_prompts(vocab_size, PROMPT_LENGTHS, seed=1)


@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_greedy_batch_matches_transformers(tiny_model, hf_reference, shape):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model, **ENGINE_SHAPES[shape])
    prompts = _prompts(llm.engine.arch.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outs):
        expected = ref.greedy(prompt, MAX_TOKENS)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert llm.stats()["num_free_gpu_blocks"] == llm.stats()["num_gpu_blocks"]


def test_ignore_eos_matches_transformers_without_eos(tiny_model, hf_reference):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model)
    prompts = random_prompts(llm.engine.arch.vocab_size, [3, 40, 90], seed=7)
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref.greedy(prompt, 64, stop_at_eos=False)
        assert out.finish_reason == "length" and len(out.token_ids) == 64


def test_text_prompts_tokenize_and_decode_like_transformers(tiny_model, hf_reference):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model)
    tok = llm.tokenizer
    texts = ["Hello, world!", "Ünïcödé and emoji 🚀 in one prompt", "def f(x):\n    return x * 2\n"]
    outs = llm.generate(texts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for text, out in zip(texts, outs):
        assert out.prompt == text
        assert out.prompt_token_ids == tok(text).input_ids
        assert out.token_ids == ref.greedy(out.prompt_token_ids, 24, stop_at_eos=False)
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_recompute_preemption_keeps_tokens_identical(tiny_model_dirs, hf_reference):
    """With too few KV blocks for the batch, requests are preempted and recomputed; tokens do not change."""
    model = tiny_model_dirs["qwen3"]
    ref = hf_reference(model)
    llm = LLM(model, block_size=4, num_gpu_blocks=40)
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 30, 60, 12, 44, 21], seed=3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert llm.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref.greedy(prompt, 40, stop_at_eos=False)
    assert llm.stats()["num_free_gpu_blocks"] == 40


def test_sharded_checkpoint_generates_the_same(tmp_path, tiny_model_dirs):
    from fs_engine.tiny_model import make_tiny_model

    sharded = make_tiny_model("llama", tmp_path / "sharded", seed=0, num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    prompts = random_prompts(512, [10, 50], seed=5)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    single = LLM(tiny_model_dirs["llama"]).generate(prompts, params)
    split = LLM(sharded).generate(prompts, params)
    assert [o.token_ids for o in single] == [o.token_ids for o in split]
