"""The multi-process engine: worker and swap processes over ZeroMQ give the in-process tokens, and a dead
child becomes a clear error, never a hang or an orphan."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fs_engine import LLMEngine, SamplingParams
from ipc.errors import EngineDeadError
from tests.conftest import random_prompts
from tests.launcher import alive

ARGS = {"num_gpu_blocks": 40, "block_size": 4, "policy": "priority", "preemption_cooldown_steps": 1}


def run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, priority=i % 3)
    outputs, steps = {}, 0
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        steps += 1
        if steps % 3 == 0:  # priority churn: swaps go through the swap process
            for request_id in list(engine.scheduler.requests):
                engine.update_priority(request_id, (steps // 3 + int(request_id[1:])) % 4)
    return outputs


def test_multiprocess_engine_matches_in_process_under_swaps(tiny_model_dirs):
    model = tiny_model_dirs["qwen3"]
    prompts = random_prompts(1000, [5, 40, 17, 60, 9, 33], seed=2)
    expected = run(LLMEngine(model, **ARGS), prompts)
    engine = LLMEngine(model, multiprocess=True, **ARGS)
    try:
        got = run(engine, prompts)
        stats = engine.stats()
        assert stats["num_swap_outs"] > 0 and stats["num_swap_ins"] > 0
        assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    finally:
        pids = engine.executor.child_pids()
        run_dir = engine.executor.run_dir
        engine.shutdown()
    assert got == expected
    assert not any(alive(pid) for pid in pids), "a child process outlived the engine"
    assert not run_dir.exists(), "the engine left its sockets and shared memory behind"


@pytest.mark.parametrize("victim", ["worker", "swap"])
def test_a_killed_child_fails_the_engine_fast_and_leaves_no_orphans(tiny_model_dirs, victim):
    engine = LLMEngine(tiny_model_dirs["qwen3"], multiprocess=True, **ARGS)
    pids = engine.executor.child_pids()
    target = engine.executor.worker_pids[0] if victim == "worker" else engine.executor.swap_pid
    params = SamplingParams(max_tokens=90, temperature=0, ignore_eos=True)
    try:
        for i, prompt in enumerate(random_prompts(1000, [30, 50, 20], seed=4)):
            engine.add_request(f"r{i}", prompt, params, priority=i)
        for _ in range(3):
            engine.step()
        os.kill(target, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="died|failed"):
            steps = 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
                if steps % 2 == 0:  # keep swapping, so a dead swap process is noticed too
                    for request_id in list(engine.scheduler.requests):
                        engine.update_priority(request_id, (steps + int(request_id[1:])) % 3)
        assert time.monotonic() - start < 10
    finally:
        engine.shutdown()
    time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "a child process outlived the engine"


def test_async_scheduling_gives_the_in_process_tokens_under_swaps_and_stop_tokens(tiny_model_dirs):
    """``run()`` on the multi-process engine plans each step before the previous one's tokens are back (the
    worker fills them in); with priority churn (swaps through the swap process) and a stop token that ends a
    request one planned step early, every request's tokens are still the in-process engine's."""
    model = tiny_model_dirs["qwen3"]
    prompts = random_prompts(1000, [5, 40, 17, 60, 9, 33], seed=2)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    reference = LLMEngine(model, **ARGS)
    for i, prompt in enumerate(prompts):
        reference.add_request(f"r{i}", prompt, greedy)
    free_run = {}
    while reference.has_unfinished_requests():
        free_run.update((o.request_id, o.token_ids) for o in reference.step() if o.finished)
    stop = free_run["r1"][6]  # r1 stops at its first occurrence of this token
    cut = free_run["r1"].index(stop) + 1
    expected = {**free_run, "r1": free_run["r1"][:cut]}

    engine = LLMEngine(model, multiprocess=True, **ARGS)
    try:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                    stop_token_ids=[stop] if i == 1 else [])
            engine.add_request(f"r{i}", prompt, params, priority=i % 3)
        got, steps = {}, 0
        for outputs in engine.run():
            got.update((o.request_id, o.token_ids) for o in outputs if o.finished)
            steps += 1
            if steps % 3 == 0:  # priority churn: swaps, and plans that copy KV run alone
                for request_id in list(engine.scheduler.requests):
                    engine.update_priority(request_id, (steps // 3 + int(request_id[1:])) % 4)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert got == expected
    assert stats["num_async_plans"] > 0, "no plan was made while a step ran"
    assert stats["num_swap_outs"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
