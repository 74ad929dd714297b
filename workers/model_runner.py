"""Executes step plans on one rank: builds the batch tensors, runs the model, samples.

It keeps, per request, what sampling needs (``SamplingSpec``) and its block table (``InputBatch``), which
plans update with diffs; the frontend stays the single owner of request state and decides every change.
"""

from __future__ import annotations

import logging
import time

import torch

from fs_engine.kv.layout import KVLayout
from fs_engine.model_config import ModelArch
from ipc.messages import SamplingSpec, ScheduledChunk, StepPlan, StepResult
from workers.attention import get_backend
from workers.compilation import CompiledForward, forward_context, resolve_compile
from workers.cuda_graphs import DecodeGraphs
from workers.device_stream import DeviceStream
from workers.input_batch import InputBatch
from workers.kv_arena import allocate_kv_arena
from workers.loader import load_model
from workers.parallel import SINGLE, TPContext
from workers.sampler import Sampler, SeenTokens

logger = logging.getLogger(__name__)


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
        compile: str = "off",
    ) -> None:
        """CUDA graphs for decode steps are captured when the device is CUDA, ``enforce_eager`` is off and the
        attention backend supports them, for batches up to ``max_graph_batch_size`` of up to ``max_model_len``
        tokens. ``compile`` (auto, on, off): the forward under ``torch.compile``, compiled and warmed up here,
        before the KV arena is sized (``workers.compilation``); the graphs then capture the compiled code."""
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
        captured = device.type == "cuda" and not enforce_eager and self.backend_cls.supports_cuda_graphs
        self.graph_batch_size = max_graph_batch_size if captured else 0  # 0: every step runs eagerly
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None
        self._specs: dict[str, SamplingSpec] = {}
        self._seen: dict[str, SeenTokens] = {}  # requests with penalties: the tokens they apply to
        self.batch = InputBatch(block_size, self._max_blocks_per_seq(), device)
        self.stream = DeviceStream(device)
        self._returned_at: float | None = None  # when the last result was handed back
        num_heads = arch.num_heads // tp.size
        self.num_heads = num_heads
        self.num_kv_heads = max(1, arch.num_kv_heads // tp.size)
        self.forward = self.model  # (token_ids, positions) -> hidden states, inside a forward context
        self.compiled: CompiledForward | None = None
        self.compile_error: str | None = None  # why compile=auto fell back to eager
        if resolve_compile(compile, device):
            self._compile(required=compile == "on")

    # ---- compilation ---------------------------------------------------------------------------------------
    def _compile(self, required: bool) -> None:
        """Compile the forward and warm it up on a throwaway arena: a two-request prefill, then decode steps of
        one and three rows, all through the one compiled graph. A failure is an error with ``compile=on``; with
        ``auto`` the runner stays eager and says why in one line."""
        compiled = CompiledForward(self.model)
        try:
            start = time.perf_counter()
            self._warm_up(compiled)
            compiled.warm_s = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - whatever Dynamo or Inductor raised, the reason is reported
            # (tensor-parallel ranks trace the same code with the same shapes, so they fail alike, before the
            # warm-up's first collective: no rank is left waiting in an all-reduce)
            reason = _root_cause(e)
            if required:
                raise RuntimeError(f"compile=on: the model cannot be compiled ({reason}); use compile=off") from e
            self.compile_error = reason
            logger.warning("compile=auto: running the model eagerly, compilation failed: %s", reason)
            return
        self.compiled, self.forward = compiled, compiled
        self._warm_compilations = compiled.compilations

    @torch.inference_mode()
    def _warm_up(self, forward) -> None:
        layout = self.kv_layout(str(self.dtype).removeprefix("torch."))
        num_blocks = max(3, -(-10 // self.block_size))  # every request's context fits: up to 10 tokens
        table = list(range(num_blocks))
        steps = [[("w0", [1] * 7, 0), ("w1", [2] * 3, 0)], [("w0", [3], 7)], [(f"w{i}", [4], 9) for i in range(3)]]
        arena = allocate_kv_arena(layout, num_blocks, self.dtype, self.device)
        attn = self.backend_cls(arena, self.num_heads, self.num_kv_heads, self.arch.head_dim)
        for step in steps:
            chunks = [ScheduledChunk(request_id, tokens, start, table, sample=True) for request_id, tokens, start in step]
            inputs = InputBatch(self.block_size, num_blocks, self.device, num_rows=len(chunks)).prepare(
                StepPlan(0, chunks))
            with forward_context(attn, inputs.meta):
                forward(inputs.token_ids, inputs.positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def num_compilations(self) -> int:
        return self.compiled.compilations if self.compiled is not None else 0

    def forward_summary(self) -> str:
        """For the start-up line: how the forward runs."""
        if self.compiled is not None:
            c = self.compiled
            return (f"compiled ({c.compilations} graph{'s' if c.compilations != 1 else ''}, warm-up {c.warm_s:.1f} s "
                    f"of which Inductor {c.compile_s:.1f} s)")
        return f"eager (compile failed: {self.compile_error})" if self.compile_error else "eager"

    def _check_no_recompilation(self) -> None:
        if self.compiled is not None and self.compiled.compilations != self._warm_compilations:
            self._warm_compilations = self.compiled.compilations
            logger.warning("the compiled forward recompiled after warm-up (%d compilations now): a step's shapes "
                           "or inputs fell outside the warm-up graph; report it with the step's batch",
                           self.compiled.compilations)

    def _max_blocks_per_seq(self) -> int:
        return max(1, -(-self.max_model_len // self.block_size))

    def kv_layout(self, dtype_name: str) -> KVLayout:
        return KVLayout(self.arch.num_layers, self.block_size, self.num_kv_heads, self.arch.head_dim, dtype_name)

    def init_kv_cache(self, layout: KVLayout, num_blocks: int, shared_path: str | None = None) -> None:
        """The device arena (in a shared-memory file at ``shared_path`` on a CPU, for the swap process).
        Host arenas and copies belong to the frontend's swap executor (``fs_engine.engine.swaps``)."""
        self.kv_arena = allocate_kv_arena(layout, num_blocks, self.dtype, self.device, shared_path)
        self.attn = self.backend_cls(self.kv_arena, self.num_heads, self.num_kv_heads, self.arch.head_dim)
        if self.graph_batch_size > 0:
            self.graphs = DecodeGraphs(self.forward, self.attn, max_batch_size=self.graph_batch_size,
                                       max_blocks_per_seq=self._max_blocks_per_seq(),
                                       block_size=self.block_size)
            self.graphs.capture()

    @torch.inference_mode()
    def profile_run(self, layout: KVLayout, num_tokens: int) -> None:
        """Run the largest step the scheduler can plan (one prefill of ``num_tokens``) against a throwaway
        arena, so the allocator's peak includes activations before the real arena is sized."""
        num_blocks = -(-num_tokens // self.block_size)
        arena = allocate_kv_arena(layout, num_blocks, self.dtype, self.device)
        attn = self.backend_cls(arena, self.num_heads, self.num_kv_heads, self.arch.head_dim)
        chunk = ScheduledChunk("profile", [0] * num_tokens, 0, list(range(num_blocks)), sample=True)
        inputs = InputBatch(self.block_size, num_blocks, self.device, num_rows=1).prepare(StepPlan(0, [chunk]))
        with forward_context(attn, inputs.meta):
            hidden = self.forward(inputs.token_ids, inputs.positions)
        self.model.compute_logits(hidden[inputs.sample_rows])
        del arena, attn, hidden

    # ---- one step ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run a plan's forward pass and sample. Returns only once the step's device work has completed
        (safety rule 1): the frontend may issue copies of these blocks as soon as it holds the result."""
        start = time.perf_counter()
        # forget finished requests first: a finished id may be reused by a new request in the same plan
        for request_id in plan.finished_ids:
            self._specs.pop(request_id, None)
            self._seen.pop(request_id, None)
        for new in plan.new_requests:
            self._specs[new.request_id] = new.sampling
            if new.sampling.penalized:
                self._seen[new.request_id] = SeenTokens(new.prompt_token_ids, self.device)
        if plan.swaps:
            raise RuntimeError("workers do not copy KV: the engine's swap executor runs a plan's swaps")
        result = StepResult(step_id=plan.step_id)
        result.idle_s = 0.0 if self._returned_at is None else start - self._returned_at
        # a decode step the graphs can replay: its inputs stay on the host (pinned) and are copied straight into
        # the graphs' static buffers, one copy each
        graphed = self.graphs is not None and self.graphs.can_run_plan(plan)
        inputs = self.batch.prepare(plan, torch.device("cpu") if graphed else None)
        if inputs is not None:
            meta = inputs.meta
            if graphed:
                hidden = self.graphs.run(inputs.token_ids, inputs.positions, meta)
            else:
                with forward_context(self.attn, meta):
                    hidden = self.forward(inputs.token_ids, inputs.positions)
            self.stream.launched(plan.step_id)
            sampled = [(r, i) for r, i in zip(plan.request_ids, plan.sample_index) if i >= 0]
            if sampled:
                logits = self.model.compute_logits(hidden[inputs.sample_rows])
                result.request_ids = [r for r, _ in sampled]
                specs = [self._specs[r] for r in result.request_ids]
                seen = [self._seen.get(r) for r in result.request_ids] if self._seen else None
                result.token_ids = self.sampler(logits, specs, [i for _, i in sampled], seen)
                for tokens, token in zip(seen or (), result.token_ids):
                    if tokens is not None:
                        tokens.add(token)
                result.logprob_ids, result.logprob_values = self.sampler.logprobs(logits, specs, result.token_ids)
                self.batch.record_sampled(inputs.sampled_table_rows, result.token_ids)
            # a step that samples nothing (a long prompt's middle chunk) would return with its kernels still
            # queued; after sampling the stream is idle already and this costs nothing
            self.stream.synchronize()
        self._check_no_recompilation()
        result.num_compilations = self.num_compilations
        self._returned_at = time.perf_counter()
        result.execute_s = self._returned_at - start
        return result


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost exception (Dynamo wraps what its backend raised)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
