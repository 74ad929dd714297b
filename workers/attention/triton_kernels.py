"""Paged attention in Triton: store new K/V into the arena, split-KV decode, varlen causal prefill.

Every kernel reads a layer's cache through the strided views ``[num_blocks, block_size, kv_heads, head_dim]``
of the arena, and gathers K/V one token position at a time through the request's block table:

    pos ──> block = table[pos // BLOCK_SIZE], offset = pos % BLOCK_SIZE
        ──> cache + block * stride_block + offset * stride_slot + kv_head * stride_head + d * stride_d

so any KV block size works with any tile width BLOCK_N. Softmax is FlashAttention's online softmax, in base 2
(scores are pre-multiplied by log2(e), so exp2 replaces exp and the log-sum-exp is in bits).

GPU rules kept here although Triton's CPU interpreter does not enforce them:
- every ``tl.dot`` dimension is >= 16: query rows, KV tiles and head_dim are padded to powers of two and masked;
- float32 products are IEEE (``input_precision="ieee"``), not TF32, so float32 matches the torch reference;
- arena offsets are int64 (block ids are cast before the multiply: an arena can exceed 2^31 elements);
- sequence lengths, query offsets and block tables are read from device tensors, never baked into a launch, so a
  captured decode can replay with new lengths: its grid depends only on batch size, KV heads and num_splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 32  # decode splits per (sequence, KV head); also bounds the merge kernel's tile
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (load Q, write partials) outweighs its work


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: its [kv_heads, head_dim] K and V go to slot_mapping[t]."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # CUDA-graph padding rows carry slot -1: nothing to store
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d * stride_cd
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_kv_range(
    q, q_pos, m_i, l_i, acc,
    k_cache_ptr, v_cache_ptr, table_ptr, stride_tb, kv_head, lo, hi, qk_scale,
    stride_cb, stride_cs, stride_ch, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of q ([BLOCK_M, BLOCK_D]) over key positions lo..hi-1 of one KV head, tile by tile.

    ``table_ptr`` points at the request's block-table row. Keys at or past ``hi`` are never loaded (so garbage or
    NaN in unwritten slots cannot leak in); with CAUSAL, row r additionally sees only keys <= q_pos[r].
    Returns the running max (base 2), the running denominator and the unnormalized output.
    """
    d = tl.arange(0, BLOCK_D)
    head_off = kv_head * stride_ch + d[None, :] * stride_cd  # [1, BLOCK_D]
    d_mask = d[None, :] < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < hi
        block = tl.load(table_ptr + (pos // BLOCK_SIZE) * stride_tb, mask=valid, other=0).to(tl.int64)
        kv_off = (block * stride_cb + (pos % BLOCK_SIZE) * stride_cs)[:, None] + head_off  # [BLOCK_N, BLOCK_D]
        kv_mask = valid[:, None] & d_mask
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        # m_i starts finite (-1e30), so a row whose keys are all masked in this tile keeps alpha = 1, p = 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # fp32 accumulate
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr, qk_scale, num_splits,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_tt, stride_tb,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_lt, stride_lh, stride_ls,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (seq, kv_head, split): all GROUP query heads of one KV head over this split's share of the context.

    The share is computed here from seq_lens[seq], so one fixed grid serves any lengths: shares are whole
    BLOCK_N tiles, and the trailing splits of a short context get none (they write lse = -inf, output 0).
    """
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    share = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    hi = tl.minimum(lo + share, seq_len)

    g = tl.arange(0, BLOCK_G)  # query heads of the group, padded to >= 16 rows for tl.dot
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # q_pos (g below) is unused: decode sees every key < seq_len
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_kv_range(
        q, g, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr + seq * stride_tt, stride_tb, kv_head, lo, hi,
        qk_scale, stride_cb, stride_cs, stride_ch, stride_cd,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, DOT_PRECISION,
    )
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part = part_out_ptr + seq * stride_pt + split * stride_ps
    tl.store(part + heads[:, None] * stride_ph + d[None, :] * stride_pd, out, mask=q_mask)
    tl.store(part_lse_ptr + seq * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=g < GROUP)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_lt, stride_lh, stride_ls,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (seq, head): out = sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + seq * stride_lt + head * stride_lh + s * stride_ls,
                  mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (padding rows with seq_len 0): output 0, not NaN
    w = tl.exp2(lse - m)  # [BLOCK_S]; 0 for empty splits
    mask = (s[:, None] < num_splits) & (d[None, :] < HEAD_DIM)
    part = tl.load(part_out_ptr + seq * stride_pt + head * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
                   mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, table_ptr, query_start_ptr, seq_lens_ptr, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_tt, stride_tb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (tile, seq, head): BLOCK_M query rows of one request and head, causal over the cached context.

    The grid has cdiv(max_query_len, BLOCK_M) tiles for every request; tiles past a request's query exit at once.
    Query row r sits at position seq_len - q_len + r; the tile stops reading keys after its last row's position.
    """
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # already-cached tokens before this chunk

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < q_len) & (d[None, :] < HEAD_DIM)
    tokens = (q_start + r).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd, mask=mask, other=0.0)

    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = prefix + tl.minimum((tile + 1) * BLOCK_M, q_len)  # one past the tile's last row position
    m_i, l_i, acc = _attend_kv_range(
        q, prefix + r, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr + seq * stride_tt, stride_tb,
        head // GROUP, 0, hi, qk_scale, stride_cb, stride_cs, stride_ch, stride_cd,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, DOT_PRECISION,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every real row sees key 0; padding rows are not stored
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would round float32 operands to 10 mantissa bits; fp16/bf16 ignore the option (tensor cores either way)
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dim(n: int) -> int:
    """A tl.dot dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


# Tile sizes below were picked from ptxas register reports for sm_90 (compiled ahead of time with triton 3.6 and
# 3.9, no GPU at hand): the largest tiles that compile without register spills. K/V are gathered row by row, so
# every tile element carries its own 64-bit address: registers grow with BLOCK_N * BLOCK_D, hence smaller KV tiles
# for wide heads and for float32.


def prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the prefill kernel."""
    wide = _dot_dim(head_dim) > 128
    if dtype == torch.float32:  # IEEE products run on FMA units, operands held in registers: smaller tiles
        return (16, 16, 8) if wide else (32, 32, 8)
    return (32, 32, 8) if wide else (64, 64, 8)


def decode_tiles(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the decode kernel: 16 KV-tile elements per thread."""
    return max(16, min(64, 4096 // _dot_dim(head_dim))), 8


def _check_tile(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value}: tiles feed tl.dot, so they must be powers of two >= 16")
    return value


def _check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride():
        raise ValueError("the kernels take one set of strides for K and V: views of one arena layer have equal strides")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}: the kernels multiply them directly")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] -> cache[slot // block_size, slot % block_size] for slot = slot_mapping[t].

    Caches are [num_blocks, block_size, kv_heads, head_dim] views of any strides. Rows whose slot is < 0 (CUDA-graph
    padding) are skipped. Grid (T,); reads slot_mapping (int32 or int64) on the device only.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride() != v_cache.stride():
        raise ValueError("the kernel takes one set of strides for K and V: views of one arena layer have equal strides")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Decode splits per (sequence, KV head): enough programs for about two per SM, each split >= 256 keys.

    A batch that already has num_sms programs gets 1; one 8k-token request alone with 8 KV heads on 132 SMs
    gets 32 splits of 256 keys.
    """
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(2 * num_sms, max(programs, 1))
    return max(1, min(wanted, triton.cdiv(max_seq_len, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def decode_workspace_shapes(num_seqs: int, num_heads: int, num_splits: int, head_dim: int):
    """Shapes of the float32 split partials: outputs [seqs, heads, splits, head_dim], lse [seqs, heads, splits]."""
    return (num_seqs, num_heads, num_splits, head_dim), (num_seqs, num_heads, num_splits)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, *, scale: float, num_splits: int, out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """q: [num_seqs, heads, head_dim], one token per sequence (position seq_lens[i] - 1) -> [num_seqs, heads, head_dim].

    Flash-decoding: grid (num_seqs, kv_heads, num_splits) writes per-split partials into ``workspace`` (see
    decode_workspace_shapes; allocated when None), then grid (num_seqs, heads) merges them into ``out``.
    Reads seq_lens (int32) and block_tables ([num_seqs, width] int32) on the device only, so the launch can be
    captured once per batch size and num_splits and replayed for any lengths; a sequence with seq_len 0 gets 0.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check_caches(q, k_cache, v_cache)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}: must be in 1..{MAX_SPLITS}")
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if workspace is None:
        out_shape, lse_shape = decode_workspace_shapes(num_seqs, num_heads, num_splits, head_dim)
        workspace = (q.new_empty(out_shape, dtype=torch.float32), q.new_empty(lse_shape, dtype=torch.float32))
    part_out, part_lse = workspace
    default_n, num_warps = decode_tiles(head_dim)
    block_n = _check_tile("block_n", block_n or default_n)
    group = num_heads // num_kv_heads
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, scale * LOG2E, num_splits,
        *q.stride(), *k_cache.stride(), *block_tables.stride(), *part_out.stride(), *part_lse.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK_G=_dot_dim(group),
        BLOCK_N=block_n, BLOCK_D=_dot_dim(head_dim), DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, num_splits, *part_out.stride(), *part_lse.stride(), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, max_query_len: int, scale: float,
    out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim], request i's rows query_start_loc[i]:query_start_loc[i+1] -> [T, heads, head_dim].

    Causal over each request's cached prefix and its own rows (plain prefill, chunked prefill, and q_len 1 rows
    of a mixed step alike). Grid (cdiv(max_query_len, BLOCK_M), num_seqs, heads); reads query_start_loc and
    seq_lens (int32) and block_tables on the device, max_query_len only sizes the grid.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    _check_caches(q, k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0 or max_query_len == 0:
        return out
    default_m, default_n, num_warps = prefill_tiles(head_dim, q.dtype)
    block_m = _check_tile("block_m", block_m or default_m)
    block_n = _check_tile("block_n", block_n or default_n)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, out, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale * LOG2E,
        *q.stride(), *out.stride(), *k_cache.stride(), *block_tables.stride(),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_dot_dim(head_dim), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return out
