"""The torch attention backend against plain causal softmax attention, through scattered block tables."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from workers.attention.backend import AttentionMetadata  # noqa: E402
from workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402

NUM_BLOCKS, NUM_LAYERS, BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM = 32, 2, 4, 2, 6, 8


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q: [Tq, H, D] at positions first_pos.., k/v: [Tk, KVH, D] at positions 0..; causal, GQA by head groups."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    q_pos = torch.arange(first_pos, first_pos + q.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def new_backend(seed: int) -> TorchAttentionBackend:
    gen = torch.Generator().manual_seed(seed)
    # garbage everywhere: a read of a slot nobody wrote would show up in the output
    arena = torch.randn(NUM_BLOCKS, NUM_LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen) * 100
    return TorchAttentionBackend(arena, HEADS, KV_HEADS, HEAD_DIM)


def scattered_tables(seq_lens: list[int], seed: int) -> list[list[int]]:
    ids = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(ids)
    tables = []
    for n in seq_lens:
        count = -(-n // BLOCK_SIZE)
        tables.append(ids[:count])
        ids = ids[count:]
    return tables


def slot(table: list[int], pos: int) -> int:
    return table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def make_meta(tables: list[list[int]], cached: list[int], query: list[int]) -> AttentionMetadata:
    seq_lens = [c + q for c, q in zip(cached, query)]
    slots = [slot(t, p) for t, c, s in zip(tables, cached, seq_lens) for p in range(c, s)]
    starts = [0]
    for q in query:
        starts.append(starts[-1] + q)
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)  # padded with block 0
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        query_lens_host=list(query),
        seq_lens_host=seq_lens,
        max_query_len=max(query),
        max_seq_len=max(seq_lens),
    )


def write_prefix(backend, layer: int, table: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Put a cached prefix into the arena by the documented layout: arena[block, layer, 0|1, offset]."""
    for pos in range(k.shape[0]):
        block, offset = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
        backend.kv_arena[block, layer, 0, offset] = k[pos]
        backend.kv_arena[block, layer, 1, offset] = v[pos]


def run_step(cached: list[int], query: list[int], layer: int, seed: int):
    """One step over sequences with ``cached`` prefix tokens and ``query`` new tokens; returns what to compare."""
    gen = torch.Generator().manual_seed(seed)
    backend = new_backend(seed)
    seq_lens = [c + q for c, q in zip(cached, query)]
    tables = scattered_tables(seq_lens, seed)
    ks = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    vs = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    qs = [torch.randn(q, HEADS, HEAD_DIM, generator=gen) for q in query]
    for table, c, k, v in zip(tables, cached, ks, vs):
        write_prefix(backend, layer, table, k[:c], v[:c])
    other_layer = backend.kv_arena[:, 1 - layer].clone()
    meta = make_meta(tables, cached, query)
    q_new = torch.cat(qs)
    k_new = torch.cat([k[c:] for k, c in zip(ks, cached)])
    v_new = torch.cat([v[c:] for v, c in zip(vs, cached)])
    out = backend.forward(layer, q_new, k_new, v_new, meta)
    expected = torch.cat([reference_attention(q, k, v, c) for q, k, v, c in zip(qs, ks, vs, cached)])
    return backend, tables, ks, vs, out, expected, other_layer


@pytest.mark.parametrize(
    ("cached", "query"),
    [
        ([0], [9]),
        ([0, 0, 0], [1, 4, 13]),
        ([0, 7, 4, 12], [5, 3, 9, 1]),  # cached prefixes, including a one-token chunk in a prefill step
        ([3, 8, 0], [6, 8, 2]),  # chunks that start and end on block boundaries
    ],
)
@pytest.mark.parametrize("layer", [0, 1])
def test_prefill_matches_dense_causal_attention(cached, query, layer):
    _, _, _, _, out, expected, _ = run_step(cached, query, layer, seed=sum(cached) + len(query) + layer)
    assert out.shape == (sum(query), HEADS, HEAD_DIM)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seq_lens", [[1], [1, 5, 8, 13], [16, 2, 9, 4, 1, 12]])
