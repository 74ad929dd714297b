"""The report of an ablation: a markdown table of every config against a baseline, plus latency and service plots.

Each table cell reads "value (ratio)", where the ratio is the improvement over the baseline column oriented so
that above 1 is always better (baseline / value for lower-is-better metrics, value / baseline for
higher-is-better), so a reader can scan a row without remembering which way it points.

Plots need matplotlib (the ``bench`` extra); it is imported only inside the plotting functions and drawn
through ``matplotlib.figure.Figure`` directly, which renders PNGs without pyplot, so no global backend is
chosen or changed and no figure outlives its call.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from fs_engine.bench.metrics import RequestRecord, service_over_time

Better = Literal["lower", "higher"] | None  # None: shown for context, no ratio (e.g. counts the policy dictates)

METRIC_ROWS: list[tuple[str, tuple[str, ...], Better]] = [
    ("P95 TTFT (s)", ("ttft_s", "p95"), "lower"),
    ("P99 TTFT (s)", ("ttft_s", "p99"), "lower"),
    ("P99.9 TTFT (s)", ("ttft_s", "p99.9"), "lower"),
    ("P50 TBT (s)", ("tbt_s", "p50"), "lower"),
    ("P99 TBT (s)", ("tbt_s", "p99"), "lower"),
    ("P99.9 TBT (s)", ("tbt_s", "p99.9"), "lower"),
    ("P95 E2E (s)", ("e2e_s", "p95"), "lower"),
    ("Throughput (tokens/s)", ("throughput_tokens_per_s",), "higher"),
    ("Jain index", ("jain_index",), "higher"),
    ("SLO attainment", ("slo", "attainment"), "higher"),
    ("Preemptions", ("engine", "num_preemptions"), None),
    ("Swap-out (MB)", ("engine", "swap_out_bytes"), "lower"),
    ("Swap-out blocks", ("engine", "swap_out_blocks"), "lower"),
    ("Reused swap-out (MB)", ("engine", "reused_swap_out_bytes"), None),
    ("Swap-in (MB)", ("engine", "swap_in_bytes"), "lower"),
    ("History tokens reused", ("engine", "reused_prefix_tokens"), None),
    ("... still on the device", ("engine", "reused_resident_tokens"), None),
    ("Swap stall time (s)", ("engine", "swap_wait_s"), "lower"),
    ("Mean swap latency (ms)", ("engine", "mean_swap_ms"), "lower"),
    ("Recomputed tokens", ("engine", "num_recomputed_tokens"), "lower"),
]

BYTES_PER_MB = 1e6


def _lookup(summary: dict, path: tuple[str, ...]) -> float | None:
    """The number at ``path``, in display units (byte counters in MB); None where the run has no such value."""
    value: object = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if value is None:
        return None
    return float(value) / BYTES_PER_MB if path[-1].endswith("_bytes") else float(value)


def improvement(value: float, baseline: float, better: Literal["lower", "higher"]) -> float:
    """Improvement factor over the baseline, > 1 is better. Equal values (zeros included) give 1; a zero
    denominator otherwise gives ``inf`` (e.g. a config that eliminated swap-out bytes entirely)."""
    numerator, denominator = (baseline, value) if better == "lower" else (value, baseline)
    if numerator == denominator:
        return 1.0
    return numerator / denominator if denominator != 0 else math.inf


def _format(value: float) -> str:
    """Three significant digits, without scientific notation for the large counts a table is full of."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _cell(value: float | None, baseline: float | None, better: Better, is_baseline: bool) -> str:
    if value is None:
        return "n/a"
    if is_baseline or better is None or baseline is None:
        return _format(value)
    ratio = improvement(value, baseline, better)
    return f"{_format(value)} ({'inf' if math.isinf(ratio) else _format(ratio) + 'x'})"


