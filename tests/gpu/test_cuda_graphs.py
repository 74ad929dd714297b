"""CUDA-graph decode and the GPU attention backends end to end: replay equals eager bit for bit, and greedy
tokens are identical to the torch backend and to transformers (float32)."""

from __future__ import annotations

import pytest

from fs_engine import LLM, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def generate(model, prompts, **engine_args) -> list[list[int]]:
    llm = LLM(model, device="cuda", compile="off", dtype="float32", block_size=16, max_num_seqs=16, **engine_args)
    try:
        return [o.token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.engine.shutdown()


def test_triton_tokens_identical_to_the_torch_backend_and_transformers(tiny_model, hf_reference):
    # (flash-attn has no float32 path: its parity runs in fp16/bf16 in test_flash_attn_backend.py)
    prompts = random_prompts(512, [1, 7, 33, 120, 250], seed=5)
    reference = generate(tiny_model, prompts, attention_backend="torch", enforce_eager=True)
    assert generate(tiny_model, prompts, attention_backend="triton", enforce_eager=True) == reference
    assert generate(tiny_model, prompts, attention_backend="triton", enforce_eager=False) == reference
    ref = hf_reference(tiny_model)
    assert reference == [ref.greedy(p, GREEDY.max_tokens, stop_at_eos=False) for p in prompts]


def test_graph_replay_is_bit_identical_to_eager_on_the_padded_batch(tiny_model_dirs):
    import torch

    llm = LLM(tiny_model_dirs["llama"], device="cuda", compile="off", dtype="float32", block_size=16, max_num_seqs=24,
              attention_backend="triton")
    runner = llm.engine.executor.worker.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 16, 24]
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = runner.kv_arena.shape[0]
    runner.kv_arena.normal_(generator=gen)  # every block holds finite, distinct KV
    for n in (1, 3, 8, 13, 24):
        batch_size = next(b for b in graphs.batch_sizes if b >= n)
        seq_lens = torch.randint(1, graphs.max_blocks_per_seq * 16, (n,), device="cuda", compile="off", generator=gen)
        tables = torch.randint(0, num_blocks, (n, graphs.max_blocks_per_seq), device="cuda", compile="off", generator=gen)
        meta = graphs._meta(batch_size)
        token_ids = torch.randint(0, 512, (n,), device="cuda", compile="off", generator=gen)
        positions = (seq_lens - 1).long()
        slots = torch.randperm(num_blocks * 16, device="cuda", compile="off", generator=gen)[:n]
        step_meta = type(meta)(slots, torch.arange(n + 1, dtype=torch.int32, device="cuda"), seq_lens.int(),
                               tables.int(), [1] * n, seq_lens.tolist(), 1, int(seq_lens.max()))
        arena_before = runner.kv_arena.clone()
        replayed = graphs.run(token_ids, positions, step_meta).clone()
        runner.kv_arena.copy_(arena_before)
        with torch.inference_mode():
            eager = graphs._forward(batch_size)[:n]  # the same static inputs, the same backend, run eagerly
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
    llm.engine.shutdown()


def test_padded_rows_store_no_kv(tiny_model_dirs):

    llm = LLM(tiny_model_dirs["qwen3"], device="cuda", compile="off", dtype="float32", block_size=16, max_num_seqs=8,
              attention_backend="triton")
    runner = llm.engine.executor.worker.runner
    before = runner.kv_arena.clone()
    outs = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in outs)
    # 2 requests of <= 12 tokens: exactly their slots changed, none for the 2 padded rows of the 4-row graph
    changed = (runner.kv_arena != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert len(changed) <= 2
    llm.engine.shutdown()


def test_enforce_eager_and_non_graph_backends_capture_nothing(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen2"], device="cuda", compile="off", dtype="float32", attention_backend="torch")
    assert llm.engine.executor.worker.runner.graphs is None  # the reference backend is never captured
    llm.engine.shutdown()
    llm = LLM(tiny_model_dirs["qwen2"], device="cuda", compile="off", dtype="float32", attention_backend="triton", enforce_eager=True)
    assert llm.engine.executor.worker.runner.graphs is None
    llm.engine.shutdown()


def test_llama3_8b_shapes_bf16_swap_preemption_and_reuse(tmp_path):
    """A Llama-3-8B-shaped model with random weights, bf16, Triton + CUDA graphs: priorities flip under tight KV
    memory, so requests swap out and in, and later turns reuse earlier turns' KV."""
    import subprocess
    import sys
    from pathlib import Path

    from fs_engine.engine.multiturn import run_conversations

    model_dir = tmp_path / "l8b"
    tool = Path(__file__).resolve().parents[2] / "tools" / "make_shapes_config.py"
    subprocess.run([sys.executable, str(tool), "--shape", "llama3-8b", "--out", str(model_dir)], check=True)
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", device="cuda", compile="off", policy="priority",
              num_gpu_blocks=160, max_num_seqs=16, preemption_cooldown_steps=1)
    engine = llm.engine
    rng = __import__("random").Random(0)
    messages = [[[rng.randrange(1000, 100000) for _ in range(rng.randint(200, 500))] for _ in range(3)]
                for _ in range(6)]

    def flip(e, step):
        if step % 4 == 0:
            for rid in list(e.scheduler.requests):
                e.update_priority(rid, rng.randrange(4))

    replies = run_conversations(engine, messages, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
                                think_steps=2, on_step=flip)
    stats = engine.stats()
    assert all(len(turn.token_ids) == 64 for conv in replies for turn in conv)
    assert stats["num_swap_outs"] > 0 and stats["num_swap_ins"] > 0 and stats["reused_prefix_tokens"] > 0
    llm.engine.shutdown()
