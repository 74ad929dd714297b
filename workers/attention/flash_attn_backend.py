"""Paged attention through the ``flash-attn`` package (FlashAttention-2), reading the arena in place.

Decode-only steps call ``flash_attn_with_kvcache`` (one query per sequence, split-KV); every other step (prefill
chunks over a cached prefix, mixed steps) calls the paged ``flash_attn_varlen_func``. Both read one layer's K
and V through the block table straight from the arena: flash-attn takes a block (batch) stride, a row stride
and a head stride, so the strided per-layer view needs no copy as long as ``head_dim`` is contiguous::

    arena   [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
    k_cache [num_blocks,                block_size, kv_heads, head_dim] = arena[:, layer, 0]
             stride(0) = num_layers * 2 * block_size * kv_heads * head_dim, stride(-1) = 1

flash-attn's limits, checked when the backend is built rather than deep inside the first step: CUDA only,
Ampere or newer, float16 / bfloat16 only, paged blocks of a multiple of 256 tokens, head_dim a multiple of 8
and at most 256 (other head sizes make flash-attn pad, i.e. copy, the whole cache on every call).

flash-attn builds newer than 2.8.3.post1 may read ``max(cache_seqlens)`` back to the host inside the paged
``flash_attn_with_kvcache`` (a bounds check added upstream in July 2026): a device sync per layer, and impossible
inside a CUDA graph.
``decode_kernel="auto"`` probes for that sync once (torch's sync debug mode turns it into an error, without
running anything on a captured stream) and then decodes with the paged varlen kernel instead, which never
reads device data on the host.

Imports of ``flash_attn`` happen when a backend is built, so this module imports anywhere (tests on CPU).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import SimpleNamespace

import torch

from workers.attention.backend import AttentionBackend, AttentionMetadata

FLASH_BLOCK_MULTIPLE = 256  # flash_api.cpp: "Paged KV cache block size must be divisible by 256"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
DECODE_KERNELS = ("auto", "kvcache", "varlen")


@functools.lru_cache(maxsize=1)
def _import_flash() -> SimpleNamespace | str:
    """The two flash-attn entry points, or why they cannot be had (importing loads the CUDA extension but
    creates no CUDA context)."""
    try:
        module = importlib.import_module("flash_attn")
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except Exception as exc:  # ImportError, or an OSError / undefined symbol from an extension built for another torch
        return (f"the flash_attn package is not importable ({type(exc).__name__}: {exc}): "
                f"pip install flash-attn (a build for this torch and CUDA), or use attention_backend='triton'")
    version = getattr(module, "__version__", "unknown")
    try:
        paged_varlen = "block_table" in inspect.signature(flash_attn_varlen_func).parameters
    except (TypeError, ValueError):  # a wrapped callable without a signature: trust it, the call will tell
        paged_varlen = True
    if not paged_varlen:
        return (f"flash-attn {version} is too old: paged flash_attn_varlen_func(block_table=...) needs >= 2.5.9; "
                f"pip install -U flash-attn")
    return SimpleNamespace(varlen=flash_attn_varlen_func, kvcache=flash_attn_with_kvcache, version=version)


def _load_flash() -> SimpleNamespace:
    flash = _import_flash()
    if isinstance(flash, str):
        raise ValueError(f"attention_backend='flash_attn' cannot run: {flash}")
    return flash


def flash_attn_unavailable(device: torch.device | str, block_size: int, dtype: torch.dtype | str) -> str | None:
    """None when the flash_attn backend can run with these settings, else every reason it cannot, each saying what
    to change. Touches no CUDA device, so it is safe to call while validating a configuration."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype != "auto" else torch.bfloat16  # auto = bfloat16 on a GPU
    reasons = []
    if device.type != "cuda":
        reasons.append(f"device {str(device)!r} is not CUDA: flash-attn runs only on NVIDIA GPUs (use device='cuda', "
                       f"or attention_backend='torch' elsewhere)")
    if dtype not in FLASH_DTYPES:
        name = str(dtype).removeprefix("torch.")
        reasons.append(f"dtype {name} is not supported: flash-attn computes in float16 or bfloat16 only, there is no "
                       f"float32 (pass dtype='bfloat16' or 'float16')")
    if block_size % FLASH_BLOCK_MULTIPLE:
        reasons.append(f"flash-attn's paged KV needs block_size % {FLASH_BLOCK_MULTIPLE} == 0, got block_size="
                       f"{block_size}: pass block_size={FLASH_BLOCK_MULTIPLE}")
    flash = _import_flash()
    if isinstance(flash, str):
        reasons.append(flash)
    return "; ".join(reasons) or None


