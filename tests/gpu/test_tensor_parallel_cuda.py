"""Tensor parallelism on CUDA (NCCL, one GPU per rank, CUDA graphs over the collectives): float32 tokens
equal one rank's, under swap preemption. Needs at least two GPUs."""

from __future__ import annotations

import pytest

from fs_engine import LLMEngine
from tests.integration.test_tensor_parallel import ARGS, PROMPTS, generate

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _two_gpus():
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.mark.parametrize("enforce_eager,compile", [(True, "off"), (False, "off"), (False, "on")])
def test_two_gpus_give_one_gpus_tokens_under_swaps(tiny_model_dirs, enforce_eager, compile):
    """Eager, CUDA graphs over the collectives, and graphs over the compiled forward (all-reduce in the graph)."""
    model = tiny_model_dirs["qwen3"]
    cuda = {"device": "cuda", "dtype": "float32", "enforce_eager": enforce_eager, **ARGS}
    expected = generate(LLMEngine(model, compile="off", **cuda), PROMPTS)
    engine = LLMEngine(model, multiprocess=True, tensor_parallel_size=2, compile=compile, **cuda)
    try:
        assert generate(engine, PROMPTS) == expected
        stats = engine.stats()
        assert stats["num_swap_outs"] > 0
        assert stats.get("num_compilations", 0) == (1 if compile == "on" else 0)
    finally:
        engine.shutdown()
