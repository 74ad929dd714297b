"""``fs-engine bench calibrate``: fit this machine's device profile, then check the simulator against it.

1. ``fs_engine.sim.calibrate`` measures the in-process engine's steps and copies and fits a profile
   (``profile.json``, with every measurement and the fit's errors in ``calibration.json``).
2. The same trace is replayed three times per configuration: for real on this machine (wall clock),
   simulated with that profile (virtual clock), and for real again. ``validation.md`` compares the figures
   that the issue of record asks to agree: P50/P95 TTFT and TBT, throughput, preemptions and swapped-out
   bytes, each with the simulation's relative distance from the span of the two real runs (0 inside it: a
   real figure is known only to within what repeating the run moves it), against a stated tolerance.

Tolerances: 20% on latencies and throughput (the measured step-time fit alone is off by about that much at
the 90th percentile on a shared 2-core machine, and a real-time replay feeds timing noise back into the
schedule); 35% on preemption counts and swapped bytes, which are chaotic in the schedule: one preemption more
or less early in a run changes which requests are preempted later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fs_engine.bench.metrics import summarize
from fs_engine.bench.workload import WorkloadConfig, generate
from fs_engine.sim.devices import SIM_PREFIX, is_simulated

LATENCY_TOLERANCE = 0.20
COUNT_TOLERANCE = 0.35
# A small, loaded trace: requests queue, get preempted and swapped, and later turns reuse history.
VALIDATION_TRACE = WorkloadConfig(num_conversations=24, request_rate=3.0, scale=0.25, max_context=1024,
                                  priority_pattern="random", priority_interval_s=0.5, seed=11)
VALIDATION_ENGINE = {"num_gpu_blocks": 160, "policy": "priority"}
CHECKS = (  # (label, path in a summary, tolerance)
    ("P50 TTFT", ("ttft_s", "p50"), LATENCY_TOLERANCE),
    ("P95 TTFT", ("ttft_s", "p95"), LATENCY_TOLERANCE),
    ("P50 TBT", ("tbt_s", "p50"), LATENCY_TOLERANCE),
    ("P95 TBT", ("tbt_s", "p95"), LATENCY_TOLERANCE),
    ("Throughput", ("throughput_tokens_per_s",), LATENCY_TOLERANCE),
    ("Preemptions", ("engine", "num_preemptions"), COUNT_TOLERANCE),
    ("Swap-out bytes", ("engine", "swap_out_bytes"), COUNT_TOLERANCE),
)


def _get(summary: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        summary = summary.get(key) if isinstance(summary, dict) else None
    return None if summary is None else float(summary)


def _error(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None:
        return None
    return 0.0 if reference == value else abs(value - reference) / max(abs(reference), 1e-12)


def range_error(real: float | None, real_again: float | None, simulated: float | None) -> float | None:
    """How far the simulation lies outside the span of the real runs, relative to the nearer end (0 inside):
    a real figure is known only to within what repeating the run moves it."""
    if real is None or simulated is None:
        return None
    low, high = sorted((real, real if real_again is None else real_again))
    if low <= simulated <= high:
        return 0.0
    return _error(low if simulated < low else high, simulated)


def compare(real: dict, simulated: dict, real_again: dict | None = None) -> list[dict[str, Any]]:
    """Per checked metric: the simulation's relative error against the real runs (their span when there are
    two), the real runs' own difference (what this machine's noise alone moves the figure), and whether the
    error is within the tolerance."""
    rows = []
    for label, path, tolerance in CHECKS:
        r, s = _get(real, path), _get(simulated, path)
        again = _get(real_again, path) if real_again is not None else None
        error = range_error(r, again, s)
        rows.append({"metric": label, "real": r, "real_again": again, "simulated": s, "error": error,
                     "run_to_run": _error(r, again), "tolerance": tolerance,
                     "ok": error is not None and error <= tolerance})
    return rows


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.4g}"


def validation_table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| config | metric | real | real, again | simulated | sim error (vs the real span) | run-to-run | "
             "tolerance | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for config, rows in results.items():
        for row in rows:
            lines.append(f"| {config} | {row['metric']} | {_fmt(row['real'])} | {_fmt(row['real_again'])} | "
                         f"{_fmt(row['simulated'])} | {_fmt(row['error'], True)} | {_fmt(row['run_to_run'], True)} | "
                         f"{row['tolerance']:.0%} | {'ok' if row['ok'] else 'OFF'} |")
    return "\n".join(lines) + "\n"


def run_calibration(model: str | None, out_dir: str | Path, engine_args: dict[str, Any], quick: bool = False,
                    validate: bool = True, configs: tuple[str, ...] = ("baseline", "reuse"),
                    progress: bool | None = None, trace_config: WorkloadConfig = VALIDATION_TRACE,
                    validation_engine: dict[str, Any] | None = None, threads: int = 1) -> dict[str, Any]:
    """Calibrate, write profile.json and calibration.json into ``out_dir``; with ``validate``, replay
    ``trace_config``'s trace per config for real and simulated and write validation.md / .json.

    ``threads``: torch's intra-op threads for the real engine while measuring and replaying. One by default:
    on this shared 2-vCPU machine a second compute thread made steps 1.2-6x slower and 5x noisier (the
    hypervisor steals about a third of the second vCPU's time, and both threads wait for the slower one),
    and it leaves the other core to the copy threads."""
    import torch

    if is_simulated(str(engine_args.get("device", ""))):
        raise ValueError("calibrate measures the in-process engine on this machine; drop --device sim:... (the "
                         "profile it writes is what --simulate then takes)")
    if threads < 1:
        raise ValueError(f"--threads {threads}: give at least 1 torch compute thread")
    torch.set_num_threads(threads)
    from fs_engine.bench.ablation import ALIASES, CONFIGS, run_config
    from fs_engine.engine.llm_engine import LLMEngine
    from fs_engine.sim.calibrate import calibrate, measure_serving

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a real serving replay (its own seed: the validation below replays another trace) ...
    serving_engine = LLMEngine(model, **{**(VALIDATION_ENGINE if validation_engine is None else validation_engine),
                                         **engine_args, **CONFIGS[ALIASES["reuse"]]})
    try:
        serving = measure_serving(serving_engine, generate(dataclasses.replace(trace_config,
                                                                               seed=trace_config.seed + 1)))
    finally:
        serving_engine.shutdown()
    # ... and a grid of uniform steps and copies, fitted together
    engine = LLMEngine(model, **engine_args)
    try:
        cal = calibrate(engine, name="cpu", quick=quick, serving=serving)
    finally:
        engine.shutdown()
    profile_path = out / "profile.json"
    cal.profile.save(profile_path)
    (out / "calibration.json").write_text(json.dumps({
        "report": cal.report,
        "steps": [{**asdict(s.shape), "seconds": s.seconds} for s in cal.steps],
        "copies": [{"calls": c, "bytes": b, "seconds": t} for c, b, t in cal.copies],
    }, indent=1) + "\n")
    result: dict[str, Any] = {"profile": str(profile_path), "report": {**cal.report, "torch_threads": threads}}
    if not validate:
        return result
    trace = generate(trace_config)
    args = {**(VALIDATION_ENGINE if validation_engine is None else validation_engine), **engine_args}
    rows = {}
    for alias in configs:
        name = ALIASES[alias]
        summaries = []
        # real, simulated, real again: the second real run measures how much the machine alone moves a figure
        for device_args in ({}, {"device": f"{SIM_PREFIX}{profile_path}"}, {}):
            run = run_config(model, trace, name, {**args, **device_args}, progress)
            summaries.append(summarize(run.records, run.duration_s, trace.tenant_weights,
                                       engine_stats=run.engine_stats))
        rows[name] = compare(*summaries)
    (out / "validation.md").write_text(validation_table(rows))
    (out / "validation.json").write_text(json.dumps(rows, indent=1) + "\n")
    result["validation"] = rows
    return result
