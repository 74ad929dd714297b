"""Smoke tests: every benchmark in tools/ runs end to end at tiny size and reports what it promises."""

from __future__ import annotations

import json
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
    assert "overhead" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen2.5-32b"])
def test_shape_configs_describe_the_real_models(tmp_path, monkeypatch, shape):
    from fs_engine.model_config import load_model_arch

    run_tool("make_shapes_config.py", ["--shape", shape, "--out", str(tmp_path)], monkeypatch)
    arch = load_model_arch(tmp_path)
    kv_bytes_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2  # K and V, bfloat16
    expected = {"llama3-8b": 131072, "qwen2.5-32b": 262144}[shape]  # 128 KiB and 256 KiB per token
    assert kv_bytes_per_token == expected
