"""The flash_attn backend on a CUDA device against the torch backend (float32, same inputs): decode, prefill over a
cached prefix, mixed steps, GQA and MHA, float16 and bfloat16, scattered and contiguous block tables, blocks of
256 tokens; K/V stored at their slots; no host syncs; CUDA-graph replay of padded decode batches."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_flash_attn_unavailable import Dims, build_step, reference
from workers.attention.backend import AttentionMetadata
from workers.attention.flash_attn_backend import FlashAttnBackend, flash_attn_unavailable, kvcache_syncs_host

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or flash_attn_unavailable("cuda", 256, torch.bfloat16) is not None,
                       reason=f"needs CUDA and flash-attn: {flash_attn_unavailable('cuda', 256, torch.bfloat16)}"),
]

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # against float32, inputs rounded alike
STEPS = {  # (cached, query)
    "decode": ([0, 254, 255, 256, 600, 1100], [1, 1, 1, 1, 1, 1]),
    "prefill": ([0, 0], [300, 17]),
    "prefill with cached prefix": ([0, 256, 100, 513], [17, 256, 1, 300]),
    "mixed": ([500, 0, 37, 255, 1023], [1, 40, 1, 1, 1]),
}
SHAPES = {"gqa": Dims(num_blocks=32, heads=8, kv_heads=2, head_dim=128),
          "mha": Dims(num_blocks=32, heads=4, kv_heads=4, head_dim=64)}


def run(case: str, shape: str, dtype: torch.dtype, placement: str, decode_kernel: str, layer: int = 1, seed: int = 0):
    dims = SHAPES[shape]
    cached, query = STEPS[case]
    step = build_step(dims, cached, query, layer=layer, seed=seed, placement=placement, dtype=dtype, device="cuda",
                      extra_width=2)
    expected, expected_arena = reference(step, dims, layer)
    backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim, decode_kernel=decode_kernel)
    out = backend.forward(layer, step.q, step.k, step.v, step.meta)
    return step, out, expected, expected_arena


@pytest.mark.parametrize("case", sorted(STEPS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("placement", ["scattered", "contiguous"])
@pytest.mark.parametrize("decode_kernel", ["kvcache", "varlen"])
def test_matches_the_torch_backend(case, shape, dtype, placement, decode_kernel):
    step, out, expected, expected_arena = run(case, shape, dtype, placement, decode_kernel, seed=len(case))
    assert out.shape == expected.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # new K/V land at their slots, bit for bit, and nothing else in the arena (the other layer included) changes
    assert torch.equal(step.arena.float(), expected_arena)


def test_auto_decode_kernel_reads_nothing_back_to_the_host():
    """The kernel chosen by default must never sync the host: a sync per layer stalls eager decode and cannot be
    captured in a CUDA graph (flash-attn releases after 2.8.3.post1 sync inside paged flash_attn_with_kvcache)."""
    for case in ("decode", "mixed"):
        dims = SHAPES["gqa"]
        step = build_step(dims, *STEPS[case], dtype=torch.bfloat16, device="cuda")
        backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim)
        print(f"flash-attn {backend.flash.version}: decode kernel {backend.decode_kernel}")
        backend.forward(0, step.q, step.k, step.v, step.meta)  # first-call setup outside the check
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.forward(0, step.q, step.k, step.v, step.meta)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    if backend.decode_kernel == "kvcache":
        assert not kvcache_syncs_host(backend.flash, step.arena.device)


def _pad(meta: AttentionMetadata, batch_size: int, width: int, block_size: int) -> AttentionMetadata:
    """The metadata DecodeGraphs hands a graph: rows past the real ones have slot -1, length 1, block 0."""
    n, pad = meta.num_seqs, batch_size - meta.num_seqs
    tables = torch.zeros(batch_size, width, dtype=torch.int32, device="cuda")
    tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
    return AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((pad,), -1, dtype=torch.int64, device="cuda")]),
        query_start_loc=torch.arange(batch_size + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.cat([meta.seq_lens, torch.ones(pad, dtype=torch.int32, device="cuda")]),
        block_tables=tables, query_lens_host=[1] * batch_size, seq_lens_host=[width * block_size] * batch_size,
        max_query_len=1, max_seq_len=width * block_size,
    )


@pytest.mark.parametrize("decode_kernel", ["kvcache", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_graph_replay_of_a_padded_decode_batch(decode_kernel, dtype):
    dims = SHAPES["gqa"]
    probe = build_step(dims, [0], [1], dtype=dtype, device="cuda")
    base = FlashAttnBackend(probe.arena, dims.heads, dims.kv_heads, dims.head_dim, decode_kernel=decode_kernel)
    if decode_kernel == "kvcache" and kvcache_syncs_host(base.flash, probe.arena.device):
        pytest.skip(f"flash-attn {base.flash.version} syncs the host in paged flash_attn_with_kvcache: "
                    f"auto decodes with varlen")
    batch_size, width, layer = 8, 6, 1  # 5 real rows padded to 8; tables 6 blocks wide (1536 tokens)
    steps = [build_step(dims, cached, [1] * 5, layer=layer, seed=seed, dtype=dtype, device="cuda")
             for seed, cached in enumerate([[3, 255, 256, 700, 1200], [900, 0, 511, 1, 1400]])]
    # one arena for the graph: copy each step's arena (prefixes, garbage) into it before its replay
    arena = torch.empty_like(steps[0].arena)
    graph_backend = FlashAttnBackend(arena, dims.heads, dims.kv_heads, dims.head_dim,
                                     decode_kernel=decode_kernel).for_cuda_graph(batch_size, width * dims.block_size)
    static = _pad(steps[0].meta, batch_size, width, dims.block_size)
    static_q = torch.zeros(batch_size, dims.heads, dims.head_dim, dtype=dtype, device="cuda")
    static_k = torch.zeros(batch_size, dims.kv_heads, dims.head_dim, dtype=dtype, device="cuda")
    static_v = torch.zeros_like(static_k)

    def load(step):
        arena.copy_(step.arena)
        padded = _pad(step.meta, batch_size, width, dims.block_size)
        for dst, src in ((static.slot_mapping, padded.slot_mapping), (static.seq_lens, padded.seq_lens),
                         (static.block_tables, padded.block_tables)):
            dst.copy_(src)
        for dst, src in ((static_q, step.q), (static_k, step.k), (static_v, step.v)):
            dst[:5].copy_(src)
            dst[5:].normal_()

    load(steps[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch recommends before capture
        graph_backend.forward(layer, static_q, static_k, static_v, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    load(steps[0])
    with torch.cuda.graph(graph):
        static_out = graph_backend.forward(layer, static_q, static_k, static_v, static)
    for step in steps:
        load(step)
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_arena = reference(step, dims, layer)
        torch.testing.assert_close(static_out[:5].float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        assert torch.equal(arena.float(), expected_arena)  # padding rows stored nothing


@pytest.mark.parametrize(("block_size", "dtype", "match"), [
    (16, torch.bfloat16, "block_size=256"), (256, torch.float32, "float16 or bfloat16"),
])
def test_unsupported_settings_fail_at_construction(block_size, dtype, match):
    arena = torch.zeros(2, 1, 2, block_size, 2, 64, dtype=dtype, device="cuda")
    with pytest.raises(ValueError, match=match):
        FlashAttnBackend(arena, 4, 2, 64)


def test_engine_generates_with_flash_attn(tiny_model_dirs):
    from workers.attention import BACKENDS

    if "flash_attn" not in BACKENDS:
        pytest.skip("flash_attn is not registered in workers.attention.BACKENDS yet")
    from fs_engine import LLM, SamplingParams
    from tests.conftest import random_prompts

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(tiny_model_dirs["qwen3"], device="cuda", compile="off", dtype="bfloat16", attention_backend="flash_attn",
                  block_size=256, enforce_eager=eager, max_num_batched_tokens=512)
        prompts = random_prompts(llm.engine.arch.vocab_size, [1, 17, 300, 700], seed=5)
        outs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
        llm.engine.shutdown()
    assert all(len(t) == 24 for t in outs[True] + outs[False])
    # the first token comes from an eager prefill in both; later ones may round differently under graphs (the decode
    # kernel's split count follows the captured table width), so only the first is compared
    assert [t[0] for t in outs[False]] == [t[0] for t in outs[True]]
