"""The Triton attention kernels against plain causal softmax attention, through paged block tables.

Without CUDA the kernels run in Triton's CPU interpreter (small shapes: about 20 s on two cores);
cases marked ``gpu`` add the big head dims and long contexts and are skipped without a CUDA device.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # must precede the first import of triton: @triton.jit reads it
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import dataclasses  # noqa: E402
from unittest import mock  # noqa: E402

from tests.unit import test_torch_attention as tta  # noqa: E402
from workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from workers.attention.triton_backend import TritonAttentionBackend, triton_unavailable  # noqa: E402
from workers.attention.triton_kernels import MAX_SPLITS, choose_num_splits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# e.g. TRITON_INTERPRET=0 set by the caller, or triton imported (by transformers) before the variable was set
if triton_unavailable(DEVICE) is not None:
    pytest.skip(triton_unavailable(DEVICE), allow_module_level=True)
NUM_LAYERS, SPARE_BLOCKS = 2, 6
# tolerance against the float64 reference computed from the same (rounded) inputs
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SMALL_TILES = {"block_m": 16, "block_n": 16}  # cross tile boundaries on short sequences


@pytest.fixture(scope="module", autouse=True)
def _interpreter_bf16_dot():
    """Triton's interpreter keeps bfloat16 as uint16 and its tl.dot multiplies the bit patterns (triton issue
    #11584, "not supported yet"). Widen bf16 operands to float32 first, which is exact and what tensor cores
    compute (bf16 products accumulated in float32). Compiled kernels on a GPU are untouched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    with mock.patch.object(InterpreterBuilder, "create_dot", create_dot):
        yield


def contiguous_tables(seq_lens: list[int], block_size: int) -> list[list[int]]:
    """Each request's blocks as one run of consecutive ids, as the block-group manager hands them out.

    Block 0, the block tables' padding value, stays unused (so NaN): a read past a table's end would show."""
    tables, first = [], 1
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(list(range(first, first + count)))
        first += count
    return tables


def poisoned_arena(tables, seq_lens, block_size, kv_heads, head_dim, dtype, gen) -> torch.Tensor:
    """Garbage (x100) in every slot, NaN in blocks no request uses and in the unwritten tail of each last block:
    a kernel that reads a slot outside a request's context gets a wrong or NaN output."""
    num_blocks = sum(len(t) for t in tables) + SPARE_BLOCKS
    # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
    arena = torch.randn(num_blocks, NUM_LAYERS, 2, block_size, kv_heads, head_dim, generator=gen) * 100
    used = torch.zeros(num_blocks, dtype=torch.bool)
    for table, n in zip(tables, seq_lens):
        used[table] = True
        arena[table[-1], :, :, n - (len(table) - 1) * block_size :] = float("nan")
    arena[~used] = float("nan")
    return arena.to(dtype)


