"""The serving benchmark end to end at tiny size: trace -> replay (in-process and through fs-engine launch)
-> metrics -> the ablation's table and plots."""

from __future__ import annotations

import json
import signal

import pytest

from fs_engine.bench.cli import main
from fs_engine.bench.driver import run_against_server, run_in_process
from fs_engine.bench.workload import Trace, WorkloadConfig, generate
from fs_engine.engine.llm_engine import LLMEngine
from tests.launcher import Launched

# small enough for CI, tight enough that requests are preempted: 8 conversations arriving within ~0.05 s
# (a fast machine finishes first turns sooner than they arrived at 30/s and nothing is preempted),
# whose requests need about twice the 24 x 4 KV slots
WORKLOAD = ["--num-conversations", "8", "--request-rate", "200", "--scale", "0.05", "--max-context", "90",
            "--tenants", "a=2,b=1", "--priority-pattern", "random", "--priority-interval-s", "0.05",
            "--trace-seed", "3"]
ENGINE = ["--block-size", "4", "--num-gpu-blocks", "24", "--preemption-cooldown-steps", "1"]


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return str(tiny_model_dirs["qwen3"])


def test_ablation_writes_results_table_and_plots(model, tmp_path, capsys):
    out = tmp_path / "ablation"
    code = main(["ablate", "--model", model, "--out", str(out), *WORKLOAD, *ENGINE,
                 "--slo-ttft", "2", "--slo-tbt", "0.5", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "greedy replies identical to the baseline's: 5/5 configs" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["baseline (vLLM-v0-like)", "+ block groups", "+ async swap", "+ KV reuse (fs-engine)",
                             "recompute"]
    trace = Trace.load(out / "trace.json")
    for name, summary in results.items():
        assert summary["num_requests"] == trace.num_requests, name
        assert summary["identical_replies_to_baseline"], name
        assert summary["throughput_tokens_per_s"] > 0 and 0 < summary["jain_index"] <= 1
        assert 0 <= summary["slo"]["attainment"] <= 1
        assert set(summary["tenants"]) <= {"a", "b"}
    engine = {name: s["engine"] for name, s in results.items()}
    assert engine["baseline (vLLM-v0-like)"]["num_swap_outs"] > 0, "the workload was meant to preempt"
    assert engine["recompute"]["num_swap_outs"] == 0  # its victims drop their KV instead
    assert engine["+ KV reuse (fs-engine)"]["reused_prefix_tokens"] > 0, "later turns reuse earlier turns' KV"
    assert engine["+ async swap"]["reused_prefix_tokens"] == 0  # reuse off
    table = (out / "table.md").read_text()
    assert "P99.9 TBT" in table and "Throughput" in table and "SLO" in table
    for plot in ("latency_cdf.png", "service_over_time.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_through_launch_matches_in_process(model, tmp_path):
    trace = generate(WorkloadConfig(num_conversations=5, request_rate=20.0, scale=0.04, max_context=160,
                                    priority_pattern="markov", priority_interval_s=0.05, seed=5))
    engine = LLMEngine(model, block_size=4, num_gpu_blocks=40, policy="priority")
    try:
        local = run_in_process(engine, trace, progress=False)
    finally:
        engine.shutdown()
    launched = Launched(model, tmp_path / "stderr.log", num_gpu_blocks=40)
    try:
        served = run_against_server(launched.address, trace, progress=False, timeout_s=60)
    finally:
        assert launched.stop(signal.SIGTERM) == 0
    assert served.replies == local.replies  # the same conversations, token for token
    assert len(served.records) == len(local.records) == trace.num_requests
    assert served.engine_stats["num_finished_requests"] == trace.num_requests
    for record in served.records:
        assert len(record.token_times) == len(served.replies[record.request_id]) > 0
        assert record.token_times == sorted(record.token_times) and record.token_times[0] >= record.sent_s


def test_generate_writes_a_trace_and_bad_flags_say_what_to_change(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["generate", "--out", str(out), "--num-conversations", "7", "--trace-seed", "1"]) == 0
    assert len(Trace.load(out).conversations) == 7
    assert main(["generate", "--out", str(out), "--scale", "0"]) == 2
    assert "scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", "--out", str(tmp_path), "--configs"])  # argparse: --configs needs a value
    assert main(["ablate", "--out", str(tmp_path / "x"), "--configs", "nope"]) == 2
    assert "choose from baseline, groups, async, reuse, recompute" in capsys.readouterr().err
