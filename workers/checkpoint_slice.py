"""A checkpoint tensor read lazily: what the weight loaders of a tensor-parallel rank take."""

from __future__ import annotations

import torch


class CheckpointSlice:
    """A checkpoint tensor not read yet. ``narrow`` reads only that slice from the file (safetensors
    slicing), so a tensor-parallel rank never holds more of a sharded matrix than its own part;
    ``materialize`` reads it whole (norms, replicated biases)."""

    def __init__(self, lazy) -> None:
        self._lazy = lazy
        self.shape = torch.Size(lazy.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._lazy[tuple(index)]

    def materialize(self) -> torch.Tensor:
        return self._lazy[:]


def materialize(tensor: torch.Tensor | CheckpointSlice) -> torch.Tensor:
    return tensor.materialize() if isinstance(tensor, CheckpointSlice) else tensor