def markdown_table(results: dict[str, dict], baseline: str) -> str:
    """Metrics as rows, configs as columns in ``results`` order; rows that no config has are left out."""
    if baseline not in results:
        raise ValueError(f"baseline={baseline!r} is not one of the configs: {list(results)}")
    names = list(results)
    lines = ["| Metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, path, better in METRIC_ROWS:
        values = [_lookup(results[name], path) for name in names]
        if all(v is None for v in values):
            continue
        base = _lookup(results[baseline], path)
        cells = [_cell(v, base, better, name == baseline) for name, v in zip(names, values)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Ratios are the improvement over `{baseline}`: above 1 is better in every row.")
    return "\n".join(lines) + "\n"


def _new_figure(nrows: int, ncols: int, width_per_plot: float = 5.5, height_per_plot: float = 4.0):
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("plots need matplotlib: pip install 'fs-engine[bench]' (or pip install matplotlib)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width_per_plot * ncols, height_per_plot * nrows), layout="constrained")


def _plot_cdf(ax, values: Sequence[float], label: str) -> None:
    """Empirical CDF on a log-x axis. Zero values (tokens delivered together) cannot be drawn on it, but they
    still count in the fractions, so the curve starts at the share of zeros instead of hiding them."""
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, xs.size + 1) / max(xs.size, 1)
    positive = xs > 0
    ax.plot(xs[positive], ys[positive], drawstyle="steps-post", label=label)


def plot_latency_cdfs(runs: dict[str, list[RequestRecord]], path: str | Path) -> Path:
    """One PNG: the TTFT CDF and the CDF of every inter-token gap, a line per config."""
    fig = _new_figure(1, 2)
    ttft_ax, tbt_ax = fig.subplots(1, 2)
    for name, records in runs.items():
        _plot_cdf(ttft_ax, [r.ttft for r in records if r.ttft is not None], name)
        _plot_cdf(tbt_ax, [gap for r in records for gap in r.tbts], name)
    for ax, title in ((ttft_ax, "Time to first token"), (tbt_ax, "Time between tokens")):
        ax.set_xscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of " + ("requests" if ax is ttft_ax else "gaps"))
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_service_over_time(runs: dict[str, list[RequestRecord]], tenant_weights: dict[str, float],
                           path: str | Path, bin_s: float | None = None) -> Path:
    """One PNG, a subplot per config: each tenant's cumulative normalized service over time. Fair sharing
    shows as curves that rise together; ``bin_s`` defaults to a hundredth of the longest run."""
    if bin_s is None:
        last_s = max((r.token_times[-1] for rs in runs.values() for r in rs if r.token_times), default=0.0)
        bin_s = last_s / 100 if last_s > 0 else 1.0
    ncols = min(3, max(len(runs), 1))  # a grid, so five configs stay readable side by side
    nrows = math.ceil(max(len(runs), 1) / ncols)
    fig = _new_figure(nrows, ncols, width_per_plot=4.5, height_per_plot=3.5)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    for ax, (name, records) in zip(axes, runs.items()):
        for tenant, points in service_over_time(records, tenant_weights, bin_s).items():
            ax.plot([0.0] + [t for t, _ in points], [0.0] + [s for _, s in points], label=tenant)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("seconds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[::ncols]:
        ax.set_ylabel("cumulative service / weight")
    fig.savefig(path, dpi=120)
    return Path(path)


def write_step_log(steps: list[dict], path: str | Path) -> Path:
    """A simulated run's per-step trace (``SimExecutor.steps``) as CSV, one row per step."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(steps[0]) if steps else ["t"])
        writer.writeheader()
        writer.writerows(steps)
    return path


def write_report(out_dir: str | Path, results: dict[str, dict], runs: dict[str, list[RequestRecord]],
                 tenant_weights: dict[str, float], baseline: str) -> dict[str, Path]:
    """Write results.json, table.md and the two PNGs into ``out_dir``; returns the paths written by name.

    Without matplotlib the PNGs are skipped with a warning on stderr instead of failing, so a benchmark that
    ran for minutes still leaves its numbers behind; the returned dict then has no plot entries.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "table": out / "table.md"}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(markdown_table(results, baseline))
    if importlib.util.find_spec("matplotlib") is None:
        print(f"warning: matplotlib is not installed, no plots written to {out}", file=sys.stderr)
        return paths
    paths["latency_cdf"] = plot_latency_cdfs(runs, out / "latency_cdf.png")
    paths["service_over_time"] = plot_service_over_time(runs, tenant_weights, out / "service_over_time.png")
    return paths
