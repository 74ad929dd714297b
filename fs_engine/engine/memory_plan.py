"""What a deployment holds per tensor-parallel rank, before anything starts: ``fs-engine launch --dry-run GPU``.

Per rank: the weights (exact: the sharded model is built on the meta device and its parameters counted), the
activation reserve of the largest step (the simulated device's rule, which is what the worker's profile run
measures on a GPU) and the runtime's overhead, the KV arena that the rest of ``gpu_memory_utilization`` of the
GPU's memory holds (blocks, and tokens: every rank holds its share of every block, so the tokens resident
are the same on each rank and for the engine), the host arena, and what one request's context switch moves
and takes over that rank's own PCIe link. The GPU is named by its simulated device profile (``a100``,
``h100``, ``h200``): its memory and its PCIe figures (``fs_engine.sim.devices``, from
``../shared/calibration/pcie.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fs_engine.config import EngineConfig
from fs_engine.kv.kv_manager import blocks_for
from fs_engine.kv.layout import DTYPE_BYTES, KVLayout
from fs_engine.model_config import ModelArch
from fs_engine.sim.cost_model import CostModel, ModelShape, copy_calls
from fs_engine.sim.devices import get_profile
from fs_engine.sim.executor import activation_bytes

GIB = 1 << 30


@dataclass(frozen=True)
class RankPlan:
    gpu: str
    tp: int
    dtype: str
    gpu_memory_bytes: int
    weight_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_block_bytes: int  # one block's K and V of every layer, this rank's heads
    num_blocks: int
    capped: bool  # the arena holds every sequence slot at full context: more memory would stay unused
    block_size: int
    host_blocks: int
    switch_tokens: int  # the context whose switch is costed below
    switch_bytes: int  # one direction, this rank
    switch_s: float  # one direction over this rank's link, with group copies (one copy per run)

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / GIB:6.2f} GiB"  # noqa: E731
        return [
            f"per rank of {self.tp} ({self.gpu}, {gib(self.gpu_memory_bytes).strip()}, {self.dtype}):",
            f"  weights          {gib(self.weight_bytes)}",
            f"  activations      {gib(self.activation_bytes)}  (largest step) + {gib(self.overhead_bytes).strip()} runtime",
            f"  KV arena         {gib(self.num_blocks * self.kv_block_bytes)}  {self.num_blocks} blocks of "
            f"{self.kv_block_bytes / 1024:.0f} KiB = {self.kv_tokens} tokens resident"
            + (" (capped: max_num_seqs x max_model_len)" if self.capped else ""),
            f"  host arena       {gib(self.host_blocks * self.kv_block_bytes)}  {self.host_blocks} blocks",
            f"  context switch   {self.switch_tokens} tokens: {self.switch_bytes / 2**20:.1f} MiB each way, "
            f"{self.switch_s * 1e3:.2f} ms over this rank's PCIe link (all ranks at once)",
        ]


def sharded_weight_bytes(arch: ModelArch, tp: int, dtype_bytes: int) -> int:
    """Parameter bytes of one rank (rank 0; a padded vocabulary makes every rank the same)."""
    from workers.models import build_model
    from workers.parallel import TPContext

    with torch.device("meta"):
        model = build_model(arch, TPContext(0, tp))
    seen, total = set(), 0
    for param in model.parameters():  # tied embeddings count once
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * dtype_bytes
    return total


def memory_plan(config: EngineConfig, arch: ModelArch, max_model_len: int, gpu: str,
                switch_tokens: int | None = None) -> RankPlan:
    from workers.kv_arena import num_host_blocks

    profile = get_profile(gpu)
    tp = config.parallel.tensor_parallel_size
    dtype = config.model.dtype if config.model.dtype != "auto" else "bfloat16"
    dtype_bytes = DTYPE_BYTES[dtype]
    shape = ModelShape.from_arch(arch, tp)
    cache, sched = config.cache, config.scheduler
    layout = KVLayout(arch.num_layers, cache.block_size, shape.kv_heads, arch.head_dim, dtype)
    weights = sharded_weight_bytes(arch, tp, dtype_bytes)
    activations = activation_bytes(shape, sched.max_num_batched_tokens, sched.max_num_seqs, dtype_bytes)
    max_useful = sched.max_num_seqs * blocks_for(max_model_len, cache.block_size)
    capped = False
    if cache.num_gpu_blocks is not None:
        num_blocks = cache.num_gpu_blocks
    else:
        budget = int(profile.memory_bytes * cache.gpu_memory_utilization) - weights - activations \
            - profile.activation_overhead_bytes
        if budget < layout.block_bytes:
            raise ValueError(
                f"{arch.architecture} at tensor_parallel_size={tp} does not fit one {gpu} "
                f"({profile.memory_bytes / GIB:.0f} GiB) per rank: weights {weights / GIB:.1f} GiB and activations "
                f"{activations / GIB:.1f} GiB leave no room for the KV cache; use more ranks or a larger GPU")
        num_blocks = min(layout.num_blocks_for_bytes(budget), max_useful)
        capped = num_blocks == max_useful
    tokens = min(switch_tokens or max_model_len, max_model_len)
    blocks = blocks_for(tokens, cache.block_size)
    cost = CostModel(profile, shape, kv_dtype_bytes=dtype_bytes)
    switch_bytes = blocks * layout.block_bytes
    # a request's blocks in one run (block groups): one copy per direction
    switch_s = cost.copy_s(copy_calls(config.swap.copy_granularity, [(0, 0, blocks)], arch.num_layers), switch_bytes)
    return RankPlan(gpu, tp, dtype, profile.memory_bytes, weights, activations, profile.activation_overhead_bytes,
                    layout.block_bytes, num_blocks, capped, cache.block_size, num_host_blocks(cache, layout, max_useful),
                    tokens, switch_bytes, switch_s)
