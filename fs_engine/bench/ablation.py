"""The ablation: one trace through a vLLM-v0-like baseline and then each FastSwitch mechanism added in turn.

Every configuration shares the model, the scheduler settings and the trace; only the mechanism under test
changes, so each column's ratio against the baseline is that mechanism's share of the gain:

    baseline (vLLM-v0-like)   block allocator, a copy per block per layer, sync swaps, no KV reuse
    + block groups            contiguous runs, one copy per run
    + async swap              copies overlap with compute
    + KV reuse (fs-engine)    host copies kept across swap-ins, finished turns' KV kept for the next turn
    recompute                 the full engine, but preempted requests drop their KV and recompute it
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fs_engine.bench.driver import RunResult, run_in_process
from fs_engine.bench.metrics import SLO, summarize
from fs_engine.bench.report import write_report, write_step_log
from fs_engine.bench.workload import Trace

BASELINE = "baseline (vLLM-v0-like)"
CONFIGS: dict[str, dict[str, Any]] = {
    BASELINE: {"block_allocator": "block", "copy_granularity": "block_layer", "swap_mode": "sync",
               "enable_kv_reuse": False, "preemption_mode": "swap"},
    "+ block groups": {"block_allocator": "group", "copy_granularity": "group", "swap_mode": "sync",
                       "enable_kv_reuse": False, "preemption_mode": "swap"},
    "+ async swap": {"block_allocator": "group", "copy_granularity": "group", "swap_mode": "async",
                     "enable_kv_reuse": False, "preemption_mode": "swap"},
    "+ KV reuse (fs-engine)": {"block_allocator": "group", "copy_granularity": "group", "swap_mode": "async",
                               "enable_kv_reuse": True, "preemption_mode": "swap"},
    "recompute": {"block_allocator": "group", "copy_granularity": "group", "swap_mode": "async",
                  "enable_kv_reuse": True, "preemption_mode": "recompute"},
}
# short names for --configs
ALIASES = {"baseline": BASELINE, "groups": "+ block groups", "async": "+ async swap",
           "reuse": "+ KV reuse (fs-engine)", "recompute": "recompute"}
ALIAS_OF = {name: alias for alias, name in ALIASES.items()}


def resolve_configs(names: str | None) -> list[str]:
    if not names:
        return list(CONFIGS)
    chosen = []
    for name in (n.strip() for n in names.split(",")):
        if name not in ALIASES:
            raise ValueError(f"unknown ablation config {name!r}; choose from {', '.join(ALIASES)}")
        chosen.append(ALIASES[name])
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)  # every ratio is against it
    return chosen


def run_config(model: str | None, trace: Trace, name: str, engine_args: dict[str, Any],
               progress: bool | None = None, step_log: Path | None = None) -> RunResult:
    """``step_log``: a simulated engine writes its per-step trace there (CSV)."""
    from fs_engine.engine.llm_engine import LLMEngine

    args = {"policy": "priority", **engine_args, **CONFIGS[name]}
    if trace.tenant_weights and args["policy"] == "vtc" and "tenant_weights" not in engine_args:
        args["tenant_weights"] = ",".join(f"{t}={w:g}" for t, w in trace.tenant_weights.items())
    engine = LLMEngine(model, **args)
    try:
        _warm_up(engine)
        if step_log is not None:
            engine.executor.record_steps = True
        result = run_in_process(engine, trace, progress=progress, label=f"{name:>24}")
    finally:
        engine.shutdown()
    if step_log is not None:
        write_step_log(engine.executor.steps, step_log)
    return result


def _warm_up(engine: Any) -> None:
    """First-call allocations and kernel selection happen before the clock starts (the driver counts only
    what changes during the replay)."""
    from fs_engine.sampling_params import SamplingParams

    engine.add_request("warm-up", [5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def run_ablation(model: str | None, trace: Trace, out_dir: str | Path, engine_args: dict[str, Any],
                 configs: list[str] | None = None, slo: SLO | None = None,
                 progress: bool | None = None, step_logs: bool = False) -> dict[str, Any]:
    """Run every configuration on ``trace``; writes results.json, table.md and the plots into ``out_dir``
    and returns ``{"summaries": ..., "files": ..., "rejected": ..., "identical_replies": ...}``.

    Greedy replies must not depend on how preemption is done: ``identical_replies[name]`` says whether
    every reply of that configuration equals the baseline's, token for token (the correctness oracle, on
    the benchmark's own workload)."""
    names = configs or list(CONFIGS)
    summaries, runs, rejected, identical = {}, {}, {}, {}
    reference: dict[str, list[int]] | None = None
    for name in names:
        log = Path(out_dir) / f"steps-{ALIAS_OF[name]}.csv" if step_logs else None
        result = run_config(model, trace, name, engine_args, progress, log)
        summaries[name] = summarize(result.records, result.duration_s, trace.tenant_weights, slo,
                                    engine_stats=result.engine_stats)
        runs[name] = result.records
        rejected[name] = result.rejected
        reference = result.replies if reference is None else reference
        identical[name] = result.replies == reference
        summaries[name]["identical_replies_to_baseline"] = identical[name]
    files = write_report(Path(out_dir), summaries, runs, trace.tenant_weights, baseline=names[0])
    return {"summaries": summaries, "files": files, "rejected": rejected, "identical_replies": identical}
