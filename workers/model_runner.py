"""Executes step plans on one rank: builds the batch tensors, runs the model, samples.

It keeps, per request, what sampling needs (``SamplingSpec``) and its block table (``InputBatch``), which
plans update with diffs; the frontend stays the single owner of request state and decides every change.
"""

from __future__ import annotations

import time

import torch

from fs_engine.kv.layout import KVLayout
from fs_engine.model_config import ModelArch
from ipc.messages import SamplingSpec, ScheduledChunk, StepPlan, StepResult
from workers.attention import get_backend
from workers.cuda_graphs import DecodeGraphs
from workers.input_batch import InputBatch
from workers.kv_arena import allocate_host_arena, allocate_kv_arena
from workers.loader import load_model
from workers.models import ForwardContext
from workers.parallel import SINGLE, TPContext
from workers.sampler import Sampler
from workers.swap.copier import KVCopier
from workers.swap.swap_manager import SwapManager


class ModelRunner:
    def __init__(
        self,
        model_dir: str,
        arch: ModelArch,
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        attention_backend: str,
        seed: int,
        tp: TPContext = SINGLE,
        load_format: str = "auto",
        enforce_eager: bool = True,
        max_graph_batch_size: int = 0,
        max_model_len: int = 0,
    ) -> None:
        """CUDA graphs for decode steps are captured when the device is CUDA, ``enforce_eager`` is off and the
        attention backend supports them, for batches up to ``max_graph_batch_size`` of up to ``max_model_len``
        tokens."""
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.tp = tp
        self.model = load_model(model_dir, arch, dtype, device, tp, load_format=load_format, seed=seed)
        self.sampler = Sampler(seed, device)
        self.backend_cls = get_backend(attention_backend, device, block_size, dtype)
        self.attn = None  # bound to the arena by init_kv_cache
        self.kv_arena: torch.Tensor | None = None
        self.host_arena: torch.Tensor | None = None
        self.swaps: SwapManager | None = None
        captured = device.type == "cuda" and not enforce_eager and self.backend_cls.supports_cuda_graphs
        self.graph_batch_size = max_graph_batch_size if captured else 0  # 0: every step runs eagerly
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None
        self._specs: dict[str, SamplingSpec] = {}
        self.batch = InputBatch(block_size, self._max_blocks_per_seq(), device)
        num_heads = arch.num_heads // tp.size
        self.num_heads = num_heads
        self.num_kv_heads = max(1, arch.num_kv_heads // tp.size)

    def _max_blocks_per_seq(self) -> int:
        return max(1, -(-self.max_model_len // self.block_size))

    def kv_layout(self, dtype_name: str) -> KVLayout:
        return KVLayout(self.arch.num_layers, self.block_size, self.num_kv_heads, self.arch.head_dim, dtype_name)

    def init_kv_cache(
        self, layout: KVLayout, num_blocks: int, num_host_blocks: int, granularity: str, swap_threads: int,
        shared_path: str | None = None,
    ) -> None:
        """``num_host_blocks=0``: no host arena here (none at all, or the swap process owns it)."""
        self.kv_arena = allocate_kv_arena(layout, num_blocks, self.dtype, self.device, shared_path)
        self.attn = self.backend_cls(self.kv_arena, self.num_heads, self.num_kv_heads, self.arch.head_dim)
        if self.graph_batch_size > 0:
            self.graphs = DecodeGraphs(self.model, self.attn, max_batch_size=self.graph_batch_size,
                                       max_blocks_per_seq=self._max_blocks_per_seq(),
                                       block_size=self.block_size)
            self.graphs.capture()
        if num_host_blocks > 0:
            pin = self.device.type == "cuda"
            self.host_arena = allocate_host_arena(layout, num_host_blocks, self.dtype, pin)
            self.swaps = SwapManager(KVCopier(self.kv_arena, self.host_arena, granularity), swap_threads)

    def shutdown(self) -> None:
        if self.swaps is not None:
            self.swaps.shutdown()

    @torch.inference_mode()
    def profile_run(self, layout: KVLayout, num_tokens: int) -> None:
        """Run the largest step the scheduler can plan (one prefill of ``num_tokens``) against a throwaway
        arena, so the allocator's peak includes activations before the real arena is sized."""
        num_blocks = -(-num_tokens // self.block_size)
        arena = allocate_kv_arena(layout, num_blocks, self.dtype, self.device)
        attn = self.backend_cls(arena, self.num_heads, self.num_kv_heads, self.arch.head_dim)
        chunk = ScheduledChunk("profile", [0] * num_tokens, 0, list(range(num_blocks)), sample=True)
        inputs = InputBatch(self.block_size, num_blocks, self.device, num_rows=1).prepare(StepPlan(0, [chunk]))
        hidden = self.model(inputs.token_ids, inputs.positions, ForwardContext(attn, inputs.meta))
        self.model.compute_logits(hidden[inputs.sample_rows])
        del arena, attn, hidden

    # ---- one step ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        # forget finished requests first: a finished id may be reused by a new request in the same plan
        for request_id in plan.finished_ids:
            self._specs.pop(request_id, None)
        for new in plan.new_requests:
            self._specs[new.request_id] = new.sampling
        result = StepResult(step_id=plan.step_id)
        if plan.swaps:
            self._swap(plan, result)
        inputs = self.batch.prepare(plan)
        if inputs is not None:
            meta = inputs.meta
            if self.graphs is not None and self.graphs.can_run(meta):
                hidden = self.graphs.run(inputs.token_ids, inputs.positions, meta)
            else:
                hidden = self.model(inputs.token_ids, inputs.positions, ForwardContext(self.attn, meta))
            sampled = [(r, i) for r, i in zip(plan.request_ids, plan.sample_index) if i >= 0]
            if sampled:
                logits = self.model.compute_logits(hidden[inputs.sample_rows])
                result.request_ids = [r for r, _ in sampled]
                result.token_ids = self.sampler(logits, [self._specs[r] for r in result.request_ids],
                                                [i for _, i in sampled])
        if self.swaps is not None:
            if not plan.request_ids and not result.swap_wait_s and self.swaps.num_in_flight:
                # nothing to compute: the engine waits for copies, so block on one instead of spinning
                result.swap_wait_s += self.swaps.wait_any(timeout_s=1.0)
            result.swaps_done = self.swaps.poll()
        result.execute_s = time.perf_counter() - start
        return result

    def _swap(self, plan: StepPlan, result: StepResult) -> None:
        # swap-outs first: a waited swap-out's device blocks may be handed to a swap-in or to new KV in this
        # same plan (StepPlan's contract), so it must have landed before either starts
        if self.swaps is None:
            raise RuntimeError("the plan swaps KV but this worker has no host arena (num_cpu_blocks=0)")
        for kind in ("out", "in"):
            commands = [c for c in plan.swaps if c.kind == kind]
            for command in commands:
                self.swaps.submit(command)
            result.swap_wait_s += self.swaps.wait([c.swap_id for c in commands if c.wait])
