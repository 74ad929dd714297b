"""The flash_attn backend's CPU-checkable parts: why it cannot run (and that saying so touches no GPU), its K/V
store, and its calls into flash-attn, checked against the torch backend through stand-ins for the two flash-attn
functions that implement their documented contract (paged K/V, int32 metadata, bottom-right causal alignment).

The step builders here are shared with tests/gpu/test_flash_attn_backend.py, which runs the real kernels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from workers.attention import flash_attn_backend as fab  # noqa: E402
from workers.attention.backend import AttentionMetadata  # noqa: E402
from workers.attention.flash_attn_backend import FlashAttnBackend, flash_attn_unavailable  # noqa: E402
from workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402

FLASH_IMPORTABLE = not isinstance(fab._import_flash(), str)


# ---- step builders (shared with the GPU test) ----------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    num_blocks: int = 24
    num_layers: int = 2
    block_size: int = 256
    kv_heads: int = 2
    heads: int = 4
    head_dim: int = 16


@dataclass
class Step:
    arena: torch.Tensor  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], prefixes written
    meta: AttentionMetadata
    q: torch.Tensor  # [tokens, heads, head_dim]
    k: torch.Tensor  # [tokens, kv_heads, head_dim]
    v: torch.Tensor
    tables: list[list[int]]


def block_tables_for(dims: Dims, seq_lens: list[int], placement: str, seed: int) -> list[list[int]]:
    counts = [-(-n // dims.block_size) for n in seq_lens]
    rng = random.Random(seed)
    if placement == "contiguous":  # one run per request, runs side by side from a random start
        start = rng.randrange(dims.num_blocks - sum(counts) + 1)
        ids = list(range(start, start + sum(counts)))
    else:
        ids = rng.sample(range(dims.num_blocks), sum(counts))
    tables = []
    for count in counts:
        tables.append(ids[:count])
        ids = ids[count:]
    return tables


def build_step(dims: Dims, cached: list[int], query: list[int], *, layer: int = 0, seed: int = 0,
               placement: str = "scattered", dtype: torch.dtype = torch.float32, device: str = "cpu",
               extra_width: int = 0) -> Step:
    """Requests with ``cached`` prefix tokens already in the arena and ``query`` new tokens this step; every slot
    nobody wrote holds large finite garbage, so a read outside a request's context shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(cached, query)]
    tables = block_tables_for(dims, seq_lens, placement, seed)
    arena = torch.randn(dims.num_blocks, dims.num_layers, 2, dims.block_size, dims.kv_heads, dims.head_dim,
                        generator=gen) * 100
    ks = [torch.randn(n, dims.kv_heads, dims.head_dim, generator=gen) for n in seq_lens]
    vs = [torch.randn(n, dims.kv_heads, dims.head_dim, generator=gen) for n in seq_lens]
    qs = [torch.randn(n, dims.heads, dims.head_dim, generator=gen) for n in query]
    slots = []
    for table, c, n, k, v in zip(tables, cached, seq_lens, ks, vs):
        for pos in range(n):
            block, offset = table[pos // dims.block_size], pos % dims.block_size
            if pos < c:  # the cached prefix, by the documented layout arena[block, layer, 0|1, offset]
                arena[block, layer, 0, offset] = k[pos]
                arena[block, layer, 1, offset] = v[pos]
            else:
                slots.append(block * dims.block_size + offset)
    starts = [0]
    for n in query:
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables) + extra_width
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)  # padded with block 0
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        query_lens_host=list(query), seq_lens_host=seq_lens, max_query_len=max(query), max_seq_len=max(seq_lens),
    )
    new_k = torch.cat([k[c:] for k, c in zip(ks, cached)])
    new_v = torch.cat([v[c:] for v, c in zip(vs, cached)])
    return Step(arena.to(device, dtype), meta, torch.cat(qs).to(device, dtype), new_k.to(device, dtype),
                new_v.to(device, dtype), tables)


