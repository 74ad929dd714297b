"""Moves KV blocks between a device arena and a host arena of the same block layout.

A copy command is a list of runs ``(src_start, dst_start, num_blocks)``. How many copy calls a run costs
is the ``copy_granularity`` setting, so the ablation compares the three patterns on one code base:

- ``group``: one call per run. Consecutive blocks are one contiguous byte range of the block-major arena
  (``[blocks, layers, 2, block_size, kv_heads, head_dim]``), so a run of n blocks is one memcpy.
- ``block``: one call per block (all layers of a block are contiguous).
- ``block_layer``: one call per block, per layer, per K/V: vLLM v0's pattern of small copies.

This copier is synchronous: it returns when the bytes have moved. The asynchronous swap manager runs the
same copies on dedicated streams and threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GRANULARITIES = ("group", "block", "block_layer")

Run = tuple[int, int, int]  # (src_start, dst_start, num_blocks)


@dataclass
class CopyStats:
    calls: int = 0
    bytes: int = 0


class KVCopier:
    def __init__(self, device_arena: torch.Tensor, host_arena: torch.Tensor, granularity: str = "group") -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"copy_granularity={granularity!r} is invalid: choose one of {GRANULARITIES}")
        if device_arena.shape[1:] != host_arena.shape[1:] or device_arena.dtype != host_arena.dtype:
            raise ValueError("device and host KV arenas must share the block layout and dtype")
        self.device_arena = device_arena
        self.host_arena = host_arena
        self.granularity = granularity
        self.block_bytes = device_arena[0].numel() * device_arena.element_size()

    def swap_out(self, runs: list[Run]) -> CopyStats:
        """Device -> host; runs are (device_start, host_start, n)."""
        return self._copy(self.device_arena, self.host_arena, runs)

    def swap_in(self, runs: list[Run]) -> CopyStats:
        """Host -> device; runs are (host_start, device_start, n)."""
        return self._copy(self.host_arena, self.device_arena, runs)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run]) -> CopyStats:
        stats = CopyStats()
        non_blocking = src.device != dst.device
        if not (src.is_cuda or dst.is_cuda):
            # host to host: copy the bytes with numpy (one memcpy, GIL released). A torch copy from a copy
            # thread would start a second OpenMP team beside the forward pass's, and on a machine with few
            # cores the two teams' spinning threads slow every step
            src, dst = _host_bytes(src), _host_bytes(dst)
        for src_start, dst_start, n in runs:
            stats.bytes += n * self.block_bytes
            if self.granularity == "group":
                _assign(dst[dst_start : dst_start + n], src[src_start : src_start + n], non_blocking)
                stats.calls += 1
            elif self.granularity == "block":
                for i in range(n):
                    _assign(dst[dst_start + i], src[src_start + i], non_blocking)
                stats.calls += n
            else:
                num_layers = src.shape[1]
                for i in range(n):
                    for layer in range(num_layers):
                        for kv in range(2):
                            _assign(dst[dst_start + i, layer, kv], src[src_start + i, layer, kv], non_blocking)
                stats.calls += n * num_layers * 2
        if non_blocking and (src.is_cuda or dst.is_cuda):
            torch.cuda.current_stream().synchronize()  # synchronous copier: the bytes have landed on return
        return stats


def _host_bytes(arena: torch.Tensor) -> np.ndarray:
    """A host arena as a numpy array of bytes, same leading (block) dimensions."""
    return arena.view(torch.uint8).numpy()


def _assign(dst, src, non_blocking: bool) -> None:
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src)
    else:
        dst.copy_(src, non_blocking=non_blocking)
