"""The device KV arena of one rank, and how many blocks fit in the memory the engine may use."""

from __future__ import annotations

import math
import pickle

import torch

from fs_engine.config import CacheConfig
from fs_engine.kv.layout import KVLayout

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB when the user names no size on a CPU-only machine


def allocate_kv_arena(
    layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device, shared_path: str | None = None
) -> torch.Tensor:
    """The device arena; with ``shared_path`` on a CPU, a shared-memory file another process (the swap
    process) maps too."""
    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    # zeros, not empty: attention reads whole blocks, including the unwritten tail of a request's last
    # block; those slots are masked out of the softmax, but recycled memory holding NaN would still turn
    # 0 * NaN into NaN in probs @ V (a new shared-memory file is zero-filled too)
    shape = layout.arena_shape(num_blocks)
    if shared_path is not None and device.type == "cpu":
        return torch.from_file(shared_path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


def describe_arena(arena: torch.Tensor, shared_path: str | None) -> dict:
    """How another process opens this arena: the shared-memory file on a CPU, a CUDA IPC handle on a GPU."""
    spec = {"shape": list(arena.shape), "dtype": str(arena.dtype).removeprefix("torch.")}
    if arena.is_cuda:
        spec.update(kind="cuda_ipc", device=arena.device.index or 0,
                    handle=pickle.dumps(arena.untyped_storage()._share_cuda_()))
    else:
        assert shared_path is not None, "a CPU arena must live in shared memory to be opened elsewhere"
        spec.update(kind="file", path=shared_path)
    return spec


def open_arena(spec: dict) -> torch.Tensor:
    """The arena another process described with ``describe_arena``, mapped into this one."""
    dtype = getattr(torch, spec["dtype"])
    shape = tuple(spec["shape"])
    if spec["kind"] == "file":
        return torch.from_file(spec["path"], shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    torch.cuda.set_device(spec["device"])
    storage = torch.UntypedStorage._new_shared_cuda(*pickle.loads(spec["handle"]))
    return torch.empty(0, dtype=dtype, device=f"cuda:{spec['device']}").set_(storage).view(shape)


def allocate_host_arena(layout: KVLayout, num_blocks: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Host arena for swapped-out KV, same block layout as the device arena. Pinned (page-locked) when a
    CUDA device will copy to it, so each run moves with one DMA; pin_memory() raises without CUDA."""
    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; every block is written (swap-out)
    # before it is read (swap-in), so no zeroing is needed
    return torch.empty(layout.arena_shape(num_blocks), dtype=dtype, pin_memory=pin and torch.cuda.is_available())


def num_host_blocks(cache: CacheConfig, layout: KVLayout, max_useful_blocks: int) -> int:
    if cache.num_cpu_blocks is not None:
        return cache.num_cpu_blocks
    return min(layout.num_blocks_for_bytes(int(cache.cpu_kv_gb * (1 << 30))), max_useful_blocks)


def kv_budget_bytes(cache: CacheConfig, device: torch.device) -> int:
    """Bytes the KV arena may take, after the weights (and activations) are already resident."""
    if cache.kv_cache_memory_gb is not None:
        return int(cache.kv_cache_memory_gb * (1 << 30))
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    used_now = total - free  # weights, CUDA context, other processes
    # ModelRunner.profile_run ran the largest step; its activations came and went, but they will again
    activation_peak = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    used_by_others_and_us = used_now + activation_peak
    budget = int(total * cache.gpu_memory_utilization) - used_by_others_and_us
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {used_by_others_and_us / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
            f"are in use; raise gpu_memory_utilization or use a smaller model"
        )
    return budget


def num_kv_blocks(cache: CacheConfig, layout: KVLayout, device: torch.device, max_useful_blocks: int) -> int:
    """Blocks for the arena: the explicit ``num_gpu_blocks`` if given, else what the memory budget holds,
    capped at ``max_useful_blocks`` (every sequence slot at full context) so small models stay small."""
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks
    num_blocks = min(layout.num_blocks_for_bytes(kv_budget_bytes(cache, device)), max_useful_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"the KV memory budget does not hold one block of {layout.block_bytes} bytes; "
            f"raise kv_cache_memory_gb or gpu_memory_utilization"
        )
    return num_blocks