def reference(step: Step, dims: Dims, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend in float32 on a copy of the arena: (output, arena after the step)."""
    arena = step.arena.float().clone()
    backend = TorchAttentionBackend(arena, dims.heads, dims.kv_heads, dims.head_dim)
    out = backend.forward(layer, step.q.float(), step.k.float(), step.v.float(), step.meta)
    return out, arena


# ---- flash_attn_unavailable ----------------------------------------------------------------------------------
def test_cpu_device_is_rejected_with_what_to_change():
    reason = flash_attn_unavailable(torch.device("cpu"), 256, torch.bfloat16)
    assert "not CUDA" in reason and "attention_backend='torch'" in reason
    if not FLASH_IMPORTABLE:
        assert "pip install flash-attn" in reason


def test_block_size_must_be_a_multiple_of_256_and_checking_touches_no_gpu():
    # this machine's torch may have no CUDA at all: any CUDA call would raise, so passing proves none is made
    reason = flash_attn_unavailable(torch.device("cuda"), 16, torch.bfloat16)
    assert "flash-attn's paged KV needs block_size % 256 == 0" in reason and "pass block_size=256" in reason
    assert "not CUDA" not in reason
    assert "block_size" not in (flash_attn_unavailable("cuda", 512, torch.float16) or "")


@pytest.mark.parametrize("dtype", [torch.float32, "float32"])
def test_float32_is_rejected(dtype):
    reason = flash_attn_unavailable("cuda", 256, dtype)
    assert "float16 or bfloat16" in reason and "no float32" in reason


def test_usable_settings_leave_only_the_package():
    reason = flash_attn_unavailable("cuda:0", 256, "bfloat16")
    if FLASH_IMPORTABLE:
        assert reason is None
    else:
        assert reason.startswith("the flash_attn package is not importable") and "pip install flash-attn" in reason


def test_every_problem_is_reported_at_once():
    reason = flash_attn_unavailable("cpu", 16, torch.float32)
    assert "not CUDA" in reason and "float16 or bfloat16" in reason and "block_size=256" in reason


def test_building_the_backend_where_it_cannot_run_raises_value_error():
    arena = torch.zeros(4, 1, 2, 16, 2, 16)
    with pytest.raises(ValueError, match="attention_backend='flash_attn' cannot run: .*not CUDA.*block_size=256"):
        FlashAttnBackend(arena, 4, 2, 16)


# ---- storing K/V ---------------------------------------------------------------------------------------------
def test_store_matches_the_torch_backend():
    dims = Dims(num_blocks=8, block_size=4)
    step = build_step(dims, [3, 0, 6], [2, 5, 1], layer=1, seed=1)
    _, expected = reference(step, dims, layer=1)
    arena = step.arena.clone()
    fab.store_kv_slots(arena[:, 1, 0], arena[:, 1, 1], step.k, step.v, step.meta.slot_mapping)
    assert torch.equal(arena, expected)


@pytest.mark.parametrize("slots", [[0, 14, -1, -1], [0, 14, -1], [-1, 0, 14, -1]])
def test_graph_padding_rows_store_nothing(slots):
    gen = torch.Generator().manual_seed(0)
    arena = torch.randn(6, 2, 2, 4, 2, 8, generator=gen)
    # a real row writing slot 0 of block 0 alongside padding rows: the case a stray duplicate write would spoil
    slots = torch.tensor(slots)
    k, v = torch.randn(len(slots), 2, 8, generator=gen), torch.randn(len(slots), 2, 8, generator=gen)
    real = slots >= 0
    expected = arena.clone()
    fab.store_kv_slots(expected[:, 0, 0], expected[:, 0, 1], k[real], v[real], slots[real])
    fab.store_kv_slots(arena[:, 0, 0], arena[:, 0, 1], k, v, slots, skip_negative=True)
    assert torch.equal(arena, expected)


def test_graph_step_of_padding_only_stores_nothing():
    arena = torch.randn(3, 1, 2, 4, 1, 8)
    before = arena.clone()
    k = v = torch.randn(4, 1, 8)
    fab.store_kv_slots(arena[:, 0, 0], arena[:, 0, 1], k, v, torch.full((4,), -1), skip_negative=True)
    assert torch.equal(arena, before)


def test_cu_seqlens_are_int32_prefix_sums_with_a_leading_zero():
    out = fab.cu_seqlens(torch.tensor([3, 1, 700], dtype=torch.int32))
    assert out.dtype == torch.int32 and out.tolist() == [0, 3, 4, 704]


# ---- the calls into flash-attn, through stand-ins ---------------------------------------------------------------
def _attend(q, k_cache, v_cache, table, seq_len, scale):
    """q [Tq, H, D] at the last Tq positions of a sequence of seq_len keys read through ``table``."""
    block_size = k_cache.shape[1]
    blocks = table[: -(-seq_len // block_size)].long()
    k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:seq_len].float()
    v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:seq_len].float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(seq_len - q.shape[0], seq_len)
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def _check_paged(k_cache, v_cache, block_table, *int32):
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert all(t.dtype == torch.int32 for t in int32)


def fake_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale, causal):
    """flash_attn_with_kvcache's contract: q [batch, seqlen_q, heads, head_dim] -> the same shape."""
    _check_paged(k_cache, v_cache, block_table, cache_seqlens)
    assert causal and q.dim() == 4 and block_table.shape[0] == q.shape[0] == cache_seqlens.shape[0]
    assert int(cache_seqlens.max()) <= block_table.shape[1] * k_cache.shape[1]
    return torch.stack([_attend(q[b], k_cache, v_cache, block_table[b], int(cache_seqlens[b]), softmax_scale)
                        for b in range(q.shape[0])])


def fake_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                block_table):
    """flash_attn_varlen_func's paged contract: q [total_q, heads, head_dim]; sequence b owns query rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and cu_seqlens_k[b+1] - cu_seqlens_k[b] keys read through block_table[b]."""
    _check_paged(k, v, block_table, cu_seqlens_q, cu_seqlens_k)
    q_lens, k_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    assert causal and cu_seqlens_q[0] == 0 == cu_seqlens_k[0] and int(cu_seqlens_q[-1]) == q.shape[0]
    assert max(q_lens) <= max_seqlen_q and max(k_lens) <= max_seqlen_k  # host ints bound the grid
    starts = cu_seqlens_q.tolist()
    return torch.cat([_attend(q[starts[b] : starts[b + 1]], k, v, block_table[b], k_lens[b], softmax_scale)
                      for b in range(len(q_lens))])


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setattr(fab, "flash_attn_unavailable", lambda *args: None)
    monkeypatch.setattr(fab, "_import_flash", lambda: SimpleNamespace(kvcache=fake_kvcache, varlen=fake_varlen,
                                                                       version="stand-in"))


