"""Smoke tests: every benchmark in tools/ runs end to end at tiny size and reports what it promises."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run_tool(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(TOOLS / name), run_name="__main__")


def test_bench_offline_reports_a_ratio(tmp_path, monkeypatch, capsys):
    out = tmp_path / "offline.json"
    run_tool("bench_offline.py", ["--preset", "test", "--num-prompts", "3", "--max-len", "40",
                                  "--max-tokens", "6", "--repeats", "1", "--json", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert result["fs_engine_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    assert result["identical_outputs"] == "3/3"
    assert "ratio" in capsys.readouterr().out


@pytest.mark.parametrize("placement", ["contiguous", "scattered"])
def test_bench_swap_compares_granularities(tmp_path, monkeypatch, placement):
    out = tmp_path / "swap.json"
    run_tool("bench_swap.py", ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
                               "--tokens", "64,256", "--repeats", "1", "--placement", placement,
                               "--json", str(out)], monkeypatch)
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [64, 256]
    for row in rows:
        blocks = row["blocks"]
        # the copy calls each pattern needs for a swap-out plus a swap-in
        assert row["block"]["calls"] == 2 * blocks
        assert row["block_layer"]["calls"] == 2 * blocks * 2 * 2  # layers x (K, V)
        if placement == "contiguous":
            assert row["group"]["calls"] == 2 and row["runs"] == 1
        assert all(row[g]["gb_per_s"] > 0 for g in ("group", "block", "block_layer"))


def test_bench_swap_overlap_and_multiturn_scenarios(tmp_path, monkeypatch, capsys):
    out = tmp_path / "overlap.json"
    run_tool("bench_swap.py", ["--scenario", "overlap", "--mode", "sync,async", "--batch", "2",
                               "--ballast-tokens", "120", "--steps", "8", "--churn-every", "2",
                               "--workdir", str(tmp_path), "--json", str(out)], monkeypatch)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"no swaps", "sync swaps", "async swaps"}
    assert results["async swaps"]["swap_outs"] > 0 and results["no swaps"]["swap_ins"] == 0
    out = tmp_path / "multiturn.json"
    run_tool("bench_swap.py", ["--scenario", "multiturn", "--mode", "sync", "--conversations", "3", "--turns", "3",
                               "--reply-tokens", "6", "--workdir", str(tmp_path), "--json", str(out)], monkeypatch)
    results = json.loads(out.read_text())["results"]
    off, on = results["sync, reuse off"], results["sync, reuse on"]
    assert on["reused_prefix_tokens"] > 0 and off["reused_prefix_tokens"] == 0
    assert on["tokens_computed"] < off["tokens_computed"]
    assert off["preemptions"] > 0  # (bytes saved are asserted at a meaningful size in test_swap_reuse.py)
    assert "reuse cuts swapped-out bytes" in capsys.readouterr().out


def test_bench_multiprocess_reports_overhead_and_identical_tokens(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mp.json"
    run_tool("bench_multiprocess.py", ["--preset", "test", "--batches", "1,3", "--prompt-len", "8", "--max-tokens", "5",
                                       "--repeats", "1", "--served", "--json", str(out)], monkeypatch)
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["identical_outputs"] is True
        assert row["in-process"]["steps"] == row["multi-process"]["steps"] >= 5  # the same schedule
        assert row["served"]["steps"] >= row["in-process"]["steps"]  # requests may arrive a step apart
        assert row["tokens_per_s_ratio"] > 0 and row["served_tokens_per_s_ratio"] > 0
        assert all(0 <= row[m]["worker_idle_fraction"] < 1
                   for m in ("in-process", "multi-process", "mp-sync-sched", "served"))
        assert row["mp-sync-sched"]["steps"] == row["in-process"]["steps"] and row["sync_sched_tokens_per_s_ratio"] > 0
    assert "overhead" in capsys.readouterr().out


def test_bench_tensor_parallel_compares_rank_counts_on_the_same_tokens(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tp.json"
    run_tool("bench_tensor_parallel.py", ["--sizes", "1,2", "--batches", "2", "--prompt-len", "8", "--max-tokens", "4",
                                          "--repeats", "1", "--json", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["identical_outputs"] is True
    assert row["tp1"]["tokens_per_s"] > 0 and row["tp2"]["tokens_per_s"] > 0
    assert "TP=2 ms/step" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen2.5-32b"])
def test_shape_configs_describe_the_real_models(tmp_path, monkeypatch, shape):
    from fs_engine.model_config import load_model_arch

    run_tool("make_shapes_config.py", ["--shape", shape, "--out", str(tmp_path)], monkeypatch)
    arch = load_model_arch(tmp_path)
    kv_bytes_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2  # K and V, bfloat16
    expected = {"llama3-8b": 131072, "qwen2.5-32b": 262144}[shape]  # 128 KiB and 256 KiB per token
    assert kv_bytes_per_token == expected


def test_bench_swap_bandwidth_measures_the_ceiling_and_copy_reports_against_it(tmp_path, monkeypatch, capsys):
    import torch

    out = tmp_path / "bandwidth.json"
    run_tool("bench_swap.py", ["--scenario", "bandwidth", "--sizes", "64K,256K", "--repeats", "1",
                               "--json", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["bytes"] for r in rows] == [64 << 10, 256 << 10]
    for row in rows:
        assert all(row[d]["gb_per_s"] > 0 for d in ("h2d", "d2h", "both"))
        assert row["both"]["h2d_gb_per_s"] > 0 and row["both"]["d2h_gb_per_s"] > 0
    ceiling = result["ceiling"]  # the largest size's bandwidth, per direction
    assert ceiling["bytes"] == 256 << 10 and ceiling["h2d_gb_per_s"] == rows[-1]["h2d"]["gb_per_s"]
    printed = capsys.readouterr().out
    assert "ceiling at 256 KiB" in printed
    if not torch.cuda.is_available():  # no device: host-to-host copies, and the output must not pass them off as PCIe
        assert result["host_to_host"] and "host->host" in printed

    out = tmp_path / "copy.json"
    run_tool("bench_swap.py", ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
                               "--tokens", "64,256", "--repeats", "1", "--ceiling-size", "1M", "--json", str(out)],
             monkeypatch)
    result = json.loads(out.read_text())
    assert result["ceiling"]["bytes"] == 1 << 20 and result["ceiling"]["out_then_in_gb_per_s"] > 0
    for row in result["rows"]:
        for g in ("group", "block", "block_layer"):
            assert row[g]["fraction_of_ceiling"] > 0
            assert row[g]["out_fraction_of_d2h_ceiling"] > 0 and row[g]["in_fraction_of_h2d_ceiling"] > 0
    assert "ceil" in capsys.readouterr().out


def test_bench_decode_compares_eager_compiled_graphs_and_transformers(tmp_path, monkeypatch, capsys):
    out = tmp_path / "decode.json"
    run_tool("bench_decode.py", ["--preset", "test", "--batches", "1,2", "--prompt-len", "8", "--new-tokens", "8",
                                 "--repeats", "1", "--json", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    on_cpu = result["device"].startswith("cpu")
    names = ("eager", "compiled", "transformers") + (() if on_cpu else ("graphs", "compiled+graphs"))
    for row in result["rows"]:
        for name in names:
            assert row[name]["decode_tokens_per_s"] > 0 and row[name]["ms_per_step"] > 0
        assert row["compiled_vs_eager"] > 0 and row["eager_vs_transformers"] > 0
        assert row["compiled_identical_to_eager"] is True
    compiled = result["ran"]["compiled"]
    assert compiled["forward"].startswith("compiled (1 graph") and compiled["warm_start_s"] > 0
    assert result["ran"]["eager"]["forward"] == "eager"
    printed = capsys.readouterr().out
    if on_cpu:
        assert "graphs" not in result["ran"] and "'graphs' and 'compiled+graphs' are left out" in printed


def test_bench_engine_overhead_measures_this_tree_against_a_baseline(tmp_path, monkeypatch, capsys):
    import shutil
    import subprocess

    root = TOOLS.parent
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs the project's git history")
    out = tmp_path / "overhead.json"
    # the baseline is HEAD here (any commit of this history works; the default is the one before issue 12)
    run_tool("bench_engine_overhead.py", ["--baseline", "HEAD", "--live", "16,64", "--policies", "fcfs,priority",
                                          "--steps", "10", "--prep-requests", "8", "--prep-context", "256",
                                          "--prep-steps", "3", "--rounds", "2", "--json", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert result["rounds"] == 2
    for side in ("baseline", "current"):
        rows = result[side]["scheduler"]
        assert [(r["policy"], r["live"]) for r in rows] == [("fcfs", 16), ("fcfs", 64), ("priority", 16),
                                                            ("priority", 64)]
        assert all(r["median_ms"] > 0 for r in rows)
        plan = result[side]["plan"]
        assert plan["requests"] == 8 and plan["plan_kib"] > 0 and plan["median_ms"] > 0
    assert "speedup" in capsys.readouterr().out


def test_gpu_checks_rehearse_every_step_on_cpu(tmp_path):
    """``tools/gpu_checks.sh --dry-run``: every command of the one GPU run, at CPU size (the pytest steps
    collect only), so the run that GPU time is spent on cannot die on a typo, a moved file or a renamed flag."""
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("FS_TEST_ENGINE_ARGS", None)
    proc = subprocess.run(["bash", "tools/gpu_checks.sh", "--dry-run"], cwd=TOOLS.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    steps = {s["step"]: s["status"] for s in results["steps"]}
    assert steps == dict.fromkeys(["kernels", "gpu-tests", "engine", "bandwidth", "swap-copy", "overlap", "decode",
                                   "compiled", "calibrate"], "ok"), (out / "log.txt").read_text()[-3000:]
    for figures in ("bandwidth", "swap_copy", "swap_copy_scattered", "overlap", "decode", "decode_compiled",
                    "calibration", "profile"):
        assert figures in results, figures
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files  # what the device tool brings back
    assert "| calibrate | ok |" in proc.stdout  # the summary table prints last
