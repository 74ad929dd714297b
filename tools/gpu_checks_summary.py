"""The summary of a ``tools/gpu_checks.sh`` run: one table of steps and the headline figures of each.

Reads the run's work directory (``steps.tsv``, the pytest JUnit files, each benchmark's JSON, the calibration
directory) and writes into ``--out``: ``summary.md``, ``results.json`` (every step's figures as the tools wrote
them), ``raw.tar.gz`` (the work directory) and, after a calibration, ``profile.json`` and ``validation.md``.
Whatever a step left unwritten (it failed, timed out or was skipped) is left out, never invented. With ``--print``
the summary goes to stdout too and the exit status is 0 only if every step that ran passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

TEST_STEPS = ("kernels", "gpu-tests", "engine")
BENCH_FILES = ("bandwidth", "swap_copy", "swap_copy_scattered", "overlap", "decode", "decode_compiled")


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict]:
    rows = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, limit = line.split("\t")
        rows.append({"step": name, "status": status, "rc": rc, "seconds": int(seconds), "timeout_s": limit})
    return rows


def junit(path: Path) -> dict | None:
    """Counts and the ids of the failed tests of one pytest JUnit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def headline(results: dict) -> list[str]:
    """The figures the README and docs/BENCHMARKS.md record, one line each."""
    lines = []
    for name in TEST_STEPS:
        t = results.get(f"{name}_tests")
        if t and not t["tests"]:
            lines.append(f"- {name} tests: none ran (collected only)")
        elif t:
            lines.append(f"- {name} tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} "
                         f"skipped" + "".join(f"\n  - FAILED {f}" for f in t["failed"][:20]))
    bw = results.get("bandwidth")
    if bw:
        c = bw["ceiling"]
        lines.append(f"- pinned copy ceiling ({bw['device']}, {c['bytes'] >> 20} MiB copies): h2d {c['h2d_gb_per_s']} "
                     f"GB/s, d2h {c['d2h_gb_per_s']} GB/s, both at once {c['both_gb_per_s']} GB/s")
    for key, label in (("swap_copy", "contiguous"), ("swap_copy_scattered", "scattered")):
        sc = results.get(key)
        for row in (sc or {}).get("rows", []):
            parts = [f"{g} {row[g]['calls']} calls {row[g]['gb_per_s']} GB/s ({row[g]['fraction_of_ceiling']:.0%})"
                     for g in ("group", "block", "block_layer") if g in row]
            lines.append(f"- swap out+in, {row['tokens']} tokens, {label}: " + ", ".join(parts)
                         + f"; group vs block_layer latency {fmt(row.get('speedup_group_vs_block_layer'))}x")
    ov = results.get("overlap")
    if ov:
        r = ov["results"]
        base = r.get("no swaps", {}).get("median_step_ms")
        for label, m in r.items():
            slow = m["median_step_ms"] / base if base else None
            lines.append(f"- decode step, {label}: median {m['median_step_ms']} ms ({fmt(slow)}x), swaps out/in "
                         f"{m['swap_outs']}/{m['swap_ins']}")
    for key in ("decode", "decode_compiled"):
        d = results.get(key)
        for row in (d or {}).get("rows", []):
            cells = [f"{n} {row[n]['decode_tokens_per_s']}" for n in
                     ("eager", "graphs", "compiled", "compiled+graphs", "transformers") if n in row]
            ratios = [f"{k.replace('_vs_', ' vs ')} {row[k]}x" for k in row
                      if k.endswith(("_vs_eager", "_vs_transformers"))]
            if "compiled+graphs" in row and "graphs" in row:
                cg = row["compiled+graphs"]["decode_tokens_per_s"] / row["graphs"]["decode_tokens_per_s"]
                ratios.append(f"compiled+graphs vs graphs {cg:.2f}x")
            lines.append(f"- decode tokens/s, batch {row['batch']} ({d['device']}, {d['dtype']}): " + ", ".join(cells)
                         + ("; " + ", ".join(ratios) if ratios else ""))
        for name, ran in (d or {}).get("ran", {}).items():
            if "warm_start_s" in ran:
                lines.append(f"- {name} start: {ran['start_s']} s cold, {ran['warm_start_s']} s warm "
                             f"({ran.get('forward', '')})")
    cal = results.get("calibration")
    if cal:
        r = cal["report"]
        lines.append(f"- calibration: {r.get('measured_steps')} steps, step-time fit median error "
                     f"{fmt(r.get('step_fit_median_error'), '.1%')}, p90 {fmt(r.get('step_fit_p90_error'), '.1%')}; "
                     f"copies median error {fmt(r.get('copy_fit_median_error'), '.1%')}")
    prof = results.get("profile_vs_shipped")
    if prof:
        lines.append(f"- fitted profile vs shipped `{prof['shipped']}`: " + ", ".join(
            f"{k} {fmt(v['fitted'], '.3g')} vs {fmt(v['shipped'], '.3g')}" for k, v in prof["fields"].items()))
    val = results.get("validation")
    if val:
        checks = [c for rows in val.values() for c in rows]
        bad = [f"{config}: {c['metric']} {c['error']:.0%}" for config, rows in val.items() for c in rows if not c["ok"]]
        lines.append(f"- real vs simulated: {len(checks) - len(bad)}/{len(checks)} within tolerance"
                     + (" (outside: " + "; ".join(bad) + ")" if bad else ""))
    return lines