STEPS = {  # (cached, query)
    "decode": ([0, 254, 255, 256, 600], [1, 1, 1, 1, 1]),
    "prefill": ([0], [300]),
    "prefill with cached prefix": ([0, 256, 100, 513], [17, 256, 1, 40]),
    "mixed": ([500, 0, 37, 255], [1, 40, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(STEPS))
@pytest.mark.parametrize("decode_kernel", ["kvcache", "varlen"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (2, 2)])
def test_forward_matches_the_torch_backend(fake_flash, case, decode_kernel, heads, kv_heads):
    dims = Dims(heads=heads, kv_heads=kv_heads)
    cached, query = STEPS[case]
    step = build_step(dims, cached, query, layer=1, seed=len(case), extra_width=1)
    expected, expected_arena = reference(step, dims, layer=1)
    backend = FlashAttnBackend(step.arena, heads, kv_heads, dims.head_dim, decode_kernel=decode_kernel)
    out = backend.forward(1, step.q, step.k, step.v, step.meta)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(step.arena, expected_arena)


def test_one_prefix_sum_per_step_shared_by_layers(fake_flash):
    dims = Dims()
    step = build_step(dims, [0, 10], [5, 3])
    backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim, decode_kernel="kvcache")
    first = backend._cu_seqlens_k_of(step.meta)
    assert backend._cu_seqlens_k_of(step.meta) is first
    other = build_step(dims, [0, 10], [5, 3])
    assert backend._cu_seqlens_k_of(other.meta) is not first


@pytest.mark.parametrize("decode_kernel", ["kvcache", "varlen"])
def test_graph_backend_pads_like_decode_graphs(fake_flash, decode_kernel):
    """A batch of 3 padded to 5 the way DecodeGraphs pads it: slot -1, length 1, block 0, a wide table."""
    dims = Dims()
    step = build_step(dims, [10, 299, 511], [1, 1, 1], seed=3, extra_width=2)
    expected, expected_arena = reference(step, dims, layer=0)
    backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim, decode_kernel=decode_kernel)
    graph_backend = backend.for_cuda_graph(5, step.meta.block_tables.shape[1] * dims.block_size)
    assert graph_backend.kv_arena is step.arena and graph_backend.decode_kernel == decode_kernel
    m, pad = step.meta, 2
    width = m.block_tables.shape[1]
    padded = AttentionMetadata(
        slot_mapping=torch.cat([m.slot_mapping, torch.full((pad,), -1)]),
        query_start_loc=torch.arange(6, dtype=torch.int32),
        seq_lens=torch.cat([m.seq_lens, torch.ones(pad, dtype=torch.int32)]),
        block_tables=torch.cat([m.block_tables, torch.zeros(pad, width, dtype=torch.int32)]),
        query_lens_host=[1] * 5, seq_lens_host=[width * dims.block_size] * 5, max_query_len=1,
        max_seq_len=width * dims.block_size,
    )
    q, k, v = (torch.cat([t, torch.randn(pad, *t.shape[1:])]) for t in (step.q, step.k, step.v))
    out = graph_backend.forward(0, q, k, v, padded)
    torch.testing.assert_close(out[:3], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(step.arena, expected_arena)  # the padding rows wrote nowhere


def test_query_in_another_dtype_is_rejected(fake_flash):
    dims = Dims()
    step = build_step(dims, [0], [4], dtype=torch.bfloat16)
    backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim, decode_kernel="kvcache")
    with pytest.raises(ValueError, match="dtype"):
        backend.forward(0, step.q.float(), step.k, step.v, step.meta)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "match"), [
    (6, 4, 16, "multiple of num_kv_heads"), (4, 2, 12, "head_dim=12"), (4, 2, 512, "head_dim=512"),
])
def test_unsupported_shapes_are_rejected_at_construction(fake_flash, heads, kv_heads, head_dim, match):
    arena = torch.zeros(2, 1, 2, 256, kv_heads, head_dim)
    with pytest.raises(ValueError, match=match):
        FlashAttnBackend(arena, heads, kv_heads, head_dim, decode_kernel="kvcache")


def test_non_contiguous_head_dim_is_rejected(fake_flash):
    arena = torch.zeros(2, 1, 2, 256, 16, 2).transpose(-1, -2)  # [.., kv_heads=2, head_dim=16], head_dim strided
    with pytest.raises(ValueError, match="stride"):
        FlashAttnBackend(arena, 4, 2, 16, decode_kernel="kvcache")


def test_graph_backend_reads_lengths_refilled_in_place(fake_flash):
    # a graph's metadata is one set of static buffers refilled before every replay: nothing may be cached from them
    dims = Dims()
    step = build_step(dims, [0, 10], [1, 1])
    graph_backend = FlashAttnBackend(step.arena, dims.heads, dims.kv_heads, dims.head_dim,
                                     decode_kernel="varlen").for_cuda_graph(2, 512)
    assert graph_backend._cu_seqlens_k_of(step.meta).tolist() == [0, 1, 12]
    step.meta.seq_lens.copy_(torch.tensor([5, 7]))
    assert graph_backend._cu_seqlens_k_of(step.meta).tolist() == [0, 5, 12]
