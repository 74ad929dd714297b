"""One table of the simulated paper-scale runs (tools/sim_paper_eval.sh) beside FastSwitch's reported gains.

    python tools/sim_paper_summary.py [OUT_ROOT]        # default bench_results/sim

For each run: the full system's (``+ KV reuse (fs-engine)``) improvement over the vLLM-v0-like baseline on the
tail rows, the share of swapped-out blocks it saves, and the context-switch latency gain of block groups alone
(mean swap command latency of ``+ block groups`` against the baseline, both with synchronous swaps, as
FastSwitch measured its 3.11x). Ratios above 1 are better. It also rewrites each run's table.md from its
results.json, so every table has the current row labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fs_engine.bench.report import improvement, markdown_table  # noqa: E402

BASELINE, GROUPS, FULL = "baseline (vLLM-v0-like)", "+ block groups", "+ KV reuse (fs-engine)"
COLUMNS = [("P95 TTFT", ("ttft_s", "p95")), ("P99 TTFT", ("ttft_s", "p99")), ("P99.9 TTFT", ("ttft_s", "p99.9")),
           ("P99 TBT", ("tbt_s", "p99")), ("P99.9 TBT", ("tbt_s", "p99.9"))]
FASTSWITCH = "| FastSwitch (reported, real GPUs) | 4.3-5.8x | | | | 3.6-11.2x | up to 1.44x | 53% | 3.11x |"


def _get(summary: dict, path: tuple[str, ...]) -> float:
    for key in path:
        summary = summary[key]
    return float(summary)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_results/sim")
    header = ["run", *[c for c, _ in COLUMNS], "throughput", "fewer swap-out blocks", "context switch (groups)"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for results_path in sorted(root.glob("*/results.json")):
        results = json.loads(results_path.read_text())
        (results_path.parent / "table.md").write_text(markdown_table(results, BASELINE))
        base, full = results[BASELINE], results[FULL]
        cells = [f"{improvement(_get(full, p), _get(base, p), 'lower'):.3g}x" for _, p in COLUMNS]
        cells.append(f"{improvement(full['throughput_tokens_per_s'], base['throughput_tokens_per_s'], 'higher'):.3g}x")
        saved = 1 - full["engine"]["swap_out_blocks"] / base["engine"]["swap_out_blocks"]
        cells.append(f"{saved:.0%}")
        switch = base["engine"]["mean_swap_ms"] / results[GROUPS]["engine"]["mean_swap_ms"]
        cells.append(f"{switch:.3g}x")
        lines.append(f"| {results_path.parent.name} | " + " | ".join(cells) + " |")
    lines.append(FASTSWITCH)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