@pytest.mark.parametrize("layer", [0, 1])
def test_decode_matches_dense_attention(seq_lens, layer):
    cached = [n - 1 for n in seq_lens]
    _, _, _, _, out, expected, _ = run_step(cached, [1] * len(seq_lens), layer, seed=len(seq_lens) + layer)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_new_kv_lands_in_the_arena_at_its_slot(layer):
    cached, query = [0, 5, 2], [6, 3, 1]
    backend, tables, ks, vs, _, _, other_layer = run_step(cached, query, layer, seed=4)
    for table, c, q, k, v in zip(tables, cached, query, ks, vs):
        for pos in range(c + q):
            block, offset = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            assert torch.equal(backend.kv_arena[block, layer, 0, offset], k[pos])
            assert torch.equal(backend.kv_arena[block, layer, 1, offset], v[pos])
    assert torch.equal(backend.kv_arena[:, 1 - layer], other_layer)  # the other layer is untouched


def test_store_kv_touches_only_the_mapped_slots():
    backend = new_backend(0)
    before = backend.kv_arena.clone()
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor([5 * BLOCK_SIZE + 3, 17 * BLOCK_SIZE, 2 * BLOCK_SIZE + 1])
    k = torch.randn(3, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(3, KV_HEADS, HEAD_DIM, generator=gen)
    backend.store_kv(1, k, v, slots)
    changed = (backend.kv_arena != before).any(dim=(-1, -2))  # [blocks, layers, 2, block_size]
    assert sorted(map(tuple, changed.nonzero().tolist())) == sorted(
        [(5, 1, 0, 3), (5, 1, 1, 3), (17, 1, 0, 0), (17, 1, 1, 0), (2, 1, 0, 1), (2, 1, 1, 1)]
    )
    assert torch.equal(backend.kv_arena[17, 1, 1, 0], v[1])


def test_prefill_in_chunks_equals_prefill_at_once():
    # the same 14 tokens computed as one chunk, or as chunks of 5, 6 and 3 reusing the cache
    gen = torch.Generator().manual_seed(3)
    n = 14
    q = torch.randn(n, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    table = scattered_tables([n], 3)[0]
    whole = new_backend(1).forward(0, q, k, v, make_meta([table], [0], [n]))
    backend = new_backend(2)
    parts, start = [], 0
    for size in (5, 6, 3):
        end = start + size
        parts.append(backend.forward(0, q[start:end], k[start:end], v[start:end], make_meta([table], [start], [size])))
        start = end
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_arena_starts_zeroed_so_unwritten_slots_cannot_poison_attention():
    """Attention reads whole blocks, including the unwritten tail of a request's last block. Those slots are
    masked out of the softmax, but NaN there would still give 0 * NaN = NaN in probs @ V, so the arena must
    never start with recycled memory: it is allocated zeroed, and then only ever receives real K/V."""
    import torch

    from fs_engine.kv.layout import KVLayout
    from workers.attention.backend import AttentionMetadata
    from workers.attention.torch_backend import TorchAttentionBackend
    from workers.kv_arena import allocate_kv_arena

    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
    for _ in range(3):  # recycle memory that held NaN: the allocator may hand the same pages back
        junk = torch.full(layout.arena_shape(6), float("nan"))
        del junk
        arena = allocate_kv_arena(layout, 6, torch.float32, torch.device("cpu"))
        assert torch.count_nonzero(arena) == 0
    backend = TorchAttentionBackend(arena, 4, 2, 8)
    seq_len = 6  # blocks [3, 1]: block 1 holds 2 written slots and 2 never written
    q, k, v = torch.randn(seq_len, 4, 8), torch.randn(seq_len, 2, 8), torch.randn(seq_len, 2, 8)
    table = torch.tensor([[3, 1]], dtype=torch.int32)
    slots = torch.tensor([3 * 4 + i for i in range(4)] + [1 * 4 + i for i in range(2)])
    meta = AttentionMetadata(slots, torch.tensor([0, seq_len], dtype=torch.int32),
                             torch.tensor([seq_len], dtype=torch.int32), table, [seq_len], [seq_len], seq_len, seq_len)
    assert torch.isfinite(backend.forward(0, q, k, v, meta)).all()
