"""The engine with the Triton attention backend, on CPU through Triton's interpreter (on CUDA, compiled):
greedy tokens identical to the torch reference backend, through prefill, chunked prefill, decode and
swap preemption."""

from __future__ import annotations

import pytest

from fs_engine import LLM, SamplingParams
from tests.conftest import random_prompts

pytest.importorskip("triton")

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def generate(model, prompts, **engine_args) -> tuple[list[list[int]], dict]:
    llm = LLM(model, dtype="float32", block_size=8, **engine_args)
    try:
        return [o.token_ids for o in llm.generate(prompts, GREEDY)], llm.stats()
    finally:
        llm.engine.shutdown()


def test_triton_backend_tokens_identical_to_the_torch_backend(tiny_model):
    prompts = random_prompts(256, [1, 9, 30], seed=3)
    # a 16-token budget splits the 30-token prompt into chunks over a cached prefix, next to decodes
    expected, _ = generate(tiny_model, prompts, attention_backend="torch", max_num_batched_tokens=16)
    got, _ = generate(tiny_model, prompts, attention_backend="triton", max_num_batched_tokens=16)
    assert got == expected


def test_triton_backend_under_swap_preemption(tiny_model_dirs):
    model = tiny_model_dirs["qwen3"]
    prompts = random_prompts(256, [20, 20, 20], seed=4)
    expected, _ = generate(model, prompts, attention_backend="torch")
    # 3 requests of 26 tokens need 12 blocks of 8; 9 blocks force swap preemption
    got, stats = generate(model, prompts, attention_backend="triton", num_gpu_blocks=9, preemption_cooldown_steps=0)
    assert got == expected
    assert stats["num_swap_outs"] > 0


def test_a_backend_that_cannot_run_here_is_a_clear_error(tiny_model_dirs):
    with pytest.raises(ValueError, match="flash_attn.*cannot run here.*CUDA"):
        LLM(tiny_model_dirs["qwen3"], attention_backend="flash_attn")
    llm = LLM(tiny_model_dirs["qwen3"], attention_backend="auto")
    assert llm.engine.executor.worker.runner.attn.name == "torch"  # auto on CPU: the reference backend
    llm.engine.shutdown()
