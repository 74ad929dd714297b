"""The engine on a CUDA device: float32 output token-identical to the transformers oracle on CPU."""

from __future__ import annotations

import pytest

from fs_engine import LLM, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.gpu


def test_cuda_float32_matches_transformers(tiny_model, hf_reference):
    ref = hf_reference(tiny_model)
    llm = LLM(tiny_model, device="cuda", compile="off", dtype="float32", block_size=8, max_num_batched_tokens=64)
    prompts = random_prompts(llm.engine.arch.vocab_size, [1, 17, 64, 200], seed=2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref.greedy(prompt, 32, stop_at_eos=False)


def test_cuda_sizes_kv_from_free_memory(tiny_model_dirs):
    import torch

    llm = LLM(tiny_model_dirs["qwen3"], device="cuda", compile="off", gpu_memory_utilization=0.5, max_num_seqs=4)
    free, total = torch.cuda.mem_get_info()
    assert llm.stats()["num_gpu_blocks"] >= 1
    assert total - free <= 0.5 * total + (1 << 30)  # within the budget (plus CUDA context slack)


@pytest.mark.parametrize("multiprocess", [False, True])
def test_a_swap_out_right_after_a_chunk_that_samples_nothing_reads_finished_kv(tiny_model, hf_reference,
                                                                              multiprocess):
    # safety rule 1: the chunk's kernels may still be queued when its (tokenless) result arrives; the copy
    # that swaps its blocks out next must not overtake them (see tests/integration/test_copy_ordering.py)
    from fs_engine import LLMEngine
    from tests.integration.test_copy_ordering import ENGINE_ARGS, GREEDY, racy_schedule

    engine = LLMEngine(tiny_model, multiprocess=multiprocess, device="cuda", compile="off", dtype="float32", **ENGINE_ARGS)
    try:
        outputs = racy_schedule(engine)
        long_prompt, short_prompt = random_prompts(engine.arch.vocab_size, [40, 6], seed=11)
    finally:
        engine.shutdown()
    ref = hf_reference(tiny_model)
    assert outputs["long"] == ref.greedy(long_prompt, GREEDY.max_tokens, stop_at_eos=False)
    assert outputs["short"] == ref.greedy(short_prompt, GREEDY.max_tokens, stop_at_eos=False)
