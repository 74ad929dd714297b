"""Fit a device profile to measurements of the device at hand (``fs-engine bench calibrate``).

On this machine's CPU the engine runs the eager model with the torch reference attention, so the profile is a
*serial* one (``DeviceProfile.serial``): a step's time is linear in the cost model's features
(``CostModel.features``), and a non-negative least-squares fit of measured ``LLMEngine.step()`` times gives
every coefficient at once (host cost per step and per request, the reference kernel's per-chunk loop,
seconds per GEMM FLOP, per byte, per attention FLOP and byte). Copies are timed on the worker's own copier and
fitted as ``calls * latency + bytes / bandwidth``; running both directions at once gives the duplex factor, and
a decode step timed while a copy thread runs gives the interference factor.

Every step and copy is the production code (``LLMEngine.step`` on the in-process executor, ``KVCopier``): the
profile describes the engine, not a microbenchmark of its parts. On a GPU the command fits the same serial
form, an approximation of the overlapping (roofline) one there; a roofline fit needs a GPU session to check it.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fs_engine.sim.cost_model import CostModel, ModelShape, StepShape
from fs_engine.sim.devices import DeviceProfile

FEATURES = ("step", "seqs", "prefill_chunks", "async_commands", "gemm_flops", "bytes", "attn_flops", "attn_bytes")
TINY = 1e-18  # a coefficient the fit set to zero: that cost is negligible, not free to divide by


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set: drop the most negative, refit)."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x


@dataclass
class StepSample:
    shape: StepShape
    seconds: float


@dataclass
class Calibration:
    profile: DeviceProfile
    steps: list[StepSample] = field(default_factory=list)
    copies: list[tuple[int, int, float]] = field(default_factory=list)  # (calls, bytes, seconds)
    report: dict[str, Any] = field(default_factory=dict)


def serial_profile(name: str, coefficients: dict[str, float], base: DeviceProfile) -> DeviceProfile:
    """The serial profile whose ``CostModel.step_s`` is ``sum(coefficients[k] * features[k])``: peak FLOP/s and
    bandwidth are the reciprocals of the GEMM coefficients (efficiency 1), the attention efficiencies are
    relative to those."""
    c = {k: max(v, TINY) for k, v in coefficients.items()}
    return base.with_updates(
        name=name, serial=True, vidur_gpu=None,
        peak_flops=1 / c["gemm_flops"], memory_bw=1 / c["bytes"], gemm_compute_eff=1.0, gemm_memory_eff=1.0,
        attn_compute_eff=c["gemm_flops"] / c["attn_flops"], attn_memory_eff=c["bytes"] / c["attn_bytes"],
        step_host_s=coefficients["step"], seq_host_s=coefficients["seqs"], chunk_loop_s=coefficients["prefill_chunks"],
        async_command_host_s=coefficients["async_commands"], kernels_per_layer=0,
    )


def fit_steps(samples: list[StepSample], shape: ModelShape, probe: CostModel) -> dict[str, float]:
    rows = [probe.features(s.shape) for s in samples]
    t = np.array([s.seconds for s in samples])
    a = np.array([[r[k] for k in FEATURES] for r in rows]) / t[:, None]  # relative errors count alike
    x = nnls(a, np.ones(len(samples)))
    return dict(zip(FEATURES, x.tolist()))


def fit_copies(copies: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(latency per call, bytes/s) of ``seconds = calls * latency + bytes / bandwidth``."""
    t = np.array([s for *_, s in copies])
    a = np.array([[calls, num_bytes] for calls, num_bytes, _ in copies], dtype=float) / t[:, None]
    latency, per_byte = nnls(a, np.ones(len(copies)))
    return float(latency), 1.0 / max(per_byte, TINY)


# ---- measuring -------------------------------------------------------------------------------------------
class _StepTimer:
    """While open, times every ``engine.step()`` and matches it with the plan it executed (both the engine's
    step and its executor are wrapped, and restored on exit). A step's time excludes what it waited for
    synchronous swaps: the simulator models those stalls itself. Steps that computed nothing give no sample."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.samples: list[StepSample] = []
        self._step, self._submit, self._collect = engine.step, engine.executor.submit, engine.executor.collect
        self._plan = None
        self._last: tuple[Any, float] | None = None

    def __enter__(self) -> _StepTimer:
        self.engine.step = self._timed_step
        self.engine.executor.submit, self.engine.executor.collect = self._recording_submit, self._recording_collect
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.step = self._step
        self.engine.executor.submit, self.engine.executor.collect = self._submit, self._collect

    def _recording_submit(self, plan) -> None:
        self._plan = plan
        self._submit(plan)

    def _recording_collect(self):
        result = self._collect()
        self._last = (self._plan, result.swap_wait_s)
        return result

    def _timed_step(self):
        self._last = None
        start = time.perf_counter()
        outputs = self._step()
        seconds = time.perf_counter() - start
        if self._last is not None and self._last[0].request_ids:
            plan, waited = self._last
            self.samples.append(StepSample(_shape_of(plan), seconds - waited))
        return outputs


def _shape_of(plan) -> StepShape:
    return StepShape(list(plan.num_scheduled), [s + q for s, q in zip(plan.start_pos, plan.num_scheduled)],
                     len(plan.sampled_ids), async_commands=sum(1 for c in plan.swaps if not c.wait))


def measure_serving(engine: Any, trace: Any) -> list[StepSample]:
    """Every step of a real replay of ``trace``: mixed contexts, preemption, copies in flight, a scheduler with
    many live requests, which the grid of uniform steps does not show."""
    from fs_engine.bench.driver import run_in_process

    with _StepTimer(engine) as timer:
        run_in_process(engine, trace, progress=False, label="calibration replay")
    return timer.samples


def _timed_steps(timer: _StepTimer, repeats: int) -> list[StepSample]:
    """Step the timer's engine until ``repeats`` steps computed something or nothing is left; their samples."""
    engine, first = timer.engine, len(timer.samples)
    while engine.has_unfinished_requests() and len(timer.samples) - first < repeats:
        engine.step()
    return timer.samples[first:]


