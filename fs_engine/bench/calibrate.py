"""``fs-engine bench calibrate``: fit this machine's device profile, then check the simulator against it.

1. ``fs_engine.sim.calibrate`` measures the in-process engine's steps and copies and fits a profile
   (``profile.json``, with every measurement and the fit's errors in ``calibration.json``).
2. The same trace is replayed twice per configuration: for real on this machine (wall clock) and simulated
   with that profile (virtual clock). ``validation.md`` compares the figures that the issue of record asks
   to agree: P50/P95 TTFT and TBT, throughput, preemptions and swapped-out bytes, each with its relative
   error against a stated tolerance.

Tolerances: 20% on latencies and throughput (the measured step-time fit alone is off by about that much at
the 90th percentile on a shared 2-core machine, and a real-time replay feeds timing noise back into the
schedule); 35% on preemption counts and swapped bytes, which are chaotic in the schedule: one preemption more
or less early in a run changes which requests are preempted later.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fs_engine.bench.metrics import summarize
from fs_engine.bench.workload import WorkloadConfig, generate

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


def compare(real: dict, simulated: dict) -> list[dict[str, Any]]:
    rows = []
    for label, path, tolerance in CHECKS:
        r, s = _get(real, path), _get(simulated, path)
        error = None if r is None or s is None else (0.0 if r == s else abs(s - r) / max(abs(r), 1e-12))
        rows.append({"metric": label, "real": r, "simulated": s, "error": error, "tolerance": tolerance,
                     "ok": error is not None and error <= tolerance})
    return rows


def validation_table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| config | metric | real | simulated | error | tolerance | |", "|---|---|---:|---:|---:|---:|---|"]
    for config, rows in results.items():
        for row in rows:
            real = "n/a" if row["real"] is None else f"{row['real']:.4g}"
            sim = "n/a" if row["simulated"] is None else f"{row['simulated']:.4g}"
            err = "n/a" if row["error"] is None else f"{row['error']:.1%}"
            lines.append(f"| {config} | {row['metric']} | {real} | {sim} | {err} | {row['tolerance']:.0%} | "
                         f"{'ok' if row['ok'] else 'OFF'} |")
    return "\n".join(lines) + "\n"


def run_calibration(model: str | None, out_dir: str | Path, engine_args: dict[str, Any], quick: bool = False,
                    validate: bool = True, configs: tuple[str, ...] = ("baseline", "reuse"),
                    progress: bool | None = None, trace_config: WorkloadConfig = VALIDATION_TRACE,
                    validation_engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate, write profile.json and calibration.json into ``out_dir``; with ``validate``, replay
    ``trace_config``'s trace per config for real and simulated and write validation.md / .json."""
    from fs_engine.bench.ablation import ALIASES, run_config
    from fs_engine.engine.llm_engine import LLMEngine
    from fs_engine.sim.calibrate import calibrate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = LLMEngine(model, **engine_args)
    try:
        cal = calibrate(engine, name="cpu", quick=quick)
    finally:
        engine.shutdown()
    profile_path = out / "profile.json"
    cal.profile.save(profile_path)
    (out / "calibration.json").write_text(json.dumps({
        "report": cal.report,
        "steps": [{**asdict(s.shape), "seconds": s.seconds} for s in cal.steps],
        "copies": [{"calls": c, "bytes": b, "seconds": t} for c, b, t in cal.copies],
    }, indent=1) + "\n")
    result: dict[str, Any] = {"profile": str(profile_path), "report": cal.report}
    if not validate:
        return result
    trace = generate(trace_config)
    args = {**(VALIDATION_ENGINE if validation_engine is None else validation_engine), **engine_args}
    rows = {}
    for alias in configs:
        name = ALIASES[alias]
        summaries = []
        for device_args in ({}, {"device": f"sim:{profile_path}"}):
            run = run_config(model, trace, name, {**args, **device_args}, progress)
            summaries.append(summarize(run.records, run.duration_s, trace.tenant_weights,
                                       engine_stats=run.engine_stats))
        rows[name] = compare(*summaries)
    (out / "validation.md").write_text(validation_table(rows))
    (out / "validation.json").write_text(json.dumps(rows, indent=1) + "\n")
    result["validation"] = rows
    return result
