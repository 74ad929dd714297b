"""The engine on a simulated device: the production scheduler in virtual time, deterministic, and with the
real model's tokens when asked (``sim_execute="model"``) identical to the in-process engine's."""

from __future__ import annotations

import json

import pytest

from fs_engine.bench.cli import main
from fs_engine.bench.driver import run_in_process
from fs_engine.bench.workload import WorkloadConfig, generate
from fs_engine.engine.llm_engine import LLMEngine

# small, and tight enough that requests are preempted and swapped: 10 conversations arriving at once whose
# histories need more than the 40 x 4 KV slots
TRACE = WorkloadConfig(num_conversations=10, request_rate=float("inf"), scale=0.05, max_context=120,
                       priority_pattern="random", priority_interval_s=0.02, seed=4)
ENGINE = dict(block_size=4, num_gpu_blocks=40, policy="priority", preemption_cooldown_steps=1)


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return str(tiny_model_dirs["qwen3"])


def replay(model: str, **kwargs):
    engine = LLMEngine(model, **ENGINE, **kwargs)
    try:
        return run_in_process(engine, generate(TRACE), progress=False), engine
    finally:
        engine.shutdown()


def test_simulated_replies_equal_the_in_process_engine_and_runs_repeat_exactly(model):
    real, _ = replay(model)
    sim, engine = replay(model, device="sim:a100", sim_execute="model")
    assert sim.replies == real.replies  # the model's own greedy tokens, under the simulated schedule
    assert sim.engine_stats["num_preemptions"] > 0 and sim.engine_stats["num_swap_outs"] > 0
    again, _ = replay(model, device="sim:a100", sim_execute="model")
    assert [r.token_times for r in again.records] == [r.token_times for r in sim.records]  # to the bit
    assert again.duration_s == sim.duration_s
    # every token is stamped with virtual time: the run's length is the simulated device's, not this machine's
    assert sim.duration_s == pytest.approx(engine.stats()["sim_time_s"] - sim.records[0].sent_s, rel=0.5)


def test_shapes_only_runs_are_deterministic_and_identical_across_preemption_modes(model):
    first, _ = replay(model, device="sim:h100")
    second, _ = replay(model, device="sim:h100")
    assert [r.token_times for r in first.records] == [r.token_times for r in second.records]
    measured = {"wall_frontend_s"}  # this machine's real host time per step: the one figure that may differ
    assert {k: v for k, v in first.engine_stats.items() if k not in measured} == {
        k: v for k, v in second.engine_stats.items() if k not in measured}
    recompute, _ = replay(model, device="sim:h100", preemption_mode="recompute")
    assert recompute.replies == first.replies  # preemption changes when a token arrives, never which


def test_bench_ablate_simulate_writes_the_tables_and_step_logs(tmp_path, capsys):
    shapes = tmp_path / "llama3-8b"
    shapes.mkdir()
    (shapes / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "eos_token_id": 128009}))
    out = tmp_path / "ablation"
    code = main(["ablate", "--simulate", "a10", "--model", str(shapes), "--out", str(out), "--num-conversations",
                 "16", "--request-rate", "2", "--priority-pattern", "markov", "--priority-interval-s", "1",
                 "--num-gpu-blocks", "200", "--step-log", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "greedy replies identical to the baseline's: 5/5 configs" in printed
    results = json.loads((out / "results.json").read_text())
    baseline, full = results["baseline (vLLM-v0-like)"], results["+ KV reuse (fs-engine)"]
    assert baseline["engine"]["num_preemptions"] > 0
    assert baseline["engine"]["swap_wait_s"] > 0 and full["engine"]["swap_wait_s"] == 0  # sync vs async swaps
    # vLLM v0's copy pattern: a call per block, layer and K/V; block groups: a call per contiguous run
    assert baseline["engine"]["swap_copies"] > 10 * results["+ block groups"]["engine"]["swap_copies"]
    assert full["engine"]["swap_out_blocks"] < baseline["engine"]["swap_out_blocks"]
    steps = (out / "steps-reuse.csv").read_text().splitlines()
    assert steps[0].startswith("t,seconds,num_seqs") and len(steps) > 100
    assert "P99.9 TTFT" in (out / "table.md").read_text()


def test_simulated_device_refuses_multiprocess(model):
    with pytest.raises(ValueError, match="simulated device runs in this process"):
        LLMEngine(model, device="sim:a10", multiprocess=True)


def test_bench_run_simulate_prints_virtual_time_figures(model, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--simulate", "h200", "--model", model, "--num-conversations", "6", "--request-rate", "50",
                 "--scale", "0.05", "--max-context", "200", "--out", str(out), "--step-log", "--no-progress"])
    assert code == 0
    assert "requests in" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())["run"]
    assert summary["engine"]["sim_steps"] > 0 and summary["duration_s"] < 5  # virtual seconds on an H200
    assert (out / "steps-run.csv").read_text().startswith("t,seconds")
    replies = json.loads((out / "replies.json").read_text())  # every turn's ids, to compare two servers' runs
    assert len(replies) == summary["num_requests"] and sum(map(len, replies.values())) == summary["num_output_tokens"]
    assert main(["run", "--model", model, "--step-log", "--num-conversations", "1"]) == 2  # needs --simulate
    assert "--step-log needs --simulate" in capsys.readouterr().err


def test_a_sharded_model_on_simulated_gpus_gives_the_same_replies(model):
    one, _ = replay(model, device="sim:h100")
    two, engine = replay(model, device="sim:h100", tensor_parallel_size=2)
    assert two.replies == one.replies  # the shapes-only tokens depend on the context, never on the schedule
    assert engine.executor.shape.tp == 2 and engine.executor.rank_layout.block_bytes * 2 == engine.executor.layout.block_bytes
    assert two.engine_stats["num_swap_outs"] > 0
    with pytest.raises(ValueError, match="no all-reduce profile"):
        LLMEngine(model, device="sim:a10", tensor_parallel_size=2, **ENGINE)
