"""Attention backends behind one interface (``AttentionBackend``); ``get_backend`` picks one by name."""

from __future__ import annotations

import torch

from workers.attention.backend import AttentionBackend, AttentionMetadata
from workers.attention.torch_backend import TorchAttentionBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def get_backend(name: str, device: torch.device) -> type[AttentionBackend]:
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not available; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "get_backend"]
