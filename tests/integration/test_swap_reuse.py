"""Asynchronous swaps and the CPU KV reuse store with a real model: same tokens, fewer bytes, no stalls."""

from __future__ import annotations

import random
import time

import pytest

from fs_engine import LLMEngine, SamplingParams
from fs_engine.engine.multiturn import run_conversations
from fs_engine.request import RequestStatus
from tests.conftest import random_prompts
from tests.integration.test_preemption import assert_idle

BLOCK = 4
REPLY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return tiny_model_dirs["qwen3"]


def conversation_messages(num_conversations: int = 4, turns: int = 5, seed: int = 0) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(1000) for _ in range(rng.randint(3, 14))] for _ in range(turns)]
            for _ in range(num_conversations)]


def flip_priorities(seed: int, every: int = 2):
    rng = random.Random(seed)

    def on_step(engine: LLMEngine, step: int) -> None:
        if step % every == 0:
            for request_id in list(engine.scheduler.requests):
                engine.update_priority(request_id, rng.randrange(4))

    return on_step


def chat(model, *, flips: bool, **engine_args):
    engine = LLMEngine(model, policy="priority", block_size=BLOCK, **engine_args)
    on_step = flip_priorities(seed=3) if flips else None
    replies = run_conversations(engine, conversation_messages(), REPLY, think_steps=3, on_step=on_step)
    return [[o.token_ids for o in conv] for conv in replies], replies, assert_idle(engine)


@pytest.fixture(scope="module")
def reference(model):
    """Plenty of memory, no priority changes, no reuse: no preemption, every prompt prefilled in full."""
    tokens, _, stats = chat(model, flips=False, enable_kv_reuse=False)
    assert stats["num_preemptions"] == 0
    return tokens


# 4 conversations of up to ~130 tokens (33 blocks of 4) each: 40 blocks hold barely more than one of them
TIGHT = {"num_gpu_blocks": 40, "preemption_cooldown_steps": 1, "flips": True}


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("mode", ["sync", "async", "adaptive"])
def test_multi_turn_preemption_keeps_tokens_identical(model, reference, mode, reuse):
    tokens, _, stats = chat(model, swap_mode=mode, enable_kv_reuse=reuse, **TIGHT)
    assert tokens == reference
    assert stats["num_swap_outs"] >= 5 and stats["num_swap_ins"] >= 5
    if reuse:
        assert stats["reused_prefix_tokens"] > 0 and stats["cpu_store_hits"] > 0
    else:
        assert stats["reused_prefix_tokens"] == 0 and stats["reused_swap_out_bytes"] == 0


def test_reuse_halves_swapped_out_bytes_and_later_turns_prefill_only_new_tokens(model, reference, capsys):
    runs = {reuse: chat(model, swap_mode="sync", enable_kv_reuse=reuse, **TIGHT) for reuse in (False, True)}
    for reuse, (tokens, _, _) in runs.items():
        assert tokens == reference
    off, on = runs[False][2], runs[True][2]
    with capsys.disabled():
        print(f"\nmulti-turn swap-out bytes: reuse off {off['swap_out_bytes']}, reuse on {on['swap_out_bytes']} "
              f"(+{on['reused_swap_out_bytes']} not copied); tokens computed: {off['num_batched_tokens']} -> "
              f"{on['num_batched_tokens']}; history tokens reused: {on['reused_prefix_tokens']} "
              f"({on['reused_resident_tokens']} still on the device, the rest swapped in from the CPU store)")
    # reuse writes finished turns back (counted), yet moves at most half the bytes of copying every swap whole
    assert on["swap_out_bytes"] <= 0.5 * (off["swap_out_bytes"])
    assert on["num_batched_tokens"] < 0.6 * off["num_batched_tokens"]
    # every later turn took its history's full blocks from the device or the CPU store and prefilled only the rest
    replies = runs[True][1]
    for conv in replies:
        for prev, out in zip(conv, conv[1:]):
            history_with_kv = len(prev.prompt_token_ids) + len(prev.token_ids) - 1  # the last reply token has none
            full_blocks = min(history_with_kv, len(out.prompt_token_ids) - 1) // BLOCK * BLOCK
            assert out.num_cached_tokens == full_blocks, (out.request_id, out.num_cached_tokens, full_blocks)


def test_async_decode_continues_while_a_slow_swap_is_in_flight(model):
    """A big request is swapped out through a copier slowed to 0.4 s per command; the resident request keeps
    producing tokens meanwhile. In sync mode the same step stalls for the whole copy."""
    progress = {}
    for mode in ("async", "sync"):
        engine = LLMEngine(model, policy="priority", block_size=BLOCK, num_gpu_blocks=40, swap_mode=mode,
                           preemption_cooldown_steps=0)
        engine.executor.swaps.manager.inject_delay_s = 0.4
        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

        engine.add_request("big", random_prompts(1000, [120], seed=1)[0], params(10), priority=5)
        engine.add_request("small", [1, 2, 3], params(60), priority=1)
        for _ in range(4):
            engine.step()
        # 40 blocks: big (31 by now) and small (2) leave 7, urgent needs 10: big is preempted, by a slow copy
        engine.add_request("urgent", random_prompts(1000, [40], seed=2)[0], params(20), priority=0)
        small = engine.scheduler.requests["small"]
        before = small.num_output_tokens
        start = time.perf_counter()
        steps = 0
        while time.perf_counter() - start < 0.3:
            engine.step()
            steps += 1
        progress[mode] = (small.num_output_tokens - before, steps, engine.scheduler.requests["big"].status)
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats()["swap_wait_s"] >= (0.35 if mode == "sync" else 0.0)
        assert_idle(engine)
    tokens, _, status = progress["async"]
    assert status in (RequestStatus.SWAPPING_OUT, RequestStatus.SWAPPED)
    assert tokens >= 3, f"async: the resident request made {tokens} tokens while the swap was in flight"
    assert progress["sync"][1] <= 1, "sync: the step that issued the swap should have waited for the copy"
