"""The simulated executor: runs step plans in virtual time against a device's cost model.

It has the executors' interface (``execute``, ``check_health``, ``shutdown``, ``num_blocks``,
``num_cpu_blocks``, ``layout``, ``device``), so ``LLMEngine`` and everything above it (scheduler, KV manager,
CPU store, policies, the benchmark) run unchanged: a simulated run is the production scheduler's behaviour on
that device. Select it with ``device="sim:<gpu>"`` (``a10``, ``a100``, ``h100``, ``h200``, or a profile
written by ``fs-engine bench calibrate``).

A plan is executed in the worker's order (``ipc.messages.StepPlan``): swap-outs are queued on the
device-to-host copy engine and the step waits for those marked ``wait``; then swap-ins, likewise on the
host-to-device engine; then the forward pass, ``CostModel.step_s`` long, stretched by
``copy_interference`` for the share of it during which a copy engine is busy. One engine per direction, FIFO;
while both directions copy, each runs at ``duplex_factor`` of its bandwidth. A command not waited on is
reported in the first result returned at or after its completion, as the real worker's poll does.

Tokens: with ``sim_execute="shapes"`` (the default) no weights are loaded and a sampled token is a fixed
function of the chunk's last token and position, so replies are deterministic and independent of batching
and preemption, like greedy decoding. ``sim_execute="model"`` also runs the real model on this machine's CPU
(with every copy done at once, since the simulated completion comes later anyway), so the replies are the
model's own; the timing stays simulated.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from fs_engine.config import EngineConfig
from fs_engine.kv.kv_manager import blocks_for
from fs_engine.kv.layout import DTYPE_BYTES, KVLayout
from fs_engine.model_config import ModelArch
from fs_engine.sim.clock import VirtualClock
from fs_engine.sim.cost_model import CostModel, ModelShape, StepShape, copy_calls
from fs_engine.sim.devices import SIM_PREFIX, DeviceProfile, get_profile
from ipc.messages import StepPlan, StepResult, SwapCommand, SwapDone


@dataclass
class CopyEngine:
    """One direction's DMA engine: commands run one after another."""

    busy_until: float = 0.0
    busy_s: float = 0.0

    def run(self, submit_t: float, duration_s: float, other: CopyEngine, duplex_factor: float) -> float:
        start = max(submit_t, self.busy_until)
        # the part of this copy that overlaps the other direction's queue runs at duplex_factor of the bandwidth
        overlap = max(0.0, min(start + duration_s, other.busy_until) - start)
        duration_s += overlap * (1.0 / duplex_factor - 1.0)
        self.busy_until = start + duration_s
        self.busy_s += duration_s
        return self.busy_until


