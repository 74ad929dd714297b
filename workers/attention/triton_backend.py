"""Paged FlashAttention-style attention in Triton (the kernels live in ``triton_kernels``).

Decode-only steps run the split-KV decode kernel (one query token per sequence, the context split across
programs so that a lone long request still fills the GPU); every other step runs the varlen causal prefill
kernel, which also covers chunked prefill and the one-token rows of mixed steps.

Triton is imported lazily, when a backend is built, so that listing this backend costs nothing where Triton
is missing; ``triton_unavailable`` says whether (and why not) it can run on a device.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

from workers.attention.backend import AttentionBackend, AttentionMetadata


def triton_unavailable(device: torch.device | str) -> str | None:
    """None when the Triton backend can run on ``device``, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (it ships with CUDA builds of torch)"
    if torch.device(device).type != "cpu":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("on CPU the Triton kernels run only in Triton's interpreter, which is for tests: "
                "set TRITON_INTERPRET=1 before starting, or use attention_backend='torch'")
    if "triton" in sys.modules and not _interpreting():
        return ("triton was imported before TRITON_INTERPRET=1 was set (transformers imports it through "
                "torch._dynamo), so its library functions are compiled-only: set it before anything imports triton")
    return None


def _interpreting() -> bool:
    """Whether triton's own @jit library functions were built for the interpreter (decided at triton's import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(
        self, kv_arena: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, *,
        decode_num_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
    ) -> None:
        """``decode_num_splits`` fixes the decode split count (CUDA graphs need one fixed grid; None = chosen per
        step from batch size and context length); ``block_m`` / ``block_n`` override the tile sizes (tests use 16
        to cross tile boundaries on short sequences)."""
        super().__init__(kv_arena, num_heads, num_kv_heads, head_dim)
        reason = triton_unavailable(kv_arena.device)
        if reason is not None:
            raise RuntimeError(f"attention_backend='triton' cannot run: {reason}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        from workers.attention import triton_kernels  # after the TRITON_INTERPRET check: jit reads it at import

        self.kernels = triton_kernels
        self.decode_num_splits = decode_num_splits
        self.block_m = block_m
        self.block_n = block_n
        device = kv_arena.device
        # on CPU (interpreter tests) only the split heuristic reads it: plan as for an H100
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        # split-KV partials, shared by all layers (they run one after another) and grown, never shrunk
        self._workspace = torch.empty(0, dtype=torch.float32, device=device)

    def for_cuda_graph(self, batch_size: int, max_seq_len: int) -> TritonAttentionBackend:
        """A backend on the same arena whose decode grid is fixed: num_splits chosen now for ``batch_size`` rows of
        up to ``max_seq_len`` tokens (each replay computes its splits' shares from the device seq_lens), and the
        split partials' workspace allocated now. Graphs never replay concurrently, so they share this backend's
        buffer; when one needs more, the buffer is replaced here, and earlier graphs keep the old one alive."""
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"a CUDA graph needs batch_size >= 1 and max_seq_len >= 1, got {batch_size} and "
                             f"{max_seq_len}")
        num_splits = self.decode_num_splits or self.kernels.choose_num_splits(
            batch_size, self.num_kv_heads, max_seq_len, self.num_sms)
        graph = TritonAttentionBackend(self.kv_arena, self.num_heads, self.num_kv_heads, self.head_dim,
                                       decode_num_splits=num_splits, block_m=self.block_m, block_n=self.block_n)
        self.decode_workspace(batch_size, num_splits)  # grows this backend's buffer if needed
        graph._workspace = self._workspace
        return graph

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_cache, v_cache = self.layer_cache(layer)
        self.kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.store_kv(layer, k, v, meta.slot_mapping)
        k_cache, v_cache = self.layer_cache(layer)
        if meta.decode_only:
            num_splits = self.decode_num_splits or self.kernels.choose_num_splits(
                q.shape[0], self.num_kv_heads, meta.max_seq_len, self.num_sms)
            return self.kernels.decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale=self.scale, num_splits=num_splits,
                workspace=self.decode_workspace(q.shape[0], num_splits), block_n=self.block_n,
            )
        return self.kernels.prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            max_query_len=meta.max_query_len, scale=self.scale, block_m=self.block_m, block_n=self.block_n,
        )

    def decode_workspace(self, num_seqs: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the reused buffer: partial outputs [seqs, heads, splits, head_dim], lse [seqs, heads, splits].

        The buffer grows by replacement, never in place: a CUDA graph captured on the old one (its backend
        holds a reference, see ``for_cuda_graph``) keeps reading valid memory.
        """
        out_shape, lse_shape = self.kernels.decode_workspace_shapes(num_seqs, self.num_heads, num_splits, self.head_dim)
        out_numel, lse_numel = math.prod(out_shape), math.prod(lse_shape)
        if self._workspace.numel() < out_numel + lse_numel:
            self._workspace = torch.empty(out_numel + lse_numel, dtype=torch.float32, device=self._workspace.device)
        return (self._workspace[:out_numel].view(out_shape),
                self._workspace[out_numel : out_numel + lse_numel].view(lse_shape))