def run_step(cached, query, *, heads=6, kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32,
             layout="scattered", layer=0, seed=0, **backend_kwargs):
    """One step of the Triton backend; returns (backend, meta, output, float reference, arena before the step)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(cached, query)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + SPARE_BLOCKS
    # the reference helpers read these module constants when called: point them at this step's layout
    with mock.patch.multiple(tta, BLOCK_SIZE=block_size, NUM_BLOCKS=num_blocks):
        if layout == "scattered":
            tables = tta.scattered_tables(seq_lens, seed)
        else:
            tables = contiguous_tables(seq_lens, block_size)
        arena = poisoned_arena(tables, seq_lens, block_size, kv_heads, head_dim, dtype, gen).to(DEVICE)
        backend = TritonAttentionBackend(arena, heads, kv_heads, head_dim, **backend_kwargs)
        # inputs rounded to the step's dtype first, so that the reference sees exactly what the kernel sees
        ks = [torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype) for n in seq_lens]
        vs = [torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype) for n in seq_lens]
        qs = [torch.randn(n, heads, head_dim, generator=gen).to(dtype) for n in query]
        for table, c, k, v in zip(tables, cached, ks, vs):
            tta.write_prefix(backend, layer, table, k[:c].to(DEVICE), v[:c].to(DEVICE))
        meta = on_device(tta.make_meta(tables, cached, query))
    before = arena.clone()
    new_k = torch.cat([k[c:] for k, c in zip(ks, cached)]).to(DEVICE)
    new_v = torch.cat([v[c:] for v, c in zip(vs, cached)]).to(DEVICE)
    out = backend.forward(layer, torch.cat(qs).to(DEVICE), new_k, new_v, meta)
    expected = torch.cat([tta.reference_attention(q.float(), k.float(), v.float(), c)
                          for q, k, v, c in zip(qs, ks, vs, cached)])
    return backend, meta, out, expected, before


def on_device(meta):
    return dataclasses.replace(meta, **{f.name: getattr(meta, f.name).to(DEVICE) for f in dataclasses.fields(meta)
                                        if isinstance(getattr(meta, f.name), torch.Tensor)})


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(
    ("cached", "query", "options"),
    [
        ([0], [9], {}),  # default tiles
        ([0, 0, 0], [1, 4, 13], {"block_size": 16, "layout": "contiguous", **SMALL_TILES}),
        ([0, 7, 4, 12], [5, 3, 9, 1], SMALL_TILES),  # chunked prefill, with a one-token chunk in the step
        ([3, 8, 0], [6, 8, 2], {"layer": 1, "layout": "contiguous", **SMALL_TILES}),  # chunks on block boundaries
        ([20, 0, 33], [17, 1, 35], {"block_size": 16, **SMALL_TILES}),  # several query and KV tiles per request
        ([0, 41], [40, 2], {"layer": 1, **SMALL_TILES}),
    ],
)
def test_prefill_matches_causal_reference(cached, query, options):
    _, _, out, expected, _ = run_step(cached, query, **options)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("seq_lens", [[1], [1, 5, 8, 13], [16, 2, 9, 4, 1, 12, 33]])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference(seq_lens, block_size):
    cached = [n - 1 for n in seq_lens]
    _, _, out, expected, _ = run_step(cached, [1] * len(seq_lens), block_size=block_size, block_n=16, seed=block_size)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("decode", [False, True])
def test_grouped_query_heads(heads, kv_heads, decode):
    cached, query = ([5, 17, 2], [1, 1, 1]) if decode else ([5, 0], [4, 18])
    _, _, out, expected, _ = run_step(cached, query, heads=heads, kv_heads=kv_heads, seed=heads, **SMALL_TILES)
    assert_matches(out, expected, torch.float32)


HEAD_DIMS = [8, 32] + [pytest.param(d, marks=pytest.mark.gpu) for d in (64, 80, 96, 128, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("decode", [False, True])
def test_head_dims_and_dtypes(dtype, head_dim, decode):
    cached, query = ([3, 20, 9], [1, 1, 1]) if decode else ([0, 6], [12, 5])
    _, _, out, expected, _ = run_step(cached, query, head_dim=head_dim, dtype=dtype, seed=head_dim, **SMALL_TILES)
    assert_matches(out, expected, dtype)


def test_decode_splits_equal_one_split():
    # 7 splits of a 150-token context are 2 tiles each; the short requests leave trailing splits empty
    seq_lens = [150, 37, 1]
    outs = []
    for num_splits in (1, 7, MAX_SPLITS):
        _, _, out, expected, _ = run_step([n - 1 for n in seq_lens], [1] * 3, seed=5, block_n=16,
                                          decode_num_splits=num_splits)
        assert_matches(out, expected, torch.float32)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


def test_step_writes_new_kv_to_its_slots_and_leaves_the_other_layer():
    backend, meta, _, _, before = run_step([0, 5, 2], [6, 3, 1], layer=1, seed=4, **SMALL_TILES)
    arena = backend.kv_arena
    blocks, offsets = meta.slot_mapping // tta.BLOCK_SIZE, meta.slot_mapping % tta.BLOCK_SIZE
    changed = torch.zeros(arena.shape[0], tta.BLOCK_SIZE, dtype=torch.bool, device=DEVICE)
    changed[blocks, offsets] = True
    # slots outside the mapping (NaN included: compare bit patterns) are untouched, in both layers
    same = (arena.view(torch.int32) == before.view(torch.int32)).all(dim=(-1, -2))  # [blocks, layers, 2, block_size]
    assert same[:, 0].all()
    assert same[:, 1][~changed[:, None].expand(-1, 2, -1)].all()
    assert not same[:, 1][changed[:, None].expand(-1, 2, -1)].any()


def test_store_kv_skips_padding_slots():
    backend, _, _, _, _ = run_step([2], [1], seed=6)  # any backend over a poisoned arena
    before = backend.kv_arena.clone()
    slots = torch.tensor([5 * 4 + 3, -1, 2 * 4 + 1, -1], device=DEVICE)
    k = torch.randn(4, 2, 8, device=DEVICE)
    v = torch.randn(4, 2, 8, device=DEVICE)
    backend.store_kv(0, k, v, slots)
    after = backend.kv_arena
    changed = (after.view(torch.int32) != before.view(torch.int32)).any(dim=(-1, -2))
    assert sorted(map(tuple, changed.nonzero().tolist())) == [(2, 0, 0, 1), (2, 0, 1, 1), (5, 0, 0, 3), (5, 0, 1, 3)]
    assert torch.equal(after[5, 0, 0, 3], k[0]) and torch.equal(after[2, 0, 1, 1], v[2])


def test_cuda_graph_backend_decodes_padded_batches():
    """What DecodeGraphs replays: a fixed split count and a preallocated workspace, the rows past the real ones
    padded with slot -1 and seq_len 1 (block 0) or 0. Real rows equal an eager step; seq_len-0 rows give 0."""
    backend, meta, _, _, _ = run_step([6, 11], [1, 1], seed=7, block_n=16)
    graph = backend.for_cuda_graph(batch_size=5, max_seq_len=4096)
    assert graph.kv_arena is backend.kv_arena and graph.decode_num_splits == 16  # most of them empty here
    workspace = graph._workspace.data_ptr()
    padded = dataclasses.replace(
        meta,
        slot_mapping=torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((3,), -1)]),
        query_start_loc=torch.arange(6, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.cat([meta.seq_lens, meta.seq_lens.new_tensor([1, 0, 1])]),
        block_tables=torch.cat([meta.block_tables, meta.block_tables.new_zeros(3, meta.block_tables.shape[1])]),
        query_lens_host=[1] * 5, seq_lens_host=[4096] * 5, max_seq_len=4096,
    )
    q = torch.randn(5, 6, 8, device=DEVICE)
    kv = torch.randn(5, 2, 8, device=DEVICE)
    before = backend.kv_arena.clone()
    out = graph.forward(0, q, kv, kv, padded)
    assert graph._workspace.data_ptr() == workspace  # nothing allocated or replaced while a graph would replay
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    eager = TritonAttentionBackend(before, 6, 2, 8, decode_num_splits=1)
    torch.testing.assert_close(out[:2], eager.forward(0, q[:2], kv[:2], kv[:2], meta), rtol=1e-6, atol=1e-6)
    # the same real slots were written, none for the padding (bit patterns: the arena holds NaN)
    assert torch.equal(backend.kv_arena.view(torch.int32), eager.kv_arena.view(torch.int32))


def test_matches_the_torch_backend_on_a_mixed_step():
    """Same arena, same step: both backends leave the same arena and return the same attention."""
    gen = torch.Generator().manual_seed(8)
    cached, query = [0, 9, 3], [7, 1, 5]
    tables = tta.scattered_tables([c + q for c, q in zip(cached, query)], 8)
    shape = (tta.NUM_BLOCKS, NUM_LAYERS, 2, tta.BLOCK_SIZE, tta.KV_HEADS, tta.HEAD_DIM)
    arena = (torch.randn(shape, generator=gen) * 100)
    arena = arena.to(DEVICE)
    meta = on_device(tta.make_meta(tables, cached, query))
    q = torch.randn(sum(query), tta.HEADS, tta.HEAD_DIM, generator=gen).to(DEVICE)
    k = torch.randn(sum(query), tta.KV_HEADS, tta.HEAD_DIM, generator=gen).to(DEVICE)
    v = torch.randn(sum(query), tta.KV_HEADS, tta.HEAD_DIM, generator=gen).to(DEVICE)
    torch_backend = TorchAttentionBackend(arena.clone(), tta.HEADS, tta.KV_HEADS, tta.HEAD_DIM)
    triton_backend = TritonAttentionBackend(arena.clone(), tta.HEADS, tta.KV_HEADS, tta.HEAD_DIM, **SMALL_TILES)
    expected = torch_backend.forward(1, q, k, v, meta)
    out = triton_backend.forward(1, q, k, v, meta)
    assert torch.equal(triton_backend.kv_arena, torch_backend.kv_arena)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_num_splits_fill_the_gpu_only_when_needed():
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, num_sms=132) == MAX_SPLITS
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=300, num_sms=132) == 2  # >= 256 keys a split
    assert choose_num_splits(num_seqs=64, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 1
    assert choose_num_splits(num_seqs=4, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 9


def test_decode_workspace_is_reused():
    backend, _, _, _, _ = run_step([2], [1], seed=9)
    big = backend.decode_workspace(8, 6)[0]
    small_out, small_lse = backend.decode_workspace(3, 2)
    assert small_out.data_ptr() == big.data_ptr()
    assert small_out.shape == (3, 6, 2, 8) and small_lse.shape == (3, 6, 2)


def test_triton_unavailable_explains_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in triton_unavailable("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable("cpu") is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_long_contexts_on_gpu(dtype, head_dim):
    # default tiles: a mixed step with long prefixes (engine block size), then one long request decoding alone
    # (24 splits) through flash-attn's block size
    _, _, out, expected, _ = run_step([0, 700, 1500, 3], [900, 1, 300, 64], head_dim=head_dim, dtype=dtype,
                                      block_size=16, heads=32, kv_heads=8, seed=head_dim)
    assert_matches(out, expected, dtype)
    _, _, out, expected, _ = run_step([6000], [1], head_dim=head_dim, dtype=dtype, block_size=256, heads=32,
                                      kv_heads=8, seed=head_dim)
    assert_matches(out, expected, dtype)
