"""Attention backends behind one interface (``AttentionBackend``); ``get_backend`` picks one.

``torch`` is the reference and runs anywhere; ``triton`` (paged FlashAttention-style kernels) is the default
on CUDA; ``flash_attn`` needs the package, a float16/bfloat16 model and ``block_size`` a multiple of 256.
The GPU backends import their packages only when built, so listing them costs nothing.
"""

from __future__ import annotations

import torch

from workers.attention.backend import AttentionBackend, AttentionMetadata
from workers.attention.flash_attn_backend import FlashAttnBackend, flash_attn_unavailable
from workers.attention.torch_backend import TorchAttentionBackend
from workers.attention.triton_backend import TritonAttentionBackend, triton_unavailable

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "triton": TritonAttentionBackend,
    "flash_attn": FlashAttnBackend,
}


def unavailable_reason(name: str, device: torch.device, block_size: int, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run with these settings (saying what to change), or None."""
    if name == "triton":
        return triton_unavailable(device)
    if name == "flash_attn":
        return flash_attn_unavailable(device, block_size, dtype)
    return None


def get_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype) -> type[AttentionBackend]:
    """The backend class for ``attention_backend=name``. ``auto``: on CUDA, flash_attn where it can run, else
    triton; elsewhere (or without Triton) the torch reference. A named backend that cannot run is an error."""
    if name == "auto":
        if device.type == "cuda":
            name = next((n for n in ("flash_attn", "triton") if unavailable_reason(n, device, block_size, dtype) is None),
                        "torch")
        else:
            name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    reason = unavailable_reason(name, device, block_size, dtype)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r} cannot run here: {reason}")
    return BACKENDS[name]


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "FlashAttnBackend", "TorchAttentionBackend",
           "TritonAttentionBackend", "get_backend"]