def store_kv_slots(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    *, skip_negative: bool = False,
) -> None:
    """Write token t's K and V at flat slot ``slot_mapping[t]`` (``block * block_size + offset``) of the per-layer
    caches ``[num_blocks, block_size, kv_heads, head_dim]`` (strided views of the arena), as
    ``TorchAttentionBackend.store_kv`` does: one index_put into the views, which writes straight into the arena.

    ``skip_negative``: rows with a slot < 0 store nothing (CUDA-graph padding rows carry slot -1). Without a host
    read of the slots: each such row rewrites the slot and value of the first real row (a duplicate write of the
    same value, so the write order does not matter); with no real row at all, every row rewrites slot 0 with the
    value it already holds.
    """
    block_size = k_cache.shape[1]
    if skip_negative and slot_mapping.numel():
        valid = slot_mapping >= 0
        first = torch.argmax(valid.to(torch.int32))  # the first real row, 0 when there is none
        rows = torch.where(valid, torch.arange(valid.numel(), device=valid.device), first)
        slot_mapping, k, v = slot_mapping[rows], k[rows], v[rows]
        none = (slot_mapping < 0)[:, None, None]  # all rows or none, now
        slot_mapping = slot_mapping.clamp_min(0)
        k = torch.where(none, k_cache[0, 0].to(k.dtype), k)
        v = torch.where(none, v_cache[0, 0].to(v.dtype), v)
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def cu_seqlens(seq_lens: torch.Tensor) -> torch.Tensor:
    """[n] lengths -> [n + 1] int32 prefix sums with a leading 0 (flash-attn's cu_seqlens_k), on the device."""
    out = torch.zeros(seq_lens.numel() + 1, dtype=torch.int32, device=seq_lens.device)
    torch.cumsum(seq_lens, 0, dtype=torch.int32, out=out[1:])
    return out


_KVCACHE_SYNCS: dict[torch.device, bool] = {}