def _drain(engine: Any) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def measure_steps(engine: Any, rng: np.random.Generator, quick: bool = False) -> list[StepSample]:
    """Decode steps over a grid of batch sizes and contexts, prefills of several lengths and mixed steps;
    the median of a few repeats of each (the first of a kind warms caches and is dropped)."""
    from fs_engine.sampling_params import SamplingParams

    vocab = engine.arch.vocab_size
    with _StepTimer(engine) as timer:
        limit = engine.max_model_len
        samples: list[StepSample] = []
        ids = iter(range(10**9))

        def prompt(n: int) -> list[int]:
            return rng.integers(3, vocab, size=n).tolist()

        def run(prompts: list[list[int]], max_tokens: int) -> list[StepSample]:
            for p in prompts:
                engine.add_request(f"cal{next(ids)}", p, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                         ignore_eos=True))
            return _timed_steps(timer, 10**9)

        batches = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64)
        contexts = (64, 512) if quick else (32, 256, 1024, 2048)
        for batch in batches:
            for context in contexts:
                if batch * context > 16384 or context + 8 > limit:
                    continue
                steps = [s for s in run([prompt(context) for _ in range(batch)], 8)
                         if len(s.shape.query_lens) == batch and s.shape.num_tokens == batch]
                if len(steps) > 2:
                    samples.append(StepSample(steps[-1].shape, statistics.median(s.seconds for s in steps[1:])))
        for length in ((64, 512, 2048) if quick else (16, 64, 256, 1024, 2048)):
            if length + 1 > limit or length > engine.config.scheduler.max_num_batched_tokens:
                continue
            for _ in range(3):  # three fresh prompts of this length: each is one prefill step
                steps = run([prompt(length)], 1)
                samples.extend(s for s in steps if s.shape.num_tokens == length)
        for decoders in (4, 16):  # mixed steps: a prefill chunk among decode rows
            for p in [prompt(128) for _ in range(decoders)]:
                engine.add_request(f"cal{next(ids)}", p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
            _timed_steps(timer, 2)  # their prefills
            for _ in range(3):
                engine.add_request(f"cal{next(ids)}", prompt(256), SamplingParams(max_tokens=1, temperature=0,
                                                                                ignore_eos=True))
                samples.extend(s for s in _timed_steps(timer, 1) if len(s.shape.query_lens) > 1)
            _drain(engine)
    return samples


def measure_copies(copier: Any, num_blocks: int, num_layers: int, quick: bool = False) -> list[tuple[int, int, float]]:
    """Each copy pattern timed a few times (median): runs of n blocks one call each, and vLLM v0's pattern of a
    call per block, layer and K/V."""
    from workers.swap.copier import KVCopier

    copies = []
    small = KVCopier(copier.device_arena, copier.host_arena, "block_layer")
    sizes = [n for n in ((1, 16, 64) if quick else (1, 4, 16, 64, 256)) if n <= num_blocks]
    for who in (copier, small):
        for n in sizes:
            for direction in ("out", "in"):
                times = []
                stats = None
                for _ in range(5):
                    start = time.perf_counter()
                    stats = (who.swap_out if direction == "out" else who.swap_in)([(0, 0, n)])
                    times.append(time.perf_counter() - start)
                copies.append((stats.calls, stats.bytes, statistics.median(times[1:])))
    return copies


def measure_duplex(copier: Any, num_blocks: int) -> float:
    """Each direction's share of its bandwidth while the other copies too (1.0: no slowdown)."""
    n = max(1, min(num_blocks, 256))
    alone = min(_time(lambda: copier.swap_out([(0, 0, n)])) for _ in range(3))
    both = []
    for _ in range(3):
        worker = threading.Thread(target=copier.swap_in, args=([(0, 0, n)],))
        start = time.perf_counter()
        worker.start()
        copier.swap_out([(0, 0, n)])
        worker.join()
        both.append(time.perf_counter() - start)
    return float(min(1.0, alone / min(both)))


def measure_interference(engine: Any, copier: Any, rng: np.random.Generator) -> float:
    """How much slower a decode step runs while a copy thread keeps copying (0.0: not at all)."""
    from fs_engine.sampling_params import SamplingParams

    with _StepTimer(engine) as timer:
        for i in range(16):
            engine.add_request(f"int{i}", rng.integers(3, engine.arch.vocab_size, size=256).tolist(),
                               SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        _timed_steps(timer, 3)
        quiet = [s.seconds for s in _timed_steps(timer, 15)]
        stop = threading.Event()
        n = max(1, min(copier.host_arena.shape[0], copier.device_arena.shape[0], 64))

        def copy_forever() -> None:
            while not stop.is_set():
                copier.swap_out([(0, 0, n)])

        thread = threading.Thread(target=copy_forever, daemon=True)
        thread.start()
        try:
            busy = [s.seconds for s in _timed_steps(timer, 15)]
        finally:
            stop.set()
            thread.join()
        _drain(engine)
    return max(0.0, statistics.median(busy) / statistics.median(quiet) - 1.0)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def calibrate(engine: Any, name: str = "cpu", quick: bool = False, seed: int = 0,
              serving: list[StepSample] | None = None) -> Calibration:
    """Measure ``engine`` (an in-process ``LLMEngine`` on this machine's CPU) and fit a serial profile to it;
    ``serving``: steps of a real replay (``measure_serving``) fitted together with the grid."""
    if not hasattr(engine.executor, "worker") or engine.executor.swaps is None:
        raise ValueError("calibrate measures an in-process engine with swap space: drop multiprocess/device=sim "
                         "and keep num_cpu_blocks > 0")
    rng = np.random.default_rng(seed)
    shape = ModelShape.from_arch(engine.arch)
    dtype_bytes = engine.executor.layout.block_bytes // (engine.arch.num_layers * 2 * engine.block_size
                                                         * engine.arch.num_kv_heads * engine.arch.head_dim)
    runner = engine.executor.worker.runner
    # the torch backend pads and loops (the reference kernel); Triton and flash-attn read each context once
    kernel = "reference" if runner.backend_cls.name == "torch" else "paged"
    base = DeviceProfile(name, 0, 1.0, 1.0, None, pcie_bw=1.0, dma_latency_s=0.0, submit_s=0.0, duplex_factor=1.0,
                         attn_compute_eff=1.0, attn_memory_eff=1.0, serial=True, attention_kernel=kernel,
                         graphs=runner.graph_batch_size > 0, dtype_bytes=dtype_bytes, kernels_per_layer=0,
                         activation_overhead_bytes=0, gemm_compute_eff=1.0, gemm_memory_eff=1.0)
    started = time.perf_counter()
    grid = measure_steps(engine, rng, quick)
    samples = grid + list(serving or [])
    coefficients = fit_steps(samples, shape, CostModel(base, shape))
    copier = engine.executor.swaps.manager.copier
    copies = measure_copies(copier, min(copier.host_arena.shape[0], copier.device_arena.shape[0]),
                            engine.arch.num_layers, quick)
    latency, bandwidth = fit_copies(copies)
    duplex = measure_duplex(copier, copier.host_arena.shape[0])
    interference = measure_interference(engine, copier, rng)
    # the simulated worker sizes its arena as memory * utilization - weights - activations; choose the memory
    # that leaves the real CPU worker's budget, so a simulated run holds the same number of blocks
    from fs_engine.sim.executor import activation_bytes
    from workers.kv_arena import DEFAULT_CPU_KV_BYTES

    cache, sched = engine.config.cache, engine.config.scheduler
    kv_budget = (cache.kv_cache_memory_gb or DEFAULT_CPU_KV_BYTES / 2**30) * 2**30
    used = shape.num_params() * dtype_bytes + activation_bytes(shape, sched.max_num_batched_tokens,
                                                               sched.max_num_seqs, dtype_bytes)
    memory = int((kv_budget + used) / cache.gpu_memory_utilization) + 1
    profile = serial_profile(name, coefficients, base).with_updates(
        pcie_bw=bandwidth, dma_latency_s=latency, duplex_factor=max(duplex, 0.05), copy_interference=interference,
        memory_bytes=memory)
    model = CostModel(profile, shape)
    errors = [abs(model.step_s(s.shape) / s.seconds - 1) for s in samples]
    serving_error = [abs(model.step_s(s.shape) / s.seconds - 1) for s in serving or []]
    copy_model = [abs(model.copy_device_s(c, b) / t - 1) for c, b, t in copies]
    report = {
        "measured_steps": len(samples), "grid_steps": len(grid), "serving_steps": len(serving or []),
        "measured_copies": len(copies),
        "serving_fit_median_error": statistics.median(serving_error) if serving_error else None,
        "step_fit_median_error": statistics.median(errors), "step_fit_p90_error": float(np.percentile(errors, 90)),
        "copy_fit_median_error": statistics.median(copy_model), "coefficients": coefficients,
        "copy_latency_s": latency, "copy_bandwidth_gb_s": bandwidth / 1e9, "duplex_factor": duplex,
        "copy_interference": interference, "seconds": time.perf_counter() - started,
    }
    return Calibration(profile, samples, copies, report)
