"""Tensor parallelism on CPU (gloo): one worker process per rank gives the single-rank tokens, under swap
preemption, recompute and multi-turn reuse, through the engine API and through ``fs-engine launch``; a dead
rank fails the engine fast and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fs_engine import LLM, LLMEngine, SamplingParams
from fs_engine.client import Client
from ipc.errors import EngineDeadError
from tests.conftest import random_prompts
from tests.launcher import Launched, alive

# tight memory and priority churn: requests are preempted and swapped (every rank's share of the same blocks)
ARGS = {"num_gpu_blocks": 40, "block_size": 4, "policy": "priority", "preemption_cooldown_steps": 1}
PROMPTS = random_prompts(1000, [5, 40, 17, 60, 9, 33], seed=2)


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 20, churn: bool = True,
             tag: str = "r") -> dict[str, list[int]]:
    """Greedy tokens of every prompt, changing priorities every third step (swaps) when ``churn``."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params, priority=i % 3)
    outputs, steps = {}, 0
    for ready in engine.run():
        outputs.update((o.request_id, o.token_ids) for o in ready if o.finished)
        steps += 1
        if churn and steps % 3 == 0:
            for request_id in list(engine.scheduler.requests):
                engine.update_priority(request_id, (steps // 3 + int(request_id[len(tag):])) % 4)
    return outputs


def stream_all(address: str) -> tuple[list[list[int]], dict]:
    """Every prompt streamed at once through one client (greedy, 16 tokens), and the server's stats after."""
    with Client(address, timeout_s=60) as client:
        streams = [client.generate(p, max_tokens=16, temperature=0, ignore_eos=True, priority=i % 3)
                   for i, p in enumerate(PROMPTS)]
        got = [[t for event in stream for t in event.token_ids] for stream in streams]
        return got, client.stats()


@pytest.fixture(scope="module")
def single_rank(tiny_model_dirs) -> dict[str, dict[str, list[int]]]:
    """The reference: each architecture at tensor_parallel_size=1, in process."""
    return {arch: generate(LLMEngine(path, **ARGS), PROMPTS) for arch, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("qwen3", 4)])
def test_ranks_give_the_single_rank_tokens_under_swap_preemption(tiny_model_dirs, single_rank, arch, tp):
    # the tiny checkpoints have 4 query and 2 KV heads: at 4 ranks each KV head is replicated on two ranks
    engine = LLMEngine(tiny_model_dirs[arch], multiprocess=True, tensor_parallel_size=tp, **ARGS)
    try:
        assert len(engine.executor.worker_pids) == tp
        got = generate(engine, PROMPTS)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert got == single_rank[arch]
    assert stats["num_swap_outs"] > 0 and stats["num_swap_ins"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]


def test_compiled_ranks_give_the_eager_single_rank_tokens_and_compile_once(tiny_model_dirs, single_rank):
    """``compile=on`` at two ranks: Dynamo traces the row-parallel layers' all-reduce into the one graph (no
    graph break, ``fullgraph``), and swap preemption's batch sizes never recompile it (the count comes back
    from rank 0 with every step)."""
    engine = LLMEngine(tiny_model_dirs["qwen3"], multiprocess=True, tensor_parallel_size=2, compile="on", **ARGS)
    try:
        assert engine.executor.forward.startswith("compiled (1 graph,")
        got = generate(engine, PROMPTS)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert got == single_rank["qwen3"]
    assert stats["num_swap_outs"] > 0 and stats["num_compilations"] == 1


def test_ranks_give_the_single_rank_tokens_under_recompute_and_multi_turn_reuse(tiny_model_dirs):
    model = tiny_model_dirs["qwen3"]
    recompute = {**ARGS, "preemption_mode": "recompute"}
    expected = generate(LLMEngine(model, **recompute), PROMPTS)
    engine = LLMEngine(model, multiprocess=True, tensor_parallel_size=2, **recompute)
    try:
        assert generate(engine, PROMPTS) == expected
        assert engine.stats()["num_recomputed_tokens"] > 0
    finally:
        engine.shutdown()

    # a second turn whose prompt is the first turn's prompt and answer: its history's KV is reused
    first = LLM(model).generate(PROMPTS[:3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    turns = [p + o.token_ids + [7, 8, 9] for p, o in zip(PROMPTS[:3], first)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reference = LLM(model)
    reference.generate(PROMPTS[:3], params)
    expected_turns = [o.token_ids for o in reference.generate(turns, params)]
    sharded = LLM(model, tensor_parallel_size=2)
    try:
        sharded.generate(PROMPTS[:3], params)
        before = sharded.engine.stats()["reused_prefix_tokens"]
        assert [o.token_ids for o in sharded.generate(turns, params)] == expected_turns
        assert sharded.engine.stats()["reused_prefix_tokens"] > before
    finally:
        sharded.engine.shutdown()


def test_launch_with_two_ranks_serves_the_single_rank_tokens(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["qwen2"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, **ARGS).generate(PROMPTS, params)]
    server = Launched(model, tmp_path / "stderr.log", tensor_parallel_size=2)
    try:
        got, stats = stream_all(server.address)
        assert got == expected
        assert len(server.processes()["workers"]) == 2
        pids = server.processes()["children"]
    finally:
        assert server.stop() == 0
    time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "a rank or the swap process outlived the launch"


def test_a_killed_rank_fails_the_engine_fast_and_leaves_no_orphans(tiny_model_dirs):
    engine = LLMEngine(tiny_model_dirs["qwen3"], multiprocess=True, tensor_parallel_size=2, **ARGS)
    pids = engine.executor.child_pids()
    run_dir = engine.executor.run_dir
    params = SamplingParams(max_tokens=90, temperature=0, ignore_eos=True)
    try:
        for i, prompt in enumerate(random_prompts(1000, [30, 50, 20], seed=4)):
            engine.add_request(f"r{i}", prompt, params, priority=i)
        for _ in range(3):
            engine.step()
        os.kill(engine.executor.worker_pids[1], signal.SIGKILL)  # not rank 0: it returns no results to miss
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker-1"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 10
    finally:
        engine.shutdown()
    time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "a child process outlived the engine"
    assert not run_dir.exists(), "the engine left its sockets and shared memory behind"


@pytest.mark.parametrize("args,match", [
    ({"tensor_parallel_size": 3, "multiprocess": True}, "does not divide the model's num_attention_heads=4"),
    ({"tensor_parallel_size": 2, "multiprocess": False}, "pass multiprocess=True"),
])
def test_a_sharding_that_cannot_work_is_refused_before_any_process_starts(tiny_model_dirs, args, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(tiny_model_dirs["qwen3"], **args)


def test_a_rank_that_cannot_start_fails_the_engine_with_its_reason_and_nothing_left_running(tiny_model_dirs):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # the rendezvous port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = {p.pid for p in __import__("multiprocessing").active_children()}
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"worker rank 0 failed(.|\n)*(address already in use|EADDRINUSE)"):
            LLMEngine(tiny_model_dirs["qwen3"], multiprocess=True, tensor_parallel_size=2, master_port=port)
        assert time.monotonic() - start < 60
    time.sleep(0.2)
    leftover = {p.pid for p in __import__("multiprocessing").active_children()} - before
    assert not leftover, "a rank or the swap process outlived the failed start"


def _free_port_run(count: int) -> int:
    """A port whose next ``count`` ports are free too (the engine's sockets count up from master_port)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            held = []
            for port in range(base, base + count + 1):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


def test_two_launch_commands_are_one_engine_over_two_machines(tiny_model_dirs, tmp_path):
    """``--nnodes 2``: node 1's launch runs rank 1 and its own swap process, node 0's the frontend and rank 0;
    the ranks meet through torch.distributed's rendezvous at --master-addr/--master-port, the sockets over
    TCP. On this machine both nodes are local, which is the whole path but the network."""
    import subprocess
    import sys

    from tests.launcher import ENGINE_FLAGS, ROOT

    model = tiny_model_dirs["qwen2"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, **ENGINE_FLAGS).generate(PROMPTS, params)]
    port = _free_port_run(8)
    flags = {**ENGINE_FLAGS, "tensor_parallel_size": 2, "nnodes": 2, "master_port": port}
    argv = [sys.executable, "-m", "fs_engine", "launch", "--model", str(model), "--node-rank", "1"]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    node1 = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=(tmp_path / "node1.log").open("w"),
                             text=True)
    try:
        assert "running ranks [1]" in node1.stdout.readline()
        server = Launched(model, tmp_path / "node0.log", node_rank=0, **flags)
        try:
            got, stats = stream_all(server.address)
            assert got == expected
            assert len(server.processes()["workers"]) == 2 and stats["num_swap_outs"] > 0
        finally:
            assert server.stop() == 0
        assert node1.wait(30) == 0  # the frontend's shutdown stops every machine's processes
    finally:
        if node1.poll() is None:
            node1.kill()


def test_machines_started_with_other_engine_arguments_are_refused(tiny_model_dirs, tmp_path):
    import subprocess
    import sys

    from tests.launcher import ROOT

    model = tiny_model_dirs["qwen3"]
    port = _free_port_run(8)
    common = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-port", str(port), "--block-size", "4"]
    node1 = subprocess.Popen([sys.executable, "-m", "fs_engine", "launch", "--model", str(model), "--node-rank", "1",
                              *common, "--num-gpu-blocks", "40"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=(tmp_path / "node1.log").open("w"), text=True)
    try:
        with pytest.raises(EngineDeadError, match=r"ranks \[1\] run with other engine arguments"):
            LLMEngine(model, multiprocess=True, tensor_parallel_size=2, nnodes=2, master_port=port, block_size=4,
                      num_gpu_blocks=48)
        assert node1.wait(30) == 0  # told to shut down with the rest
    finally:
        if node1.poll() is None:
            node1.kill()