def activation_bytes(shape: ModelShape, max_num_batched_tokens: int, max_num_seqs: int, dtype_bytes: int) -> int:
    """Peak activations of the largest step, as the worker's profile run measures them on a GPU: the hidden
    states and MLP intermediates of every token, and float32 logits of every sampled row."""
    per_token = (4 * shape.hidden + 3 * shape.intermediate // shape.tp) * dtype_bytes
    return max_num_batched_tokens * per_token + max_num_seqs * shape.vocab // shape.tp * 4


def simulated_kv_blocks(config: EngineConfig, profile: DeviceProfile, shape: ModelShape, layout: KVLayout,
                        max_model_len: int) -> tuple[int, int]:
    """Device and host KV blocks, sized as ``workers.gpu_worker.Worker.init_kv_cache`` sizes them on a GPU:
    device memory times ``gpu_memory_utilization``, minus weights, activations and the runtime's overhead."""
    from workers.kv_arena import num_host_blocks  # the worker's own rule for the host arena

    cache, sched = config.cache, config.scheduler
    max_useful = sched.max_num_seqs * blocks_for(max_model_len, layout.block_size)
    host_blocks = num_host_blocks(cache, layout, max_useful)
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks, host_blocks
    if cache.kv_cache_memory_gb is not None:
        budget = int(cache.kv_cache_memory_gb * (1 << 30))
    else:
        weights = shape.num_params() * profile.dtype_bytes
        activations = activation_bytes(shape, sched.max_num_batched_tokens, sched.max_num_seqs, profile.dtype_bytes)
        budget = int(profile.memory_bytes * cache.gpu_memory_utilization) - weights - activations \
            - profile.activation_overhead_bytes
        if budget < layout.block_bytes:
            raise ValueError(
                f"the simulated {profile.name} ({profile.memory_bytes / 2**30:.0f} GiB) has no memory left for the "
                f"KV cache: weights {weights / 2**30:.1f} GiB, activations {activations / 2**30:.1f} GiB; use a larger "
                f"device, a smaller model, or raise gpu_memory_utilization")
    return min(layout.num_blocks_for_bytes(budget), max_useful), host_blocks


class SimExecutor:
    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int) -> None:
        from workers.cuda_graphs import graph_batch_sizes  # the sizes the real worker captures

        self.profile = get_profile(config.device.device.removeprefix(SIM_PREFIX))
        self.clock = VirtualClock()
        dtype = config.model.dtype if config.model.dtype != "auto" else (
            "bfloat16" if self.profile.dtype_bytes == 2 else "float32")
        # sharded over tp ranks (one device each): each rank holds its share of the weights and of every block's
        # KV heads, computes its share of each step, and the ranks meet in the step's all-reduces; a swap moves
        # every rank's share over that rank's own PCIe link, all at once
        tp = config.parallel.tensor_parallel_size
        self.shape = ModelShape.from_arch(arch, tp)
        self.rank_layout = KVLayout(arch.num_layers, config.cache.block_size, self.shape.kv_heads, arch.head_dim,
                                    dtype)
        self.layout = KVLayout(arch.num_layers, config.cache.block_size, self.shape.kv_heads * tp, arch.head_dim,
                               dtype)  # every rank's share together, as the multi-process executor reports it
        self.cost = CostModel(self.profile, self.shape, kv_dtype_bytes=DTYPE_BYTES[dtype])
        self.cost.allreduce_s(1)  # a device without an all-reduce profile fails here, not in the first step
        self.num_blocks, self.num_cpu_blocks = simulated_kv_blocks(config, self.profile, self.shape, self.rank_layout,
                                                                   max_model_len)
        self.device = f"{SIM_PREFIX}{self.profile.name}"
        self.granularity = config.swap.copy_granularity
        graphs = self.profile.graphs and not config.device.enforce_eager
        max_graph = min(config.device.max_graph_batch_size, config.scheduler.max_num_seqs)
        self.graph_sizes = graph_batch_sizes(max_graph) if graphs else []
        self.engines = {"out": CopyEngine(), "in": CopyEngine()}
        self._in_flight: dict[int, tuple[float, SwapDone]] = {}  # swap id -> (completion time, its report)
        self.vocab_size = arch.vocab_size
        self.avoid_ids = frozenset(arch.eos_token_ids)
        self._logprob_requests: set[str] = set()  # requests that asked for logprobs (their fake tokens are certain)
        self.model_worker = None
        if config.device.sim_execute == "model":
            self.model_worker = self._start_model_worker(config, arch, max_model_len)
        self.record_steps = False  # True: keep one row per step in ``steps`` (the simulation's trace)
        self.steps: list[dict] = []
        # wall_frontend_s is measured, not simulated: what the scheduler and the driver cost this machine per
        # step, beside the profile's modelled step_host_s (it is the one figure that differs between runs)
        self._stats = dict.fromkeys(("sim_forward_s", "sim_stall_s", "sim_idle_s", "wall_frontend_s"), 0.0)
        self._stats["sim_steps"] = 0
        self._left_at: float | None = None
        self.max_steps_in_flight = 1  # virtual time: a step is done when submit returns

    def _start_model_worker(self, config: EngineConfig, arch: ModelArch, max_model_len: int):
        """The real engine on this CPU (worker and copy threads), fed every plan so the tokens are real."""
        from fs_engine.engine.executor import InProcessExecutor

        cache = dataclasses.replace(config.cache, num_gpu_blocks=self.num_blocks, num_cpu_blocks=self.num_cpu_blocks)
        device = dataclasses.replace(config.device, device="cpu", sim_execute="shapes")
        model = dataclasses.replace(config.model, dtype="float32")
        parallel = dataclasses.replace(config.parallel, tensor_parallel_size=1)  # one real rank for the tokens
        return InProcessExecutor(dataclasses.replace(config, cache=cache, device=device, model=model,
                                                     parallel=parallel), arch, max_model_len)

    # ---- one step ----------------------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> None:
        """Simulated steps run at once (in virtual time); ``collect`` returns the result."""
        self._result = self.execute(plan)

    def collect(self) -> StepResult:
        result, self._result = self._result, None
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        entered = time.perf_counter()
        if self._left_at is not None:  # the frontend's real host work since the last step (not virtual time)
            self._stats["wall_frontend_s"] += entered - self._left_at
        t = start = self.clock.now()
        result = StepResult(step_id=plan.step_id)
        self._logprob_requests.difference_update(plan.finished_ids)  # (a finished id may be reused below)
        for new in plan.new_requests:
            if new.sampling.logprobs >= 0:
                self._logprob_requests.add(new.request_id)
            else:
                self._logprob_requests.discard(new.request_id)
        if self.model_worker is not None:
            executed = self.model_worker.execute(plan.with_swaps([dataclasses.replace(c, wait=True) for c in plan.swaps]))
            result.request_ids, result.token_ids = executed.request_ids, executed.token_ids
            result.logprob_ids, result.logprob_values = executed.logprob_ids, executed.logprob_values
        for kind in ("out", "in"):  # waited swap-outs land before swap-ins may reuse their device blocks
            ends = [(self._submit(c, t), c.wait) for c in plan.swaps if c.kind == kind]
            t = max([t, *(end for end, wait in ends if wait)])
        stall = t - start
        forward = 0.0
        if plan.request_ids:
            forward = self._forward_s(plan, t)
            t += forward
            if self.model_worker is None:
                self._sample(plan, result)
        elif self._in_flight and not stall:  # nothing to compute: the worker blocks until a copy lands
            t = max(t, min(end for end, _ in self._in_flight.values()))
        elif not self._in_flight and not plan.swaps:
            t += self.profile.step_host_s  # an empty step still costs the host a loop
        self.clock.advance_to(t)
        landed = sorted((end, swap_id) for swap_id, (end, _) in self._in_flight.items() if end <= t)
        result.swaps_done = [self._in_flight.pop(swap_id)[1] for _, swap_id in landed]
        result.swap_wait_s = stall
        result.execute_s = t - start
        self._account(plan, start, t, forward, stall)
        self._left_at = time.perf_counter()
        return result

    def _submit(self, command: SwapCommand, t: float) -> float:
        """Queue a command on its direction's engine; returns when it completes."""
        calls = copy_calls(self.granularity, command.runs, self.layout.num_layers)
        num_bytes = sum(n for _, _, n in command.runs) * self.layout.block_bytes
        duration = self.cost.copy_s(calls, num_bytes // self.shape.tp)  # each rank's link, in parallel
        other = self.engines["in" if command.kind == "out" else "out"]
        end = self.engines[command.kind].run(t, duration, other, self.profile.duplex_factor)
        self._in_flight[command.swap_id] = (end, SwapDone(command.swap_id, calls * self.shape.tp, num_bytes, end - t))
        return end

    def _forward_s(self, plan: StepPlan, t: float) -> float:
        query_lens = plan.num_scheduled
        context_lens = [s + q for s, q in zip(plan.start_pos, query_lens)]
        num_sampled = len(plan.sampled_ids)
        graph_batch = 0
        if self.graph_sizes and all(q == 1 for q in query_lens) and len(query_lens) <= self.graph_sizes[-1]:
            graph_batch = next(b for b in self.graph_sizes if b >= len(query_lens))
        async_commands = sum(1 for c in plan.swaps if not c.wait)
        seconds = self.cost.step_s(StepShape(query_lens, context_lens, num_sampled, graph_batch, async_commands))
        copying_until = max(e.busy_until for e in self.engines.values())
        overlap = max(0.0, min(t + seconds, copying_until) - t)
        return seconds + overlap * self.profile.copy_interference

    def _sample(self, plan: StepPlan, result: StepResult) -> None:
        end = 0
        for request_id, start, n, sample_index in zip(plan.request_ids, plan.start_pos, plan.num_scheduled,
                                                      plan.sample_index):
            end += n
            if sample_index >= 0:
                result.request_ids.append(request_id)
                result.token_ids.append(self.fake_token(plan.token_ids[end - 1], start + n))
        if self._logprob_requests.intersection(result.request_ids):
            # the fake model's next token is certain: log-probability 0, and no alternatives to rank
            asked = [r in self._logprob_requests for r in result.request_ids]
            result.logprob_ids = [[t] if a else [] for t, a in zip(result.token_ids, asked)]
            result.logprob_values = [[0.0] if a else [] for a in asked]

    def fake_token(self, last_token: int, position: int) -> int:
        """A deterministic 'greedy' token: a hash of the last token and its position, never an eos id."""
        token = (last_token * 1_000_003 + position * 7_919 + 17) % self.vocab_size
        while token in self.avoid_ids:
            token = (token + 1) % self.vocab_size
        return token

    def _account(self, plan: StepPlan, start: float, end: float, forward: float, stall: float) -> None:
        stats = self._stats
        stats["sim_forward_s"] += forward
        stats["sim_stall_s"] += stall
        stats["sim_idle_s"] += (end - start) - forward - stall
        stats["sim_steps"] += 1
        if self.record_steps:
            self.steps.append({
                "t": start, "seconds": end - start, "num_seqs": plan.num_chunks, "num_tokens": plan.num_tokens,
                "num_prefill": sum(1 for n in plan.num_scheduled if n > 1),
                "swap_out_blocks": sum(n for c in plan.swaps if c.kind == "out" for *_, n in c.runs),
                "swap_in_blocks": sum(n for c in plan.swaps if c.kind == "in" for *_, n in c.runs),
                "copies_in_flight": len(self._in_flight), "stall_s": stall,
                "out_queue_s": max(0.0, self.engines["out"].busy_until - end),
                "in_queue_s": max(0.0, self.engines["in"].busy_until - end),
            })

    # ---- executor interface ------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        copy = {f"sim_copy_{kind}_busy_s": engine.busy_s for kind, engine in self.engines.items()}
        return {**{k: round(v, 6) for k, v in self._stats.items()}, **{k: round(v, 6) for k, v in copy.items()},
                "sim_time_s": round(self.clock.now(), 6)}

    def check_health(self) -> None:
        """Nothing can die: the device is a model."""

    def shutdown(self) -> None:
        if self.model_worker is not None:
            self.model_worker.shutdown()
            self.model_worker = None