def kvcache_syncs_host(flash: SimpleNamespace, device: torch.device) -> bool:
    """Whether this flash-attn's paged ``flash_attn_with_kvcache`` reads device data on the host (see the module
    docstring). One tiny call under torch's sync debug mode "error", which raises at the sync instead of doing it;
    the mode is process-wide, so this runs when the first backend is built, before swap threads use CUDA."""
    if device not in _KVCACHE_SYNCS:
        head_dim = 64
        q = torch.zeros(1, 1, 1, head_dim, dtype=torch.float16, device=device)
        cache = torch.zeros(1, FLASH_BLOCK_MULTIPLE, 1, head_dim, dtype=torch.float16, device=device)
        seqlens = torch.ones(1, dtype=torch.int32, device=device)
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            flash.kvcache(q, cache, cache, cache_seqlens=seqlens, block_table=table, causal=True)
            syncs = False
        except RuntimeError as exc:
            if "synchroniz" not in str(exc):
                raise ValueError(f"flash-attn {flash.version} failed on a minimal paged call: {exc}") from exc
            syncs = True
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(device)
        _KVCACHE_SYNCS[device] = syncs
    return _KVCACHE_SYNCS[device]


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(
        self, kv_arena: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, *,
        decode_kernel: str = "auto", graph_batch_size: int | None = None,
    ) -> None:
        """``decode_kernel``: kvcache (``flash_attn_with_kvcache``), varlen (the paged varlen kernel) or auto
        (kvcache unless this flash-attn syncs the host in it). ``graph_batch_size`` marks a backend built by
        ``for_cuda_graph``: padding rows (slot < 0) store nothing."""
        super().__init__(kv_arena, num_heads, num_kv_heads, head_dim)
        if kv_arena.dim() != 6:
            raise ValueError(f"the KV arena must be [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], "
                             f"got shape {tuple(kv_arena.shape)}")
        reason = flash_attn_unavailable(kv_arena.device, self.block_size, kv_arena.dtype)
        if reason is not None:
            raise ValueError(f"attention_backend='flash_attn' cannot run: {reason}")
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel={decode_kernel!r} is invalid: choose one of {DECODE_KERNELS}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"head_dim={head_dim} is not supported by flash-attn without copying the cache on every "
                             f"call: it needs a multiple of 8, at most 256; use attention_backend='triton'")
        k_cache, v_cache = self.layer_cache(0)
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError(f"flash-attn needs head_dim contiguous in the KV arena (stride(-1) == 1), got arena "
                             f"strides {kv_arena.stride()}: allocate the arena contiguous")
        device = kv_arena.device
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 0):
                raise ValueError(f"flash-attn needs an Ampere or newer GPU (compute capability >= 8.0), this one is "
                                 f"{capability[0]}.{capability[1]}: use attention_backend='triton'")
        self.flash = _load_flash()
        if decode_kernel == "auto":
            syncs = device.type == "cuda" and kvcache_syncs_host(self.flash, device)
            decode_kernel = "varlen" if syncs else "kvcache"
        self.decode_kernel = decode_kernel
        self.graph_batch_size = graph_batch_size
        self._cu_seqlens_k: tuple[AttentionMetadata, torch.Tensor] | None = None  # per step, shared by all layers

    def for_cuda_graph(self, batch_size: int, max_seq_len: int) -> FlashAttnBackend:
        """Nothing to set aside: flash-attn's split-KV partials come from torch's allocator, which serves them from
        the graph's pool while capturing. The grid follows the block table's width (kvcache) or
        ``meta.max_seq_len`` (varlen), which ``DecodeGraphs`` fixes at the capture size."""
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"a CUDA graph needs batch_size >= 1 and max_seq_len >= 1, got {batch_size} and "
                             f"{max_seq_len}")
        return FlashAttnBackend(self.kv_arena, self.num_heads, self.num_kv_heads, self.head_dim,
                                decode_kernel=self.decode_kernel, graph_batch_size=batch_size)

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_cache, v_cache = self.layer_cache(layer)
        store_kv_slots(k_cache, v_cache, k, v, slot_mapping, skip_negative=self.graph_batch_size is not None)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if q.dtype != self.kv_arena.dtype:
            raise ValueError(f"flash-attn needs the query in the KV cache's dtype {self.kv_arena.dtype}, got {q.dtype}")
        self.store_kv(layer, k, v, meta.slot_mapping)
        k_cache, v_cache = self.layer_cache(layer)
        if meta.decode_only and self.decode_kernel == "kvcache":
            out = self.flash.kvcache(
                q.contiguous().unsqueeze(1),  # [seqs, 1, heads, head_dim]: one query token per sequence
                k_cache, v_cache,
                cache_seqlens=meta.seq_lens,  # int32, the new token included (stored above)
                block_table=meta.block_tables,
                softmax_scale=self.scale,
                causal=True,
            )
            return out.squeeze(1)
        # causal with more keys than queries is aligned bottom-right: query row r of a chunk of q_len sits at
        # position seq_len - q_len + r, as the metadata defines
        return self.flash.varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=self._cu_seqlens_k_of(meta),
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            block_table=meta.block_tables,
        )

    def _cu_seqlens_k_of(self, meta: AttentionMetadata) -> torch.Tensor:
        # every layer of an eager step sees the same metadata object: one prefix sum per step, not one per layer
        # (the reference to ``meta`` keeps its id from being reused by a later step's object). A graph's backend
        # recomputes it in every layer: its metadata is one set of static buffers refilled before each replay,
        # so a sum cached outside the capture would go stale; inside the graph the sum costs no launch
        if self.graph_batch_size is not None:
            return cu_seqlens(meta.seq_lens)
        if self._cu_seqlens_k is None or self._cu_seqlens_k[0] is not meta:
            self._cu_seqlens_k = (meta, cu_seqlens(meta.seq_lens))
        return self._cu_seqlens_k[1]