def compare_profile(profile: dict) -> dict | None:
    """The fitted profile's copy and host terms beside the shipped profile of the same GPU, when there is one."""
    try:
        from fs_engine.sim.devices import get_profile
    except ImportError:
        return None
    name = str(profile.get("name", "")).lower()
    for shipped in ("h200", "h100", "a100", "a10"):
        if shipped in name:
            try:
                ref = dataclasses.asdict(get_profile(shipped))
            except Exception:  # noqa: BLE001 - the comparison is a nicety; the fitted profile stands alone
                return None
            keys = ("pcie_bw", "dma_latency_s", "duplex_factor", "copy_interference", "step_host_s", "seq_host_s",
                    "kernel_launch_s", "graph_launch_s")
            return {"shipped": f"sim:{shipped}", "fields": {k: {"fitted": profile.get(k), "shipped": ref.get(k)}
                                                           for k in keys if k in profile or k in ref}}
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--print", action="store_true", help="print the summary and exit non-zero if a step failed")
    args = ap.parse_args()
    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)

    steps = read_steps(work)
    results: dict = {"device": (work / "device.txt").read_text().strip() if (work / "device.txt").exists() else "",
                     "steps": steps}
    for name in TEST_STEPS:
        if (t := junit(work / f"{name}.xml")) is not None:
            results[f"{name}_tests"] = t
    for name in BENCH_FILES:
        if (data := load_json(work / f"{name}.json")) is not None:
            results[name] = data
    cal_dir = work / "calibrate"
    if (cal := load_json(cal_dir / "calibration.json")) is not None:
        results["calibration"] = {"report": cal.get("report", {})}  # the raw samples stay in raw.tar.gz
    if (profile := load_json(cal_dir / "profile.json")) is not None:
        results["profile"] = profile
        results["profile_vs_shipped"] = compare_profile(profile)
        shutil.copy(cal_dir / "profile.json", out / "profile.json")
    if (val := load_json(cal_dir / "validation.json")) is not None:
        results["validation"] = val
    if (cal_dir / "validation.md").exists():
        shutil.copy(cal_dir / "validation.md", out / "validation.md")

    table = ["| step | status | rc | seconds | timeout |", "|---|---|---:|---:|---:|"]
    table += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['timeout_s']} |" for s in steps]
    summary = "\n".join(["# GPU checks", "", "```", results["device"], "```", "", *table, "", *headline(results), ""])
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with tarfile.open(out / "raw.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu-checks")
    if args.print:
        print(summary)
        ran = [s for s in steps if not s["status"].startswith("skipped")]
        return 0 if ran and all(s["status"] == "ok" for s in ran) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
