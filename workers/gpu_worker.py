"""One rank's worker: picks its device, loads its shard of the model, owns its KV arena, executes plans.

The in-process executor calls it directly; the multi-process engine wraps the same object in a process
that reads plans from a socket.
"""

from __future__ import annotations

import torch

from fs_engine.config import EngineConfig
from fs_engine.kv.kv_manager import blocks_for
from fs_engine.kv.layout import KVLayout
from fs_engine.model_config import ModelArch
from ipc.messages import StepPlan, StepResult
from workers.kv_arena import allocate_host_arena, describe_arena, num_host_blocks, num_kv_blocks
from workers.model_runner import ModelRunner
from workers.parallel import SINGLE, TPContext

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available; use device='cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArch,
        max_model_len: int,
        tp: TPContext = SINGLE,
        shared_dir: str | None = None,
    ) -> None:
        """``shared_dir``: the multi-process layout. The device arena is shared with the swap process (a
        shared-memory file there on a CPU, a CUDA IPC handle on a GPU). A worker never owns a host arena."""
        self.config = config
        self.shared_dir = shared_dir
        self.arch = arch
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device.device)
        if self.device.type == "cuda":
            if self.device.index is None and tp.size > 1:  # one device per rank (this machine's ranks)
                self.device = torch.device("cuda", tp.rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device.index or 0)
        self.dtype_name = resolve_dtype(config.model.dtype, self.device)
        self.tp = tp
        self.runner = ModelRunner(
            config.model.model,
            arch,
            dtype=TORCH_DTYPES[self.dtype_name],
            device=self.device,
            block_size=config.cache.block_size,
            attention_backend=config.device.attention_backend,
            seed=config.model.seed,
            load_format=config.model.load_format,
            tp=tp,
            enforce_eager=config.device.enforce_eager,
            max_graph_batch_size=min(config.device.max_graph_batch_size, config.scheduler.max_num_seqs),
            max_model_len=max_model_len,
            compile=config.device.compile,
        )
        self.layout: KVLayout = self.runner.kv_layout(self.dtype_name)
        self.num_blocks = 0

    def init_kv_cache(self) -> tuple[int, int]:
        """Size and allocate the device and host KV arenas; returns their block counts (the frontend manages
        the blocks)."""
        if self.device.type == "cuda" and self.config.cache.num_gpu_blocks is None:
            # measure the activation peak of the largest step, so the arena leaves room for it
            self.runner.profile_run(self.layout, self.config.scheduler.max_num_batched_tokens)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        per_seq = blocks_for(self.max_model_len, self.layout.block_size)
        max_useful = self.config.scheduler.max_num_seqs * per_seq
        self.num_blocks = num_kv_blocks(self.config.cache, self.layout, self.device, max_useful)
        self.num_host_blocks = num_host_blocks(self.config.cache, self.layout, max_useful)
        if self.tp.size > 1:  # the frontend manages one block space for every rank: the smallest rank's
            self.num_blocks, self.num_host_blocks = self.tp.all_reduce_min([self.num_blocks, self.num_host_blocks])
        self.shared_path = f"{self.shared_dir}/kv-rank{self.tp.rank}.bin" if self.shared_dir else None
        self.runner.init_kv_cache(self.layout, self.num_blocks, self.shared_path)
        return self.num_blocks, self.num_host_blocks

    def host_arena(self) -> torch.Tensor:
        """A host arena of ``num_host_blocks`` in this arena's layout, for an in-process swap executor (pinned
        when a GPU copies to it)."""
        return allocate_host_arena(self.layout, self.num_host_blocks, self.runner.dtype, self.device.type == "cuda")

    def arena_spec(self) -> dict:
        return describe_arena(self.runner.kv_arena, self.shared_path)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        """Nothing to release but memory (the swap executor owns the copy threads)."""
