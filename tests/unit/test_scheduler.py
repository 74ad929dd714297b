"""The scheduler, driven by a fake worker that samples a known token for every chunk with ``sample=True``.

The fake worker keeps the state a real one keeps (the sampling settings of every request it has been told
about) so that a plan the real worker could not execute fails here too.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import deque
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_engine.config import SchedulerConfig, SwapConfig
from fs_engine.kv.cpu_store import CpuKVStore
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for
from fs_engine.request import Request, RequestStatus
from fs_engine.sampling_params import SamplingParams
from fs_engine.sched.scheduler import Scheduler
from ipc.messages import PENDING_TOKEN, ScheduledChunk, StepPlan, StepResult, SwapCommand, SwapDone
from workers.input_batch import InputBatch


def token_for(request_id: str, index: int) -> int:
    """The token the fake model samples as output ``index`` of ``request_id``."""
    return 1000 + zlib.crc32(f"{request_id}:{index}".encode()) % 1000


class FakeWorker:
    """The worker's side of the protocol without a model: sampling specs, and the real worker's block tables
    (``InputBatch``, updated from each plan's diffs), which the harness compares with the frontend's."""

    def __init__(self, max_blocks_per_seq: int = 1024) -> None:
        self.specs: dict = {}
        self.ever_seen: list[str] = []
        self.finished: list[str] = []
        self.batch = InputBatch(1, max_blocks_per_seq, torch.device("cpu"))

    def execute(self, plan: StepPlan) -> StepResult:
        # forget first: an id may be finished and (as a new request) announced again in one plan
        for request_id in plan.finished_ids:
            assert request_id in self.specs, f"finished {request_id!r} that the worker never saw (or twice)"
            del self.specs[request_id]
            self.finished.append(request_id)
        for new in plan.new_requests:
            assert new.request_id not in self.specs, f"{new.request_id!r} announced twice"
            self.specs[new.request_id] = new.sampling
            self.ever_seen.append(new.request_id)
        sampled = [c for c in plan.chunks if c.sample]
        for chunk in plan.chunks:
            assert chunk.request_id in self.specs, f"chunk for {chunk.request_id!r} before its NewRequest"
        self.batch.update(plan)
        return StepResult(
            step_id=plan.step_id,
            request_ids=[c.request_id for c in sampled],
            token_ids=[token_for(c.request_id, c.sample_index) for c in sampled],
        )


class Harness:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 2048) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.sched = Scheduler(self.config, self.kv)
        self.worker = FakeWorker()
        self.max_tokens: dict[str, int] = {}
        self.done: dict[str, Request] = {}
        self.plans: list[StepPlan] = []
        self._arrivals = 0

    def add(self, request_id: str, prompt_len: int, max_tokens: int, seed: int | None = None) -> Request:
        prompt = [(zlib.crc32(request_id.encode()) + i) % 900 for i in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens, seed=seed)
        request = Request(request_id, prompt, params, arrival_seq=self._arrivals)
        self._arrivals += 1
        self.max_tokens[request_id] = max_tokens
        self.sched.add_request(request)
        return request

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        self.check_plan(plan)
        self.plans.append(plan)
        result = self.worker.execute(plan)
        for rid in plan.request_ids:  # the worker's view of every table it computes with is the frontend's
            assert self.worker.batch.table(rid) == self.kv.block_ids(rid), f"step {plan.step_id}: {rid}'s table"
        for request in self.sched.update(plan, result):
            if request.num_output_tokens >= self.max_tokens[request.request_id]:
                self.sched.finish(request, RequestStatus.FINISHED_LENGTH)
                self.done[request.request_id] = request
        self.kv.check_invariants()
        return plan

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                self.step()  # deliver the last finished_ids
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps: {self.sched.stats()}")

    def check_plan(self, plan: StepPlan) -> None:
        """Everything a worker relies on when it executes ``plan``."""
        assert plan.num_tokens <= self.config.max_num_batched_tokens
        assert len(plan.chunks) <= self.config.max_num_seqs
        assert len(self.sched.running) <= self.config.max_num_seqs
        ids = [c.request_id for c in plan.chunks]
        assert len(ids) == len(set(ids)), "a request has two chunks in one step"
        used_blocks: list[int] = []
        for chunk in plan.chunks:
            request = self.sched.requests[chunk.request_id]
            assert request.status is RequestStatus.RUNNING
            n = len(chunk.token_ids)
            assert n >= 1
            # contiguous: the chunk starts where the request's KV ends
            assert chunk.start_pos == request.num_computed_tokens
            assert chunk.token_ids == request.token_ids[chunk.start_pos : chunk.start_pos + n]
            assert chunk.sample == (chunk.start_pos + n == request.num_tokens)
            if chunk.sample:
                assert chunk.sample_index == request.num_output_tokens
            table = self.kv.block_ids(chunk.request_id)
            assert chunk.block_ids == table[chunk.table_start :]  # the blocks the worker does not hold yet
            assert len(table) >= blocks_for(chunk.start_pos + n, self.kv.block_size)
            used_blocks += table
        assert len(used_blocks) == len(set(used_blocks)), "two requests in one step share a block"

    def check_all_done(self) -> None:
        assert not self.sched.has_unfinished()
        assert not self.sched.running and not self.sched.waiting
        assert self.kv.num_free_blocks == self.kv.num_blocks
        self.kv.check_invariants()
        assert not self.worker.specs, "the worker still holds finished requests"
        for request_id, request in self.done.items():
            expected = [token_for(request_id, i) for i in range(self.max_tokens[request_id])]
            assert request.output_token_ids == expected
            assert request.status is RequestStatus.FINISHED_LENGTH


def chunks_of(plans: list[StepPlan], request_id: str):
    return [c for p in plans for c in p.chunks if c.request_id == request_id]


def test_long_prompt_is_chunked_within_the_token_budget():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    h.add("a", prompt_len=50, max_tokens=3)
    h.run()
    chunks = chunks_of(h.plans, "a")
    assert [(c.start_pos, len(c.token_ids), c.sample) for c in chunks] == [
        (0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True), (50, 1, True), (51, 1, True),
    ]
    assert [c.sample_index for c in chunks if c.sample] == [0, 1, 2]
    assert sum(len(c.token_ids) for c in chunks[:4]) == 50
    h.check_all_done()


def test_budget_is_shared_running_first_then_waiting_in_arrival_order():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=10)
    h.add("a", prompt_len=4, max_tokens=5)
    plan = h.step()
    assert [(c.request_id, len(c.token_ids)) for c in plan.chunks] == [("a", 4)]
    h.add("b", prompt_len=20, max_tokens=2)
    h.add("c", prompt_len=3, max_tokens=2)
    plan = h.step()
    # a decodes (1 token) before b, which arrived later, takes the remaining 9 of its 20; c must wait
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in plan.chunks] == [("a", 4, 1), ("b", 0, 9)]
    plan = h.step()
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in plan.chunks] == [("a", 5, 1), ("b", 9, 9)]
    plan = h.step()
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in plan.chunks] == [
        ("a", 6, 1), ("b", 18, 2), ("c", 0, 3)
    ]
    h.run()
    h.check_all_done()


def test_max_num_seqs_caps_the_batch_and_admits_in_arrival_order():
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=2)
    for i, max_tokens in enumerate([2, 4, 3, 1, 2]):
        h.add(f"r{i}", prompt_len=3, max_tokens=max_tokens)
    first_step = {}
    while h.sched.has_unfinished():
        plan = h.step()
        assert len(plan.chunks) <= 2
        for c in plan.chunks:
            first_step.setdefault(c.request_id, plan.step_id)
    order = sorted(first_step, key=lambda r: (first_step[r], r))
    assert order == [f"r{i}" for i in range(5)]
    assert first_step["r2"] > first_step["r1"]  # r2 had to wait for a free seat
    h.run()
    h.check_all_done()


def test_fcfs_head_of_line_request_is_not_overtaken_when_memory_is_short():
    h = Harness(num_blocks=4, block_size=4)
    h.add("big0", prompt_len=8, max_tokens=1)  # 2 blocks
    h.add("big1", prompt_len=12, max_tokens=1)  # 3 blocks: does not fit beside big0
    h.add("small", prompt_len=2, max_tokens=1)  # would fit, but arrived later
    plan = h.step()
    assert [c.request_id for c in plan.chunks] == ["big0"]
    assert [r.request_id for r in h.sched.waiting] == ["big1", "small"]
    h.run()
    h.check_all_done()
    admitted = [c.request_id for p in h.plans for c in p.chunks if c.start_pos == 0]
    assert admitted == ["big0", "big1", "small"]


def test_preemption_recomputes_the_most_recently_admitted_request():
    # 4 blocks of 4 tokens: a and b hold 2 blocks each after their prompts; the first one to need a third
    # block forces a preemption
    h = Harness(num_blocks=4, block_size=4)
    a = h.add("a", prompt_len=6, max_tokens=8)
    b = h.add("b", prompt_len=5, max_tokens=6)
    c = h.add("c", prompt_len=3, max_tokens=2)  # no memory left for it: waits
    plan = h.step()
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    while h.sched.num_preemptions == 0:
        computed_b = b.num_computed_tokens
        h.step()
    assert h.sched.num_preemptions == 1
    assert b.status is RequestStatus.WAITING and b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.num_computed_tokens == 0 and h.kv.block_ids("b") == []
    assert h.sched.num_recomputed_tokens == computed_b
    assert list(h.sched.waiting) == [b, c]  # the victim resumes before requests that arrived after it
    outputs_when_preempted = list(b.output_token_ids)
    assert outputs_when_preempted  # b had already generated tokens that must be recomputed

    h.run()
    h.check_all_done()
    resumed = [c for c in chunks_of(h.plans, "b") if c.start_pos == 0][1]
    assert resumed.token_ids == b.prompt_token_ids + outputs_when_preempted
    assert resumed.sample and resumed.sample_index == len(outputs_when_preempted)
    restarts = [c.request_id for p in h.plans for c in p.chunks if c.start_pos == 0]
    assert restarts == ["a", "b", "b", "c"]
    # the worker was told about b once; preemption does not re-announce it
    assert h.worker.ever_seen == ["a", "b", "c"]
    assert sorted(h.worker.finished) == ["a", "b", "c"]


def test_preempted_request_does_not_bounce_back_in_the_same_step():
    # 3 blocks of 4 tokens, 3 tokens a step: r1 is preempted while enough memory is left to readmit its first
    # chunk at once, which would only throw that work away again
    h = Harness(num_blocks=3, block_size=4, max_num_batched_tokens=3)
    h.add("r0", prompt_len=4, max_tokens=6)
    r1 = h.add("r1", prompt_len=6, max_tokens=6)
    for _ in range(3):
        h.step()
    plan = h.step()
    assert h.sched.num_preemptions == 1 and r1.status is RequestStatus.WAITING
    assert [(c.request_id, c.start_pos) for c in plan.chunks] == [("r0", 5)]
    h.run()
    h.check_all_done()


def test_victim_of_another_request_does_not_bounce_back_in_the_same_step():
    # 3 blocks of 2 tokens: at step 3 r0 needs a second block and evicts r1, whose freed blocks would let r1's
    # first recompute chunk in again at once (the scheduler's comment says waiting requests are not admitted
    # in a step that preempted anyone)
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=3)
    h.add("r0", prompt_len=1, max_tokens=3)
    r1 = h.add("r1", prompt_len=2, max_tokens=3)
    h.step()
    h.step()
    plan = h.step()
    assert h.sched.num_preemptions == 1 and r1.num_preemptions == 1
    assert [c.request_id for c in plan.chunks] == ["r0"]


def test_request_that_cannot_grow_preempts_itself_when_it_is_the_most_recent():
    h = Harness(num_blocks=4, block_size=2)
    b = h.add("b", prompt_len=4, max_tokens=2)  # 2 blocks, then a third for its decode
    a = h.add("a", prompt_len=2, max_tokens=4)  # 1 block, then a second for its decode
    h.step()
    plan = h.step()
    # b (older) takes the last free block; a has no one younger to evict, so it is the victim itself
    assert [c.request_id for c in plan.chunks] == ["b"]
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert a.status is RequestStatus.WAITING and a.num_preemptions == 1
    assert h.sched.num_preemptions == 1 and h.sched.num_recomputed_tokens == 2
    h.run()
    h.check_all_done()


def test_new_request_carries_sampling_settings_once():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=4)
    h.add("a", prompt_len=10, max_tokens=3, seed=42)
    h.run()
    announced = [n for p in h.plans for n in p.new_requests]
    assert len(announced) == 1
    assert announced[0].request_id == "a"
    assert announced[0].sampling == SamplingParams(max_tokens=3, seed=42).to_spec()
    assert announced[0].sampling.seed == 42
    # the announcement travels with the request's first chunk
    first = next(p for p in h.plans if p.chunks)
    assert first.new_requests == announced


def test_finished_ids_report_each_request_the_worker_saw_exactly_once():
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=1)
    a = h.add("a", prompt_len=3, max_tokens=2)
    never_sent = h.add("never", prompt_len=3, max_tokens=2)
    h.step()
    h.sched.finish(never_sent, RequestStatus.FINISHED_ABORTED)  # still waiting: the worker never heard of it
    h.step()
    assert a.status is RequestStatus.FINISHED_LENGTH
    plan = h.step()
    assert plan.finished_ids == ["a"]
    assert not plan.chunks
    assert h.step().finished_ids == []
    reported = [r for p in h.plans for r in p.finished_ids]
    assert reported == ["a"]
    h.check_all_done()


def test_a_result_that_does_not_match_its_plan_is_refused_whole():
    h = Harness(num_blocks=8, block_size=4)
    a = h.add("a", prompt_len=5, max_tokens=4)
    h.add("b", prompt_len=5, max_tokens=4)
    h.step()
    plan = h.sched.schedule()
    result = h.worker.execute(plan)
    swapped = StepResult(step_id=plan.step_id, request_ids=result.request_ids[::-1], token_ids=result.token_ids)
    with pytest.raises(RuntimeError, match="the result samples"):
        h.sched.update(plan, swapped)
    assert a.num_output_tokens == 1 and a.num_pending_tokens == 1  # nothing of it was applied
    with pytest.raises(ValueError, match="was not planned"):  # the plan is spent: a wrong answer is a bug, not a retry
        h.sched.update(plan, result)


def test_abort_during_a_step_drops_its_result_and_frees_its_blocks():
    h = Harness(num_blocks=8, block_size=4)
    a = h.add("a", prompt_len=5, max_tokens=4)
    b = h.add("b", prompt_len=5, max_tokens=2)
    h.step()
    plan = h.sched.schedule()
    result = h.worker.execute(plan)
    h.sched.finish(a, RequestStatus.FINISHED_ABORTED)  # the user aborts while the step runs
    progressed = h.sched.update(plan, result)
    assert progressed == [b]
    assert a.num_output_tokens == 1  # the late token is dropped
    assert h.kv.block_ids("a") == []
    h.kv.check_invariants()
    assert h.sched.schedule().finished_ids == ["a"]


def test_a_finished_id_can_be_reused():
    h = Harness(num_blocks=16, block_size=4)
    h.add("x", prompt_len=3, max_tokens=1)
    h.step()
    assert "x" in h.done
    h.add("x", prompt_len=4, max_tokens=2)
    plan = h.step()
    assert plan.finished_ids == ["x"]
    assert [n.request_id for n in plan.new_requests] == ["x"]
    h.run()
    h.check_all_done()


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_finish_with_all_blocks_free(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_len = 0
    specs = []
    for i in range(rng.randint(2, 12)):
        prompt_len, max_tokens = rng.randint(1, 30), rng.randint(1, 12)
        specs.append((f"r{i}", prompt_len, max_tokens, rng.randint(0, 3)))
        max_len = max(max_len, prompt_len + max_tokens)
    # small enough to force preemptions, big enough that every request fits alone
    num_blocks = blocks_for(max_len, block_size) + rng.randint(0, 2)
    h = Harness(num_blocks, block_size, max_num_seqs=rng.randint(1, 6),
                max_num_batched_tokens=rng.randint(1, 40))
    arrivals = {}
    for request_id, prompt_len, max_tokens, arrive_step in specs:
        arrivals.setdefault(arrive_step, []).append((request_id, prompt_len, max_tokens))
    for step in range(5000):
        for request_id, prompt_len, max_tokens in arrivals.pop(step, []):
            h.add(request_id, prompt_len, max_tokens)
        if not arrivals and not h.sched.has_unfinished():
            break
        h.step()
    h.run()
    assert sorted(h.done) == sorted(s[0] for s in specs)
    h.check_all_done()
    assert sorted(h.worker.ever_seen) == sorted(h.worker.finished) == sorted(h.done)
    stats = h.sched.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0


@settings(max_examples=40, deadline=None)
@given(
    prompt_lens=st.lists(st.integers(1, 24), min_size=1, max_size=8),
    max_tokens=st.integers(1, 10),
    block_size=st.sampled_from([1, 2, 4]),
    spare_blocks=st.integers(0, 3),
    max_num_seqs=st.integers(1, 4),
    budget=st.integers(1, 32),
)
def test_any_workload_that_fits_alone_completes(prompt_lens, max_tokens, block_size, spare_blocks, max_num_seqs,
                                                budget):
    num_blocks = blocks_for(max(prompt_lens) + max_tokens, block_size) + spare_blocks
    h = Harness(num_blocks, block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    for i, n in enumerate(prompt_lens):
        h.add(f"r{i}", n, max_tokens)
    h.run()
    h.check_all_done()
    assert len(h.done) == len(prompt_lens)
    # recomputed tokens are exactly the KV thrown away by preemptions
    computed = sum(len(c.token_ids) for p in h.plans for c in p.chunks)
    needed = sum(n + max_tokens - 1 for n in prompt_lens)
    assert computed == needed + h.sched.num_recomputed_tokens


# ---- swap preemption, policies and anti-thrashing, with simulated KV contents --------------------------------

S = RequestStatus
BLOCK_BYTES = 64  # bytes the fake worker reports per block moved
INF = float("inf")

# what one token slot of a simulated KV block holds: (writer, position, token, digest). The digest covers every
# token up to and including the position, as real KV depends on the whole prefix: KV written by another request
# with the same prefix (a reused stored prefix) is as good as the request's own, anything else is not.
Slot = tuple[str, int, int, int]


def kv_digests(tokens: list[int]) -> list[int]:
    out, h = [], 0
    for t in tokens:
        h = zlib.crc32(f"{h}:{t}".encode())
        out.append(h)
    return out


def pairs_of(runs) -> list[tuple[int, int]]:
    """(src block, dst block) for every block a command moves, in order."""
    return [(s + i, d + i) for s, d, n in runs for i in range(n)]


def runs_blocks(runs) -> int:
    return sum(n for _, _, n in runs)


class _Pending:
    def __init__(self, command: SwapCommand, land_at: float, order: float) -> None:
        self.command, self.land_at, self.order = command, land_at, order


class KVFakeWorker(FakeWorker):
    """A fake worker that also keeps KV *contents*: every device and host block is a list of ``block_size``
    slots, each holding the ``Slot`` written there. A plan runs in the real worker's order: its swap-outs, then
    its swap-ins (a ``wait`` command is applied at once, an unwaited one lands later), then each chunk first reads
    its earlier positions, which must hold exactly that request's earlier KV, and writes its own.

    Unwaited commands are **asynchronous**: each lands (moves its bytes, as the blocks are at that moment) at a
    later landing point and is reported in the result of the step it landed in. There are three landing points
    per step: before the plan's commands, between them and the chunks, after the chunks. ``delay``:
    an int k lands a command after the chunks of the k-th next step (0: the same step); ``"random"`` picks a
    point uniformly within ``max_delay`` steps (seeded); ``"hold"`` keeps it until ``release()``.

    Besides the contents, every command and chunk is checked against the copies still in flight: writing a
    block that an in-flight copy reads or writes, or reading one that it writes, is a race the real worker
    could lose, and fails at once (``detect_races=False`` leaves it to the contents checks alone).
    A swap that moves the wrong blocks, a block reused while still needed or a host block overwritten before it
    was read back all show up as a wrong slot."""

    def __init__(self, block_size: int, num_device_blocks: int, num_host_blocks: int, *, delay=0,
                 max_delay: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.delay = delay
        self.max_delay = max_delay
        self.rng = random.Random(seed)
        self.detect_races = True
        self.device: dict[int, list[Slot | None]] = {}
        self.host: dict[int, list[Slot | None]] = {}
        self.prompts: dict[str, list[int]] = {}
        self.pending: list[_Pending] = []
        self.submitted: dict[int, SwapCommand] = {}
        self.reported: set[int] = set()
        self.landed_in_step: dict[int, int] = {}  # swap id -> step whose result reported it
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0
        self.steps_with_both_directions = 0  # steps whose commands met copies of the other direction
        self._step = 0
        self._done: list[SwapDone] = []

    # ---- what a request's KV must be -------------------------------------------------------------------------
    def register(self, request_id: str, prompt: list[int]) -> None:
        self.prompts[request_id] = list(prompt)

    def tokens_of(self, request_id: str, n: int) -> list[int]:
        """The first ``n`` tokens of a request: its prompt, then what this worker samples for it."""
        prompt = self.prompts[request_id]
        return (prompt + [token_for(request_id, i) for i in range(max(0, n - len(prompt)))])[:n]

    def slot(self, blocks: dict, table: list[int], pos: int) -> Slot | None:
        block = blocks.get(table[pos // self.block_size])
        return None if block is None else block[pos % self.block_size]

    def check_blocks(self, blocks: dict, table: list[int], tokens: list[int], what: str) -> None:
        """``table`` holds the KV of ``tokens`` (from position 0)."""
        for pos, digest in enumerate(kv_digests(tokens)):
            got = self.slot(blocks, table, pos)
            assert got is not None and got[1:] == (pos, tokens[pos], digest), (
                f"{what}: position {pos} holds {got}, expected token {tokens[pos]}")

    # ---- copies ----------------------------------------------------------------------------------------------
    def _footprint(self, command: SwapCommand) -> tuple[set, set]:
        src, dst = ("dev", "host") if command.kind == "out" else ("host", "dev")
        pairs = pairs_of(command.runs)
        return {(src, s) for s, _ in pairs}, {(dst, d) for _, d in pairs}

    def _check_race(self, reads: set, writes: set, what: str) -> None:
        if not self.detect_races:
            return
        for p in self.pending:
            p_reads, p_writes = self._footprint(p.command)
            bad = (writes & (p_reads | p_writes)) | (reads & p_writes)
            assert not bad, (f"step {self._step}: {what} touches {sorted(bad)} while swap {p.command.swap_id} "
                             f"({p.command.kind}) still copies them")

    def _apply(self, command: SwapCommand) -> None:
        if command.kind == "out":
            src, src_size, dst, dst_size = self.device, self.num_device_blocks, self.host, self.num_host_blocks
        else:
            src, src_size, dst, dst_size = self.host, self.num_host_blocks, self.device, self.num_device_blocks
        moved = 0
        for s, d, n in command.runs:
            assert n >= 1 and 0 <= s and s + n <= src_size and 0 <= d and d + n <= dst_size, (s, d, n)
            for i in range(n):
                dst[d + i] = list(src.get(s + i, [None] * self.block_size))
            moved += n
        if command.kind == "out":
            self.blocks_swapped_out += moved
        else:
            self.blocks_swapped_in += moved
        self._done.append(SwapDone(command.swap_id, len(command.runs), moved * BLOCK_BYTES, 0.0))

    def _land(self, point: float) -> None:
        due = sorted((p for p in self.pending if p.land_at <= point), key=lambda p: (p.land_at, p.order))
        for p in due:
            self.pending.remove(p)
            self._apply(p.command)

    def _land_at(self) -> float:
        if self.delay == "hold":
            return INF
        if self.delay == "random":
            return 3 * self._step + 1 + self.rng.randint(0, 3 * self.max_delay + 1)
        return 3 * (self._step + self.delay) + 2

    def release(self, swap_id: int | None = None) -> None:
        """Let held copies (one, or all) land at the next landing point."""
        for p in self.pending:
            if swap_id is None or p.command.swap_id == swap_id:
                p.land_at = -INF

    def in_flight(self, swap_id: int) -> bool:
        return any(p.command.swap_id == swap_id for p in self.pending)

    # ---- one step --------------------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        self._step += 1
        base = 3 * self._step
        self._land(base)
        kinds = {c.kind for c in plan.swaps}
        self.steps_with_both_directions += len(kinds | {p.command.kind for p in self.pending}) == 2 and bool(kinds)
        for kind in ("out", "in"):
            for command in plan.swaps:
                if command.kind != kind:
                    continue
                assert command.kind in ("out", "in") and command.runs, command
                assert command.swap_id not in self.submitted, f"swap {command.swap_id} submitted twice"
                self.submitted[command.swap_id] = command
                reads, writes = self._footprint(command)
                assert len(writes) == runs_blocks(command.runs), f"swap {command.swap_id} writes a block twice"
                self._check_race(reads, writes, f"swap {command.swap_id} ({kind})")
                if command.wait:
                    self._apply(command)
                else:
                    self.pending.append(_Pending(command, self._land_at(), self.rng.random()))
        self._land(base + 1)
        result = super().execute(plan)
        for chunk in plan.chunks:
            rid, start = chunk.request_id, chunk.start_pos
            end = start + len(chunk.token_ids)
            tokens = self.tokens_of(rid, end)
            assert chunk.token_ids == tokens[start:], f"step {plan.step_id}: {rid} computes the wrong tokens"
            table, bs = self.batch.table(rid), self.block_size
            reads = {("dev", table[p // bs]) for p in range(start)}
            writes = {("dev", table[p // bs]) for p in range(start, end)}
            self._check_race(reads, writes, f"the chunk of {rid}")
            self.check_blocks(self.device, table, tokens[:start], f"step {plan.step_id}: {rid} reads")
            digests = kv_digests(tokens)
            for pos in range(start, end):
                block = self.device.setdefault(table[pos // bs], [None] * bs)
                block[pos % bs] = (rid, pos, tokens[pos], digests[pos])
        self._land(base + 2)
        result.swaps_done, self._done = self._done, []
        for done in result.swaps_done:
            assert done.swap_id not in self.reported
            self.reported.add(done.swap_id)
            self.landed_in_step[done.swap_id] = plan.step_id
        return result


@dataclass
class _Snap:
    request: Request
    status: RequestStatus
    device: list[int]
    host: list[int] | None  # blocks of its host copy (None: no copy)
    valid: int  # valid tokens of its host copy
    computed: int


class SwapHarness(Harness):
    """The harness with host memory (a ``CpuKVStore``), any policy, preemption and swap mode, and the
    KV-contents worker (``delay``: when its unwaited copies land, see ``KVFakeWorker``). After every step the
    scheduler's invariants hold; every swap command moves exactly the blocks of the request whose state changed
    (only the dirty tail when the host copy is still valid), waits exactly when the mode says so, and its
    completion is the only thing that ends a SWAPPING_OUT / SWAPPING_IN state; and the device (host) blocks of
    every request hold its computed tokens, as do host copies and stored prefixes up to their valid tokens."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int | None = None, *,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048, policy: str = "fcfs",
                 preemption_mode: str = "swap", cooldown: int = 0, tenant_weights=None,
                 allocator: str = "group", swap_mode: str = "sync", enable_kv_reuse: bool = False,
                 adaptive_min_batch: int = 4, delay="random", max_delay: int = 3, seed: int = 0) -> None:
        super().__init__(num_blocks, block_size, max_num_seqs, max_num_batched_tokens)
        self.kv = KVCacheManager(num_blocks, block_size, allocator=allocator)
        self.store = None if num_cpu_blocks is None else CpuKVStore(num_cpu_blocks, block_size, enable_kv_reuse)
        self.config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      policy=policy, preemption_mode=preemption_mode,
                                      preemption_cooldown_steps=cooldown, tenant_weights=tenant_weights)
        self.swap_config = SwapConfig(swap_mode=swap_mode, enable_kv_reuse=enable_kv_reuse,
                                      adaptive_min_batch=adaptive_min_batch)
        self.sched = Scheduler(self.config, self.kv, self.store, self.swap_config)
        self.worker = KVFakeWorker(block_size, num_blocks, num_cpu_blocks or 0, delay=delay, max_delay=max_delay,
                                   seed=seed)
        self.swap_mode = swap_mode
        self.reuse = enable_kv_reuse
        self.plans_with_both_swaps = 0
        self.owner_of: dict[int, tuple[str, str, Request | None]] = {}  # swap id -> (kind, request id, request)
        self.inflight_of: dict[str, int] = {}  # request id -> its unwaited command not yet reported
        self.swapped_out_table: dict[str, list[int]] = {}  # device table of a SWAPPING_OUT request
        self.num_reclaims = 0
        self.reclaimed_blocks = 0
        self.prefix_hits: list[tuple[str, int]] = []  # (request id, matched tokens) swapped in from the host
        self.resident_hits: list[tuple[str, int]] = []  # (request id, tokens) adopted from a finished turn's blocks
        self.writebacks: list[tuple[str, list[tuple[int, int]]]] = []  # issued since the last plan

    def host_blocks(self, request_id: str) -> list[int]:
        copy = self.store.copy_of(request_id)
        return [] if copy is None else list(copy.blocks)

    def add(self, request_id: str, prompt_len: int, max_tokens: int, seed: int | None = None, *,
            priority: int = 0, tenant: str = "default", prompt: list[int] | None = None,
            session_id: str | None = None) -> Request:
        if prompt is None:
            prompt = [(zlib.crc32(request_id.encode()) + i) % 900 for i in range(prompt_len)]
        request = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, seed=seed), priority=priority,
                          tenant=tenant, session_id=session_id, arrival_seq=self._arrivals)
        self._arrivals += 1
        self.max_tokens[request_id] = max_tokens
        self.worker.register(request_id, prompt)
        self.sched.add_request(request)
        return request

    # ---- one step --------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, _Snap]:
        snaps = {}
        for rid, r in self.sched.requests.items():
            copy = self.store.copy_of(rid) if self.store is not None else None
            snaps[rid] = _Snap(r, r.status, list(self.kv.block_ids(rid)), None if copy is None else list(copy.blocks),
                               0 if copy is None else copy.valid_tokens, r.num_computed_tokens)
        return snaps

    def step(self) -> StepPlan:
        before = self._snapshot()
        reused_before = self.sched.num_reused_swap_out_blocks
        evictions_before = self.store.num_evictions if self.store is not None else 0
        resident_before = {o: list(self.kv.block_ids(o)) for o in self.kv._tables if o in self.kv.resident}
        adopted_before = self.sched.num_reused_resident_tokens
        plan = self.sched.schedule()
        # the scheduler's own check_invariants() runs once the step's result is applied: between schedule() and
        # update() a sync swap-out is SWAPPED while its copy is valid only from its completion on
        self.kv.check_invariants()
        if self.store is not None:
            self.store.check_invariants()
        self.check_plan(plan)
        self.check_swaps(plan, before, reused_before, evictions_before, resident_before, adopted_before)
        self.plans.append(plan)
        self.plans_with_both_swaps += bool({c.kind for c in plan.swaps} == {"out", "in"})
        mid = self._snapshot()
        result = self.worker.execute(plan)
        progressed = self.sched.update(plan, result)
        self.check_completions(result, mid)
        for request in progressed:
            if request.num_output_tokens >= self.max_tokens[request.request_id]:
                self.finish(request, RequestStatus.FINISHED_LENGTH)
                self.done[request.request_id] = request
        self.sched.check_invariants()
        self.check_host_copies()
        self.check_kv_contents()
        return plan

    def check_host_copies(self) -> None:
        """A host copy is pinned exactly while it is a swapped request's only KV or a copy reads or writes it;
        without reuse it exists only then."""
        if self.store is None:
            return
        for rid, r in self.sched.requests.items():
            copy = self.store.copy_of(rid)
            if r.status in (S.SWAPPED, S.SWAPPING_OUT, S.SWAPPING_IN):
                assert copy is not None and copy.pins > 0, f"{r}: host copy missing or unpinned"
            elif not self.reuse:
                assert copy is None, f"{r}: host blocks kept without kv reuse"
            else:
                assert copy is None or copy.pins == 0, f"{r}: its cached host copy is still pinned ({copy.pins})"
        pinned_owners = {o for o, c in self.store.copies.items() if c.pins}
        in_flight_records = {o for o in pinned_owners if o not in self.sched.requests}
        assert len(in_flight_records) <= self.sched.stats()["num_swaps_in_flight"]
        assert all(p.pins == 0 for p in self.store.prefixes.values())

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request through the scheduler, noting the write-back it must issue (a finished request's full
        blocks, only those the host does not hold yet)."""
        rid = request.request_id
        was, device = request.status, list(self.kv.block_ids(rid))
        copy = self.store.copy_of(rid) if self.store is not None else None
        host_before = None if copy is None else (list(copy.blocks), copy.valid_tokens)
        copies_before = set(self.store.copies) if self.store is not None else set()
        prefixes_before = set(self.store.prefixes) if self.store is not None else set()
        reused_before = self.sched.num_reused_swap_out_blocks
        inflight = self.inflight_of.pop(rid, None)
        self.sched.finish(request, status)
        assert request.status is status and rid not in self.sched.requests
        if inflight is not None:  # rule 5: the record now owns the blocks; they are freed at completion
            kind, _, _ = self.owner_of[inflight]
            self.owner_of[inflight] = (kind, f"{rid} (ended)", None)
            assert not self.kv.holds(rid) and (self.store is None or self.store.copy_of(rid) is None)
            return
        assert not self.kv.holds(rid), f"{rid} finished holding device blocks"
        assert self.store is None or self.store.copy_of(rid) is None, f"{rid} finished holding a host copy"
        write_back = (self.reuse and was is S.RUNNING and status is not S.FINISHED_ABORTED
                      and request.num_computed_tokens >= self.kv.block_size)
        if not write_back or self.store is None:
            assert set(self.store.copies if self.store is not None else ()) <= copies_before
            return
        full = request.num_computed_tokens // self.kv.block_size
        kept = 0 if host_before is None else min(host_before[1] // self.kv.block_size, len(host_before[0]), full)
        new_keys = set(self.store.copies) - copies_before
        if new_keys:  # the write-back is in flight under a record key
            (key,) = new_keys
            host = self.store.copies[key].blocks
            assert not kept or host[:kept] == host_before[0][:kept]
            self.writebacks.append((key, [(device[i], host[i]) for i in range(kept, full)]))
        elif set(self.store.prefixes) - prefixes_before:  # nothing to copy: the prefix is stored at once
            assert kept == full
        stored = bool(new_keys or set(self.store.prefixes) - prefixes_before)
        assert self.sched.num_reused_swap_out_blocks - reused_before == (kept if stored else 0)

    def check_swaps(self, plan: StepPlan, before: dict[str, _Snap], reused_before: int, evictions_before: int,
                    resident_before: dict[str, list[int]], adopted_before: int) -> None:
        """Every command of ``plan`` is the copy that one request's state change calls for, and vice versa;
        a request that starts from a finished turn's resident blocks gets them without any copy."""
        bs = self.kv.block_size
        swapped_in_to = {tuple(gpu for _, gpu in pairs_of(c.runs)) for c in plan.swaps if c.kind == "in"}
        adopted = 0
        expected: list[tuple[str, str, list[tuple[int, int]], bool | None]] = []  # kind, rid, pairs, wait
        reused = 0
        allowed = {
            S.RUNNING: {S.RUNNING, S.SWAPPING_OUT, S.SWAPPED, S.WAITING},
            S.WAITING: {S.WAITING, S.RUNNING, S.SWAPPING_IN},
            S.SWAPPED: {S.SWAPPED, S.RUNNING, S.SWAPPING_IN},
            S.SWAPPING_OUT: {S.SWAPPING_OUT},
            S.SWAPPING_IN: {S.SWAPPING_IN},
        }
        for rid, snap in before.items():
            r = snap.request
            assert self.sched.requests.get(rid) is r, f"{rid} vanished while a plan was built"
            now = r.status
            assert now in allowed[snap.status], f"{rid}: {snap.status.value} -> {now.value} inside schedule()"
            if snap.status is S.RUNNING and now in (S.SWAPPING_OUT, S.SWAPPED):
                assert r.num_computed_tokens == snap.computed, "swapping out changed the computed tokens"
                copy = self.store.copy_of(rid)
                n = blocks_for(snap.computed, bs)
                assert copy is not None and len(copy.blocks) >= n
                kept = 0 if snap.host is None else min(snap.valid // bs, len(snap.host), n)
                if not self.reuse:
                    assert kept == 0, "a host copy outlived its swap-in without kv reuse"
                if kept and copy.blocks[:kept] != snap.host[:kept]:
                    # an unpinned cached copy: another victim's swap-out in this plan may have evicted it
                    assert self.store.num_evictions > evictions_before, f"{rid}: its valid host copy was replaced"
                    kept = 0
                # the still-valid blocks are not copied again, and stay where they are
                reused += kept
                pairs = [(snap.device[i], copy.blocks[i]) for i in range(kept, n)]
                if now is S.SWAPPED:  # waited (sync), or nothing to copy
                    assert not self.kv.holds(rid)
                    assert self.swap_mode == "sync" or not pairs
                else:
                    assert self.kv.block_ids(rid) == snap.device, "a SWAPPING_OUT request lost device blocks"
                    self.swapped_out_table[rid] = snap.device
                if pairs:
                    expected.append(("out", rid, pairs, now is S.SWAPPED))
            elif snap.status is S.SWAPPED and now in (S.RUNNING, S.SWAPPING_IN):
                assert r.num_computed_tokens == snap.computed, "swapping in changed the computed tokens"
                device = self.kv.block_ids(rid)
                n = blocks_for(snap.computed, bs)
                assert snap.valid >= snap.computed and len(snap.host) >= n
                expected.append(("in", rid, [(snap.host[i], device[i]) for i in range(n)], now is S.RUNNING))
            elif snap.status is S.WAITING and now in (S.RUNNING, S.SWAPPING_IN) and r.num_computed_tokens:
                matched = r.num_computed_tokens  # a stored prefix is swapped in, or adopted on the device
                assert self.reuse and matched % bs == 0 and 0 < matched < r.num_tokens
                copy, device = self.store.copy_of(rid), self.kv.block_ids(rid)
                n = matched // bs
                if tuple(device[:n]) not in swapped_in_to:
                    owner = next(o for o, t in resident_before.items() if t[:n] == device[:n])
                    assert now is S.RUNNING and owner not in self.kv.resident, f"{rid}: adopted half of {owner}"
                    self.resident_hits.append((rid, matched))
                    adopted += matched
                    continue
                expected.append(("in", rid, [(copy.blocks[i], device[i]) for i in range(matched // bs)],
                                 now is S.RUNNING))
                self.prefix_hits.append((rid, matched))
            elif snap.status is S.RUNNING and now is S.WAITING:  # recompute
                assert not self.kv.holds(rid) and r.num_computed_tokens == 0
            elif snap.status is S.SWAPPED and now is S.SWAPPED:
                assert self.host_blocks(rid) == snap.host and not self.kv.holds(rid)
            if now is S.RUNNING and not self.reuse and self.store is not None:
                # with a waited swap-in, released once the plan is built
                assert self.store.copy_of(rid) is None, f"{rid}: host blocks of a swapped-in request not released"
        wait_out = self.swap_mode == "sync"
        for key, pairs in self.writebacks:
            if pairs:
                expected.append(("out", key, pairs, wait_out))
        self.writebacks = []
        assert self.sched.num_reused_swap_out_blocks - reused_before == reused
        assert self.sched.num_reused_resident_tokens - adopted_before == adopted

        unmatched = list(expected)
        for command in plan.swaps:
            got = sorted(pairs_of(command.runs))
            match = next((e for e in unmatched if e[0] == command.kind and sorted(e[2]) == got), None)
            assert match is not None, f"step {plan.step_id}: unexpected {command} (expected {unmatched})"
            unmatched.remove(match)
            kind, rid, _, wait = match
            assert command.wait == wait, f"{command}: wait={command.wait} in {self.swap_mode} mode"
            assert command.swap_id not in self.owner_of
            self.owner_of[command.swap_id] = (kind, rid, self.sched.requests.get(rid))
            if not command.wait and rid in self.sched.requests:
                self.inflight_of[rid] = command.swap_id
            if self.swap_mode == "sync":
                assert command.wait
            elif kind == "out" or self.swap_mode == "async":
                assert not command.wait
        assert not unmatched, f"step {plan.step_id}: missing swaps {unmatched} in {plan.swaps}"
        written = {h for c in plan.swaps if c.kind == "out" for _, h in pairs_of(c.runs)}
        read = {h for c in plan.swaps if c.kind == "in" for h, _ in pairs_of(c.runs)}
        # host blocks read by this plan's swap-ins are not written by its swap-outs (which run first)
        assert not written & read

    def check_completions(self, result: StepResult, mid: dict[str, _Snap]) -> None:
        """A SWAPPING_OUT / SWAPPING_IN request changes state exactly when its copy is reported done."""
        done = {d.swap_id for d in result.swaps_done}
        for d in result.swaps_done:
            assert d.swap_id in self.owner_of, f"completion of unknown swap {d.swap_id}"
        for rid in self.inflight_of:  # a live request with a copy in flight is swapping
            assert mid[rid].status in (S.SWAPPING_OUT, S.SWAPPING_IN), f"{rid} has a copy in flight"
        for rid, snap in mid.items():
            r = snap.request
            if snap.status not in (S.SWAPPING_OUT, S.SWAPPING_IN):
                continue
            swap_id = self.inflight_of.get(rid)
            assert swap_id is not None, f"{rid} is {snap.status.value} without a copy in flight"
            if swap_id not in done:
                assert r.status is snap.status, f"{rid} left {snap.status.value} before its copy landed"
                assert self.kv.block_ids(rid) == snap.device
                continue
            del self.inflight_of[rid]
            if snap.status is S.SWAPPING_IN:
                assert r.status is S.RUNNING
            elif r.status is S.RUNNING:  # reclaimed: it runs on from the device blocks it never gave up
                assert self.kv.block_ids(rid) == self.swapped_out_table[rid] == snap.device
                self.num_reclaims += 1
                self.reclaimed_blocks += runs_blocks(self.worker.submitted[swap_id].runs)
            else:
                assert r.status is S.SWAPPED and not self.kv.holds(rid)

    def check_kv_contents(self) -> None:
        worker = self.worker
        for rid, request in self.sched.requests.items():
            tokens = request.token_ids[: request.num_computed_tokens]
            if request.status in (S.RUNNING, S.SWAPPING_OUT):
                worker.check_blocks(worker.device, self.kv.block_ids(rid), tokens, f"{request} on the device")
            elif request.status in (S.SWAPPED, S.SWAPPING_IN):
                worker.check_blocks(worker.host, self.host_blocks(rid), tokens, f"{request} on the host")
            copy = self.store.copy_of(rid) if self.store is not None else None
            if copy is not None:  # a host copy, cached or not, holds what it claims
                worker.check_blocks(worker.host, copy.blocks, request.token_ids[: copy.valid_tokens],
                                    f"host copy of {request}")
        if self.store is not None:
            for prefix_id, prefix in self.store.prefixes.items():
                worker.check_blocks(worker.host, prefix.blocks, self.store.index.tokens(prefix_id), f"stored prefix {prefix_id}")

    def step_until(self, done, max_steps: int = 300) -> StepPlan:
        """Step until ``done()`` holds (a scheduler that never gets there fails instead of hanging)."""
        for _ in range(max_steps):
            if done():
                return self.plans[-1] if self.plans else None
            self.step()
        raise AssertionError(f"still not there after {max_steps} steps: {self.sched.stats()}")

    def settle(self, max_steps: int = 100) -> None:
        """Step until no copy is in flight."""
        for _ in range(max_steps):
            if not self.sched.stats()["num_swaps_in_flight"]:
                return
            self.step()
        raise AssertionError("copies still in flight")

    def check_all_done(self) -> None:
        super().check_all_done()
        assert not self.worker.pending and set(self.worker.submitted) == self.worker.reported
        assert not self.inflight_of
        assert self.sched.swap_out_bytes + self.sched.swap_in_bytes == (
            self.worker.blocks_swapped_out + self.worker.blocks_swapped_in) * BLOCK_BYTES
        assert self.sched.swap_in_bytes == self.worker.blocks_swapped_in * BLOCK_BYTES
        if self.store is not None:
            self.store.check_invariants()
            assert not self.store.copies, f"host copies outlived their requests: {list(self.store.copies)}"
            if not self.reuse:
                assert self.store.num_free_blocks == self.store.num_blocks
            else:  # only stored prefixes remain: an unpinned cache
                assert all(p.pins == 0 for p in self.store.prefixes.values())
                assert self.store.num_cached_blocks() == self.store.num_blocks - self.store.num_free_blocks

    def status_of(self, request_id: str) -> RequestStatus:
        request = self.sched.requests.get(request_id) or self.done.get(request_id)
        return request.status


def outs(plan: StepPlan) -> list[SwapCommand]:
    return [c for c in plan.swaps if c.kind == "out"]


def ins(plan: StepPlan) -> list[SwapCommand]:
    return [c for c in plan.swaps if c.kind == "in"]


def out_runs(plan: StepPlan) -> list[tuple[int, int, int]]:
    return [r for c in outs(plan) for r in c.runs]


def in_runs(plan: StepPlan) -> list[tuple[int, int, int]]:
    return [r for c in ins(plan) for r in c.runs]


def fill(blocks: dict, table: list[int], request_id: str, tokens: list[int], block_size: int) -> None:
    """Write the KV of ``tokens`` (from position 0) into ``table``, as the fake worker's chunks do."""
    for pos, digest in enumerate(kv_digests(tokens)):
        block = blocks.setdefault(table[pos // block_size], [None] * block_size)
        block[pos % block_size] = (request_id, pos, tokens[pos], digest)


def test_fake_kv_worker_catches_a_swap_that_moves_the_wrong_blocks():
    # the check the tests below rely on: a plan whose swap-in brings back the wrong host block fails
    worker = KVFakeWorker(block_size=2, num_device_blocks=4, num_host_blocks=4)
    worker.register("x", [7, 8])
    fill(worker.host, [0], "x", [7, 8], 2)
    fill(worker.host, [1], "y", [5, 6], 2)
    worker.specs["x"] = None
    ok = StepPlan(step_id=1, swaps=[SwapCommand(1, "in", [(0, 3, 1)], wait=True)])
    ok.add_chunk(ScheduledChunk("x", [token_for("x", 0)], 2, [3, 0], sample=True))
    assert [d.swap_id for d in worker.execute(ok).swaps_done] == [1]
    bad = StepPlan(step_id=2, swaps=[SwapCommand(2, "in", [(1, 2, 1)], wait=True)])
    bad.add_chunk(ScheduledChunk("x", [token_for("x", 0)], 2, [2, 0], sample=True))
    with pytest.raises(AssertionError, match="reads"):
        worker.execute(bad)


def test_fake_kv_worker_reports_unwaited_copies_when_they_land():
    worker = KVFakeWorker(block_size=2, num_device_blocks=8, num_host_blocks=8, delay=2)
    done_in = {}
    for step in range(1, 6):
        swaps = [SwapCommand(10 + step, "out", [(step, step, 1)], wait=step == 1)] if step <= 2 else []
        result = worker.execute(StepPlan(step_id=step, swaps=swaps))
        for d in result.swaps_done:
            done_in[d.swap_id] = step
            assert d.bytes == BLOCK_BYTES and d.copies == 1
    assert done_in == {11: 1, 12: 4}  # waited: the same step; unwaited with delay 2: two steps later
    held = KVFakeWorker(block_size=2, num_device_blocks=8, num_host_blocks=8, delay="hold")
    assert not held.execute(StepPlan(1, swaps=[SwapCommand(1, "in", [(0, 0, 2)])])).swaps_done
    assert not held.execute(StepPlan(2)).swaps_done and held.in_flight(1)
    held.release(1)
    assert [d.swap_id for d in held.execute(StepPlan(3)).swaps_done] == [1]
    assert held.blocks_swapped_in == 2 and not held.pending


def _worker_with_x_on_device(**kw) -> KVFakeWorker:
    """x (prompt [7, 8, 9]) has computed its prompt into device blocks [0, 1]."""
    worker = KVFakeWorker(block_size=2, num_device_blocks=4, num_host_blocks=4, **kw)
    worker.register("x", [7, 8, 9])
    worker.register("y", [1, 2])
    worker.specs.update(x=None, y=None)
    plan = StepPlan(step_id=1, chunks=[ScheduledChunk("x", [7, 8, 9], 0, [0, 1], sample=True)])
    worker.execute(plan)
    return worker


@pytest.mark.parametrize("detect_races", [True, False])
def test_fake_kv_worker_catches_a_block_reused_before_its_swap_out_lands(detect_races):
    worker = _worker_with_x_on_device(delay=1)
    worker.detect_races = detect_races
    # x's blocks go out asynchronously, but y's chunk is written into block 1 before the copy lands
    plan = StepPlan(step_id=2, swaps=[SwapCommand(1, "out", [(0, 0, 2)])],
                    chunks=[ScheduledChunk("y", [1, 2], 0, [1], sample=True)])
    if detect_races:
        with pytest.raises(AssertionError, match="still copies"):
            worker.execute(plan)
        return
    worker.execute(plan)
    # the copy lands in the next step, reading block 1 as it is by then
    assert [d.swap_id for d in worker.execute(StepPlan(step_id=3)).swaps_done] == [1]
    with pytest.raises(AssertionError, match="position 2"):
        worker.check_blocks(worker.host, [0, 1], worker.tokens_of("x", 3), "x on the host")


@pytest.mark.parametrize("detect_races", [True, False])
def test_fake_kv_worker_catches_a_chunk_before_its_swap_in_lands(detect_races):
    worker = _worker_with_x_on_device(delay=1)
    worker.detect_races = detect_races
    worker.execute(StepPlan(step_id=2, swaps=[SwapCommand(1, "out", [(0, 0, 2)], wait=True)]))
    worker.device.clear()  # x's device blocks went to someone else
    # x comes back into blocks [2, 3] asynchronously, and computes before the copy landed
    plan = StepPlan(step_id=3, swaps=[SwapCommand(2, "in", [(0, 2, 2)])],
                    chunks=[ScheduledChunk("x", [token_for("x", 0)], 3, [2, 3], sample=True)])
    with pytest.raises(AssertionError, match="still copies" if detect_races else "reads"):
        worker.execute(plan)


def test_swap_preemption_by_a_late_high_priority_request_keeps_the_victims_kv():
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=16, policy="priority")
    low = h.add("low", prompt_len=14, max_tokens=12, priority=5)
    for _ in range(3):
        h.step()
    assert low.num_computed_tokens == 16 and len(h.kv.block_ids("low")) == 4
    device_before = list(h.kv.block_ids("low"))
    high = h.add("high", prompt_len=20, max_tokens=4, priority=0)  # 5 blocks; 4 are free
    plan = h.step()
    assert low.status is RequestStatus.SWAPPED and low.num_preemptions == 1
    assert h.kv.block_ids("low") == [] and len(h.host_blocks("low")) == 4
    assert low.num_computed_tokens == 16
    (command,) = plan.swaps
    assert command.kind == "out" and command.wait  # sync mode: the step waits for the copy
    assert pairs_of(command.runs) == list(zip(device_before, h.host_blocks("low")))
    assert len(command.runs) == 1  # one contiguous run on both sides: one copy
    assert [c.request_id for c in plan.chunks] == ["high"]
    assert high.status is RequestStatus.RUNNING
    assert h.sched.stats()["num_swapped"] == 1
    # low returns once high is done, by a swap-in, resuming where it stopped
    for _ in range(100):
        if ins(h.plans[-1]):
            break
        assert low.status is RequestStatus.SWAPPED
        h.step()
    plan = h.plans[-1]
    assert low.status is RequestStatus.RUNNING and h.store.copy_of("low") is None
    assert high.status is RequestStatus.FINISHED_LENGTH
    (chunk,) = [c for c in plan.chunks if c.request_id == "low"]
    assert chunk.start_pos == 16 and len(chunk.token_ids) == 1
    assert [d for _, d in pairs_of(in_runs(plan))] == h.kv.block_ids("low")[:4]
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_outs == h.sched.num_swap_ins == 1
    assert h.sched.num_recomputed_tokens == 0 and h.sched.num_recompute_fallbacks == 0
    assert h.worker.blocks_swapped_out == h.worker.blocks_swapped_in == 4
    assert h.sched.swap_out_bytes == h.sched.swap_in_bytes == 4 * BLOCK_BYTES
    computed = sum(len(c.token_ids) for p in h.plans for c in p.chunks)
    assert computed == (14 + 12 - 1) + (20 + 4 - 1)  # nothing computed twice


@pytest.mark.parametrize("swap_mode", ["async", "adaptive"])
def test_async_swap_preemption_admits_the_preemptor_once_the_copy_lands(swap_mode):
    # the same scenario with asynchronous copies: the victim's device blocks are only free when its swap-out
    # is reported done, so the high-priority request starts a step later; the swap-in of low lands before low
    # computes again (in adaptive mode it is waited for: nothing else runs)
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=16, policy="priority", swap_mode=swap_mode,
                    delay=1)
    low = h.add("low", prompt_len=14, max_tokens=12, priority=5)
    for _ in range(3):
        h.step()
    device_before = list(h.kv.block_ids("low"))
    high = h.add("high", prompt_len=20, max_tokens=4, priority=0)
    plan = h.step()
    (command,) = plan.swaps
    assert command.kind == "out" and not command.wait and not plan.chunks
    assert low.status is RequestStatus.SWAPPING_OUT and h.kv.block_ids("low") == device_before
    assert high.status is RequestStatus.WAITING
    plan = h.step()  # the copy lands at the end of this step
    assert not plan.chunks and low.status is RequestStatus.SWAPPED and not h.kv.holds("low")
    plan = h.step()
    assert [c.request_id for c in plan.chunks] == ["high"]
    h.step_until(lambda: ins(h.plans[-1]))
    (command,) = ins(h.plans[-1])
    assert command.wait == (swap_mode == "adaptive")
    h.step_until(lambda: chunks_of(h.plans, "low")[-1].start_pos >= 16)
    chunk = chunks_of(h.plans, "low")[-1]
    step = next(p.step_id for p in h.plans if chunk in p.chunks)
    assert chunk.start_pos == 16
    assert step == h.worker.landed_in_step[command.swap_id] + (0 if command.wait else 1)
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_outs == h.sched.num_swap_ins == 1 and h.sched.num_recomputed_tokens == 0
    assert h.worker.blocks_swapped_out == h.worker.blocks_swapped_in == 4


class PipelinedSwapHarness(SwapHarness):
    """Async scheduling, as the multi-process engine runs it: step N+1 is planned before step N's result is
    applied (a decode chunk names the token step N samples as ``PENDING_TOKEN``; the worker, which runs plans
    in order, fills in what it sampled), a plan that copies KV runs alone (no step in flight when it goes out,
    its result applied before the next plan), and results are applied in step order. Checked: the worker computes exactly each request's tokens and reads
    only KV that is there (``KVFakeWorker``), no chunk races a copy, the scheduler's invariants and the KV
    contents after every applied result, and (by the callers) every request's tokens and the total compute."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: deque[tuple[StepPlan, StepResult]] = deque()
        self.last_sampled: dict[str, int] = {}  # the worker's: what PENDING_TOKEN stands for
        self.plans_with_pending = 0

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        self.kv.check_invariants()
        if not (plan.request_ids or plan.finished_ids or plan.new_requests or plan.swaps) and self.in_flight:
            self.sched.update(plan, StepResult(step_id=plan.step_id))  # nothing new: as the engine retires it
            self._apply_oldest()
            return plan
        self.check_plan_tokens(plan)
        while plan.swaps and self.in_flight:  # rule 1: copies go out with no step running
            # (checked once this plan has run: a sync swap-out it makes is SWAPPED before its copy)
            self._apply_oldest(check=False)
        self.plans.append(plan)
        self.in_flight.append((plan, self._execute(plan)))
        if len(self.in_flight) == 2 or plan.swaps:  # a plan that copies runs alone: its result before the next
            self._apply_oldest()
        return plan

    def check_plan_tokens(self, plan: StepPlan) -> None:
        ids = plan.request_ids
        assert len(ids) == len(set(ids)) and len(ids) <= self.config.max_num_seqs
        assert plan.num_tokens <= self.config.max_num_batched_tokens
        for chunk in plan.chunks:
            request = self.sched.requests[chunk.request_id]
            assert request.status is S.RUNNING
            end = chunk.start_pos + len(chunk.token_ids)
            assert end == request.num_computed_tokens + request.num_inflight_tokens
            assert len(self.kv.block_ids(chunk.request_id)) >= blocks_for(end, self.kv.block_size)
            if PENDING_TOKEN in chunk.token_ids:  # only a decode of the token the step in flight samples
                assert chunk.token_ids == [PENDING_TOKEN] and chunk.start_pos == request.num_tokens

    def _execute(self, plan: StepPlan) -> StepResult:
        tokens = list(plan.token_ids)
        if PENDING_TOKEN in tokens:
            self.plans_with_pending += 1
            offset = 0
            for rid, n in zip(plan.request_ids, plan.num_scheduled):
                tokens[offset : offset + n] = [self.last_sampled[rid] if t == PENDING_TOKEN else t
                                               for t in tokens[offset : offset + n]]
                offset += n
            plan = copy.copy(plan)
            plan.token_ids = tokens
        result = self.worker.execute(plan)
        self.last_sampled.update(zip(result.request_ids, result.token_ids))
        return result

    def _apply_oldest(self, check: bool = True) -> None:
        plan, result = self.in_flight.popleft()
        for request in self.sched.update(plan, result):
            if request.num_output_tokens >= self.max_tokens[request.request_id]:
                self.sched.finish(request, RequestStatus.FINISHED_LENGTH)
                self.done[request.request_id] = request
        if check:
            self.sched.check_invariants()
            self.check_kv_contents()

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not (self.sched.has_unfinished() or self.in_flight):
                self.step()  # deliver the last finished_ids
                while self.in_flight:
                    self._apply_oldest()
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps: {self.sched.stats()}")


def run_priority_flips(seed: int, mode: str, num_cpu_blocks: int | str | None, max_num_seqs: int = 6,
                       swap_mode: str = "sync", enable_kv_reuse: bool = False, pipelined: bool = False) -> SwapHarness:
    """Random requests, arrivals and priority changes every third step on tight device memory; odd seeds use
    the one-block allocator, so swaps move many short runs. ``num_cpu_blocks="plenty"``: every victim fits.
    Asynchronous copies land at random points up to 3 steps later."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    specs = [(f"r{i}", rng.randint(1, 24), rng.randint(1, 14), rng.randint(0, 3), rng.randint(0, 12))
             for i in range(rng.randint(6, 12))]
    max_len = max(p + m for _, p, m, _, _ in specs)
    num_blocks = blocks_for(max_len, block_size) + rng.randint(0, 3)  # tight: preemptions are certain
    if num_cpu_blocks == "plenty":
        num_cpu_blocks = 4 * num_blocks
    harness = PipelinedSwapHarness if pipelined else SwapHarness
    h = harness(num_blocks, block_size, num_cpu_blocks, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=rng.randint(4, 40), policy="priority", preemption_mode=mode,
                    cooldown=rng.choice([0, 1, 3]), allocator="block" if seed % 2 else "group",
                    swap_mode=swap_mode, enable_kv_reuse=enable_kv_reuse, adaptive_min_batch=rng.randint(1, 4),
                    seed=seed)
    for step in range(3000):
        for rid, prompt_len, max_tokens, priority, arrive in specs:
            if arrive == step:
                h.add(rid, prompt_len, max_tokens, priority=priority)
        if step % 3 == 0 and h.sched.requests:
            rid = rng.choice(sorted(h.sched.requests))
            h.sched.update_priority(rid, rng.randint(-2, 5))
        if step > 12 and not h.sched.has_unfinished():
            break
        h.step()
    h.run()
    h.check_all_done()
    assert sorted(h.done) == sorted(s[0] for s in specs)
    computed = sum(len(c.token_ids) for p in h.plans for c in p.chunks)
    needed = sum(p + m - 1 for _, p, m, _, _ in specs)
    assert computed == needed + h.sched.num_recomputed_tokens
    return h


SWAP_MODES = ["sync", "async", "adaptive"]


@pytest.mark.parametrize("mode,enable_kv_reuse", [("swap", False), ("swap", True), ("recompute", False)])
@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_async_scheduling_random_priority_flips(swap_mode, mode, enable_kv_reuse):
    """Planning step N+1 before step N's tokens are known changes no request's tokens, under preemption by
    swap or recompute, every swap mode and KV reuse (the same workloads as the sequential tests above)."""
    pipelined = preempted = 0
    for seed in range(8):
        h = run_priority_flips(seed, mode, num_cpu_blocks="plenty", swap_mode=swap_mode,
                               enable_kv_reuse=enable_kv_reuse, pipelined=True)
        for rid, request in h.done.items():
            assert request.token_ids == h.worker.tokens_of(rid, request.num_tokens)
            assert request.num_output_tokens == h.max_tokens[rid]
        pipelined += h.plans_with_pending
        preempted += h.sched.num_preemptions
    assert pipelined > 0 and preempted > 0


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
@pytest.mark.parametrize("seed", range(16))
def test_random_priority_flips_with_swap_preemption(seed, swap_mode):
    h = run_priority_flips(seed, "swap", num_cpu_blocks="plenty", swap_mode=swap_mode)
    s = h.sched
    assert s.num_preemptions > 0
    assert s.num_recompute_fallbacks == 0 and s.num_recomputed_tokens == 0  # the host always had room
    # every swap-out comes back by a swap-in, or (async) is reclaimed before it landed
    assert s.num_swap_outs == s.num_preemptions == s.num_swap_ins + h.num_reclaims
    assert h.worker.blocks_swapped_out == h.worker.blocks_swapped_in + h.reclaimed_blocks
    assert h.worker.blocks_swapped_in > 0
    if swap_mode == "sync":
        assert h.num_reclaims == 0


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_random_priority_flips_with_swap_preemption_and_kv_reuse(swap_mode):
    reused = writebacks = 0
    for seed in range(8):
        h = run_priority_flips(seed, "swap", num_cpu_blocks="plenty", swap_mode=swap_mode, enable_kv_reuse=True)
        s = h.sched
        assert s.num_preemptions > 0 and s.num_recomputed_tokens == s.num_recompute_fallbacks == 0
        assert s.num_swap_outs == s.num_preemptions == s.num_swap_ins + h.num_reclaims
        reused += s.num_reused_swap_out_blocks
        writebacks += sum(kind == "out" and request is None for kind, _, request in h.owner_of.values())
    assert reused > 0, "no swap-out reused a host copy: the dirty-tail path went untested"
    assert writebacks > 0


@pytest.mark.parametrize("seed", range(16))
def test_random_priority_flips_with_recompute_preemption(seed):
    h = run_priority_flips(seed, "recompute", num_cpu_blocks="plenty")
    s = h.sched
    assert s.num_preemptions > 0
    assert s.num_swap_outs == s.num_swap_ins == 0 and not any(p.swaps for p in h.plans)
    assert s.num_recompute_fallbacks == 0  # recompute by choice, not as a fallback
    assert h.store.num_free_blocks == h.store.num_blocks


@pytest.mark.parametrize("enable_kv_reuse", [False, True])
@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_random_priority_flips_with_a_small_host_arena(swap_mode, enable_kv_reuse):
    # host memory often full: some victims swap, the rest fall back to recompute; both at once in some plans.
    # With reuse, cached copies and stored prefixes compete for the same blocks and are evicted for victims
    fallbacks = swaps = both = 0
    for seed in range(12):
        rng = random.Random(1000 + seed)
        h = run_priority_flips(1000 + seed, "swap", num_cpu_blocks=rng.randint(1, 8), swap_mode=swap_mode,
                               enable_kv_reuse=enable_kv_reuse)
        s = h.sched
        assert s.num_swap_outs + s.num_recompute_fallbacks == s.num_preemptions
        if enable_kv_reuse:
            # a victim that fell back to recompute may resume from its cached host copy or a stored prefix:
            # extra swap-ins, and fewer tokens recomputed than it dropped
            assert s.num_swap_ins + h.num_reclaims >= s.num_swap_outs
            assert s.num_recomputed_tokens == 0 or s.num_recompute_fallbacks > 0
        else:
            assert s.num_swap_ins + h.num_reclaims == s.num_swap_outs
            assert (s.num_recomputed_tokens > 0) == (s.num_recompute_fallbacks > 0)
        fallbacks += s.num_recompute_fallbacks
        swaps += s.num_swap_outs
        both += h.plans_with_both_swaps if swap_mode == "sync" else h.worker.steps_with_both_directions
    assert fallbacks > 0 and swaps > 0
    assert both > 0, "no copies in both directions at once: the host-block reuse hazard went untested"


@pytest.mark.parametrize("num_cpu_blocks", [None, 0, 2])
def test_swap_falls_back_to_recompute_when_the_host_cannot_take_the_victim(num_cpu_blocks):
    h = SwapHarness(num_blocks=6, block_size=4, num_cpu_blocks=num_cpu_blocks, policy="priority")
    low = h.add("low", prompt_len=16, max_tokens=6, priority=5)  # 4 blocks, 5 after its first decode
    h.step()
    h.step()
    assert low.num_computed_tokens == 17
    h.add("high", prompt_len=8, max_tokens=3, priority=0)  # 2 blocks: low must go, and needs 5 host blocks
    plan = h.step()
    assert not plan.swaps
    assert low.status is RequestStatus.WAITING and low.num_computed_tokens == 0
    assert h.sched.num_recompute_fallbacks == 1 and h.sched.num_recomputed_tokens == 17
    assert h.sched.num_swap_outs == 0
    if h.store is not None:
        assert h.store.num_free_blocks == h.store.num_blocks  # nothing half-allocated on the host
        assert h.store.copy_of("low") is None
    outputs = list(low.output_token_ids)
    h.run()
    h.check_all_done()
    resumed = [c for c in chunks_of(h.plans, "low") if c.start_pos == 0][1]
    assert resumed.token_ids == low.prompt_token_ids + outputs


def test_host_memory_decides_per_victim_between_swap_and_recompute():
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=3, policy="priority")
    small = h.add("small", prompt_len=8, max_tokens=6, priority=5)
    big = h.add("big", prompt_len=16, max_tokens=6, priority=6)
    h.step()
    h.step()
    assert (small.num_computed_tokens, big.num_computed_tokens) == (9, 17)  # 3 + 5 blocks: memory full
    h.add("high", prompt_len=24, max_tokens=2, priority=0)  # 6 blocks: both must go
    plan = h.step()
    assert big.status is RequestStatus.WAITING and big.num_computed_tokens == 0  # 5 blocks: host too small
    assert small.status is RequestStatus.SWAPPED and small.num_computed_tokens == 9  # 3 blocks: fits
    assert runs_blocks(out_runs(plan)) == 3 and len(plan.swaps) == 1
    assert h.sched.num_recompute_fallbacks == 1 and h.sched.num_swap_outs == 1
    assert [c.request_id for c in plan.chunks] == ["high"]
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_ins == 1


@pytest.mark.parametrize("cooldown", [1, 3, 6])
def test_cooldown_protects_a_newly_scheduled_request_from_waiting_ones(cooldown):
    h = SwapHarness(num_blocks=4, block_size=16, num_cpu_blocks=8, policy="priority", cooldown=cooldown)
    low = h.add("low", prompt_len=40, max_tokens=20, priority=5)  # 3 blocks; a 4th only at position 48
    h.step()
    assert low.scheduled_in_step == 1
    h.add("high", prompt_len=30, max_tokens=2, priority=0)  # 2 blocks, 1 free: only by preempting low
    for step in range(2, 1 + cooldown):
        plan = h.step()
        assert plan.step_id == step
        assert [c.request_id for c in plan.chunks] == ["low"] and not plan.swaps
    plan = h.step()
    assert plan.step_id == max(2, 1 + cooldown)
    assert low.status is RequestStatus.SWAPPED and outs(plan)
    assert [c.request_id for c in plan.chunks] == ["high"]
    # swapped back in, it is protected again for `cooldown` steps
    h.step_until(lambda: low.status is RequestStatus.RUNNING)
    back_in = h.plans[-1].step_id
    assert low.scheduled_in_step == back_in
    h.add("high2", prompt_len=30, max_tokens=2, priority=0)
    h.step_until(lambda: h.status_of("low") is not RequestStatus.RUNNING
                 or h.plans[-1].step_id >= back_in + cooldown + 1)
    assert h.plans[-1].step_id == max(back_in + 1, back_in + cooldown)
    assert low.status is RequestStatus.SWAPPED and low.num_preemptions == 2
    h.run()
    h.check_all_done()


def test_cooldown_does_not_protect_against_a_running_requests_growth():
    h = SwapHarness(num_blocks=4, block_size=4, num_cpu_blocks=8, policy="priority", cooldown=100)
    high = h.add("high", prompt_len=4, max_tokens=10, priority=0)  # 1 block, a 2nd at its first decode
    low = h.add("low", prompt_len=12, max_tokens=3, priority=5)  # 3 blocks: memory full
    plan = h.step()
    assert [c.request_id for c in plan.chunks] == ["high", "low"]
    plan = h.step()
    assert plan.step_id < low.scheduled_in_step + 100
    assert low.status is RequestStatus.SWAPPED and outs(plan)
    assert [c.request_id for c in plan.chunks] == ["high"] and len(h.kv.block_ids("high")) == 2
    assert high.status is RequestStatus.RUNNING
    h.run()
    h.check_all_done()


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_max_num_seqs_preempts_for_a_seat_even_with_free_memory(swap_mode):
    h = SwapHarness(num_blocks=64, block_size=4, num_cpu_blocks=64, max_num_seqs=1, policy="priority",
                    swap_mode=swap_mode, delay=1)
    low = h.add("low", prompt_len=5, max_tokens=8, priority=3)
    h.step()
    h.step()
    h.add("high", prompt_len=5, max_tokens=2, priority=1)
    plan = h.step()
    # a swapping-out request holds no seat: high starts at once even while the copy runs
    assert low.status is (RequestStatus.SWAPPED if swap_mode == "sync" else RequestStatus.SWAPPING_OUT)
    assert outs(plan)
    assert [c.request_id for c in plan.chunks] == ["high"]
    assert [r.request_id for r in h.sched.running] == ["high"]
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_ins == 1 and h.sched.num_recomputed_tokens == 0




@pytest.mark.parametrize("seed, swap_mode", [
    (seed, mode) for seed in range(4) for mode in SWAP_MODES])
def test_max_num_seqs_bounds_resident_requests_under_priority_churn(seed, swap_mode):
    rng = random.Random(seed)
    h = SwapHarness(num_blocks=200, block_size=4, num_cpu_blocks=200, max_num_seqs=2, policy="priority",
                    swap_mode=swap_mode, seed=seed)
    for i in range(8):
        h.add(f"r{i}", rng.randint(1, 12), rng.randint(2, 10), priority=rng.randint(0, 4))
    seen_full = False
    for step in range(2000):
        if not h.sched.has_unfinished():
            break
        if step % 2 == 0 and h.sched.requests:
            h.sched.update_priority(rng.choice(sorted(h.sched.requests)), rng.randint(0, 4))
        plan = h.step()
        resident = [r for r in h.sched.requests.values() if r.status is RequestStatus.RUNNING]
        seated = [r for r in h.sched.requests.values() if r.status in (S.RUNNING, S.SWAPPING_IN)]
        assert len(resident) <= 2 and len(seated) <= 2 and len(plan.chunks) <= 2
        seen_full |= len(resident) == 2
    h.run()
    h.check_all_done()
    assert seen_full
    assert h.sched.num_preemptions > 0  # memory was never short: every preemption was for a seat


def run_vtc(steps: int, late_tenant_at: int | None = None, weights="a=3,b=1",
            swap_mode: str = "sync") -> tuple[SwapHarness, list[dict]]:
    """Backlogged tenants under vtc with two seats; returns the per-step served-token snapshots."""
    h = SwapHarness(num_blocks=256, block_size=4, num_cpu_blocks=256, max_num_seqs=2, policy="vtc",
                    cooldown=4, tenant_weights=weights, max_num_batched_tokens=64, swap_mode=swap_mode)
    rng = random.Random(7)
    tenants = ["a", "b"]
    next_id = 0
    snapshots = []
    for step in range(steps):
        if step == late_tenant_at:
            tenants.append("c")
        for t in tenants:
            while sum(r.tenant == t for r in h.sched.requests.values()) < 4:
                h.add(f"{t}{next_id}", rng.randint(4, 16), rng.randint(4, 24), tenant=t)
                next_id += 1
        h.step()
        snapshots.append(dict(h.sched.policy.served_tokens))
    return h, snapshots


def served_between(snapshots: list[dict], start: int, end: int, tenant: str) -> float:
    return snapshots[end].get(tenant, 0.0) - (snapshots[start].get(tenant, 0.0) if start >= 0 else 0.0)


@pytest.mark.parametrize("swap_mode", ["sync", "async"])
def test_vtc_two_backlogged_tenants_share_by_weight(swap_mode):
    h, snaps = run_vtc(600, swap_mode=swap_mode)
    a, b = (served_between(snaps, 99, 599, t) for t in "ab")
    print(f"\nvtc 3:1 served after warm-up ({swap_mode}): a={a:.0f} b={b:.0f} ratio={a / b:.2f}")
    assert a / b == pytest.approx(3.0, rel=0.15)
    stats = h.sched.stats()
    assert stats["vtc_service_a"] == round(snaps[-1]["a"], 1)


def test_vtc_late_tenant_is_neither_starved_nor_starving():
    late = 300
    h, snaps = run_vtc(700, late_tenant_at=late)
    first_c = next(i for i, s in enumerate(snaps) if s.get("c", 0) > 0)
    assert first_c - late <= 10, f"the late tenant waited {first_c - late} steps"
    for start in range(late, 700 - 20, 20):  # every window after its arrival serves everyone
        for t in "abc":
            assert served_between(snaps, start, start + 20, t) > 0, f"tenant {t} starved in steps {start}..+20"
    a, b, c = (served_between(snaps, late + 50, 699, t) for t in "abc")
    print(f"\nvtc 3:1:1 after the late arrival: a={a:.0f} b={b:.0f} c={c:.0f}")
    assert a / b == pytest.approx(3.0, rel=0.2)
    assert c / b == pytest.approx(1.0, rel=0.2)


def test_update_priority_of_an_unknown_or_finished_request_raises():
    h = SwapHarness(num_blocks=16, block_size=4, policy="priority")
    with pytest.raises(ValueError, match="unknown request id"):
        h.sched.update_priority("nope", 1)
    h.add("a", prompt_len=2, max_tokens=1)
    h.sched.update_priority("a", 3)
    assert h.sched.requests["a"].priority == 3
    h.run()
    with pytest.raises(ValueError, match="unknown request id"):
        h.sched.update_priority("a", 1)


def test_aborting_a_swapped_request_frees_its_host_blocks():
    h = SwapHarness(num_blocks=4, block_size=4, num_cpu_blocks=6, policy="priority")
    low = h.add("low", prompt_len=10, max_tokens=8, priority=5)  # 3 blocks
    h.step()
    h.add("high", prompt_len=8, max_tokens=6, priority=0)  # 2 blocks, 1 free
    h.step()
    assert low.status is RequestStatus.SWAPPED and len(h.host_blocks("low")) == 3
    free_device = h.kv.num_free_blocks
    h.finish(low, RequestStatus.FINISHED_ABORTED)
    assert low.status is RequestStatus.FINISHED_ABORTED and "low" not in h.sched.requests
    assert h.store.copy_of("low") is None and h.store.num_free_blocks == 6
    assert h.kv.num_free_blocks == free_device  # its device blocks were already released by the swap-out
    h.sched.check_invariants()
    plan = h.step()
    assert plan.finished_ids == ["low"] and "low" not in h.worker.specs
    assert not ins(plan)
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_ins == 0


def test_host_blocks_read_by_a_swap_in_are_not_reused_by_the_same_plans_swap_out():
    # x is swapped out to the whole host arena; at the step it swaps back in, g's growth evicts z. The host
    # blocks x is being read from are still taken (the plan runs swap-outs first), so z must recompute
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=5, policy="priority")
    x = h.add("x", prompt_len=20, max_tokens=6, priority=1)  # 5 blocks, a 6th at its first decode
    h.add("g", prompt_len=3, max_tokens=6, priority=2)  # 1 block, a 2nd at position 4
    z = h.add("z", prompt_len=3, max_tokens=6, priority=3)
    h.step()
    h.sched.update_priority("x", 9)
    h.add("w", prompt_len=8, max_tokens=1, priority=0)  # 2 blocks, 1 free: evicts x, the lowest now
    plan = h.step()
    assert x.status is RequestStatus.SWAPPED and h.store.num_free_blocks == 0
    assert "w" in h.done
    h.sched.update_priority("x", 0)
    plan = h.step()
    assert x.status is RequestStatus.RUNNING and ins(plan)
    assert z.status is RequestStatus.WAITING and not outs(plan)
    assert h.sched.num_recompute_fallbacks == 1
    assert h.store.num_free_blocks == 5  # released once the plan was built
    h.run()
    h.check_all_done()


def test_no_preemption_that_cannot_make_room():
    """A waiting request that cannot get in even after preempting every eligible victim preempts nobody:
    a victim swapped out for nothing would only add a copy and leave its blocks idle."""
    h = SwapHarness(num_blocks=5, block_size=16, num_cpu_blocks=16, policy="priority", cooldown=5)
    h.add("a", prompt_len=20, max_tokens=40, priority=5)
    for _ in range(6):
        h.step()
    b = h.add("b", prompt_len=40, max_tokens=40, priority=4)
    h.step()
    assert b.status is RequestStatus.RUNNING
    w = h.add("w", prompt_len=70, max_tokens=4, priority=0)  # needs 5 blocks: a's 2 are not enough, b is cooling
    plan = h.step()
    assert not plan.swaps and h.sched.num_preemptions == 0 and w.status is RequestStatus.WAITING
    h.step_until(lambda: w.status is not RequestStatus.WAITING)  # once b's cooldown ends, a and b both make way
    assert w.status is RequestStatus.RUNNING and h.sched.num_preemptions == 2
    h.run()
    h.check_all_done()


# ---- issue 4: the safety rules of asynchronous swapping, forced by copies that land late ---------------------


def preempted_low(swap_mode: str = "async", delay="hold", **kw) -> tuple[SwapHarness, Request, Request]:
    """low (4 blocks, 16 tokens computed) is swapped out for high (5 blocks of 8; 4 free): the swap-out is
    issued, and with ``delay="hold"`` it stays in flight until the test releases it."""
    kw.setdefault("num_cpu_blocks", 16)
    h = SwapHarness(num_blocks=8, block_size=4, policy="priority", swap_mode=swap_mode, delay=delay, **kw)
    low = h.add("low", prompt_len=14, max_tokens=12, priority=5)
    for _ in range(3):
        h.step()
    assert low.num_computed_tokens == 16 and len(h.kv.block_ids("low")) == 4
    high = h.add("high", prompt_len=20, max_tokens=4, priority=0)
    plan = h.step()
    (command,) = plan.swaps
    assert command.kind == "out" and command.wait == (swap_mode == "sync")
    return h, low, high


@pytest.mark.parametrize("swap_mode", ["async", "adaptive"])
def test_rule2_device_blocks_of_an_in_flight_swap_out_are_not_reused_until_it_lands(swap_mode):
    h, low, high = preempted_low(swap_mode)
    device = list(h.kv.block_ids("low"))
    (swap_id,) = h.worker.submitted
    for _ in range(4):  # the copy is slow: nobody may take low's blocks meanwhile (the worker checks every write)
        plan = h.step()
        assert low.status is RequestStatus.SWAPPING_OUT and h.kv.block_ids("low") == device
        assert high.status is RequestStatus.WAITING and not plan.chunks and not plan.swaps
        assert h.kv.num_free_blocks == 4 and h.worker.in_flight(swap_id)
        assert h.sched.stats()["num_swaps_in_flight"] == 1
    h.worker.release()
    plan = h.step()  # the copy lands during this step; the scheduler learns of it from the result
    assert not plan.chunks and h.worker.landed_in_step[swap_id] == plan.step_id
    assert low.status is RequestStatus.SWAPPED and not h.kv.holds("low") and h.kv.num_free_blocks == 8
    plan = h.step()
    assert [c.request_id for c in plan.chunks] == ["high"]
    assert set(device) & set(h.kv.block_ids("high"))  # low's old blocks now hold high's KV
    h.worker.delay = 0
    h.run()
    h.check_all_done()
    assert h.sched.num_recomputed_tokens == 0


def _break_rule_2(monkeypatch) -> None:
    """A scheduler that frees a victim's device blocks as soon as it issues an asynchronous swap-out."""
    original = Scheduler._swap_out

    def eager(self, plan, request):
        ok = original(self, plan, request)
        if ok and request.status is RequestStatus.SWAPPING_OUT:
            self.kv.free(request.request_id)
            self.kv.allocate_slots(request.request_id, 0)  # an empty table: "on the device" for the invariants
        return ok

    monkeypatch.setattr(Scheduler, "_swap_out", eager)


def test_rule2_the_harness_catches_blocks_reused_under_an_in_flight_swap_out(monkeypatch):
    # the test above has teeth: with rule 2 broken, high is written into low's blocks while they are copied
    _break_rule_2(monkeypatch)
    with pytest.raises(AssertionError):
        h, _, _ = preempted_low("async", delay=2)
        h.run()


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_rule3_a_swapping_in_request_computes_only_once_its_copy_landed(swap_mode):
    h, low, high = preempted_low(swap_mode, adaptive_min_batch=1)
    h.worker.release()
    h.step_until(lambda: high.status is RequestStatus.FINISHED_LENGTH)
    plan = h.step()
    (command,) = ins(plan)
    assert [d for _, d in pairs_of(command.runs)] == h.kv.block_ids("low")[:4]
    if swap_mode != "async":  # sync, or adaptive with nothing else running: the step waits for the copy
        assert command.wait and low.status is RequestStatus.RUNNING
        (chunk,) = plan.chunks
        assert chunk.request_id == "low" and chunk.start_pos == 16
        assert h.worker.landed_in_step[command.swap_id] == plan.step_id
    else:
        assert not command.wait and low.status is RequestStatus.SWAPPING_IN and not plan.chunks
        for _ in range(3):  # the copy is slow: low must not compute on blocks it has not filled yet
            plan = h.step()
            assert not plan.chunks and low.status is RequestStatus.SWAPPING_IN
        h.worker.release()
        plan = h.step()
        assert not plan.chunks and h.worker.landed_in_step[command.swap_id] == plan.step_id
        assert low.status is RequestStatus.RUNNING
        plan = h.step()
        (chunk,) = plan.chunks
        assert chunk.request_id == "low" and chunk.start_pos == 16
    h.worker.delay = 0
    h.run()
    h.check_all_done()
    assert h.sched.num_recomputed_tokens == 0


def test_rule3_the_harness_catches_a_chunk_on_blocks_whose_swap_in_has_not_landed(monkeypatch):
    original = Scheduler._swap_in

    def eager(self, plan, request, host_blocks):  # runs the request in the step its async copy is issued
        original(self, plan, request, host_blocks)
        request.status = RequestStatus.RUNNING
        return True

    monkeypatch.setattr(Scheduler, "_swap_in", eager)
    h, low, high = preempted_low("async", delay=1)
    with pytest.raises(AssertionError):
        h.run()


def _fill_host_with_prefixes(h: SwapHarness, names: list[str]) -> None:
    """Finished requests of 8 computed tokens each leave a 2-block stored prefix in host memory."""
    for name in names:
        h.add(name, prompt_len=8, max_tokens=2, priority=-5)
        h.step_until(lambda: name in h.done)
        h.settle()
    assert len(h.store.prefixes) == len(names)


def test_rule4_host_blocks_of_an_in_flight_swap_out_are_never_evicted_or_reused():
    h = SwapHarness(num_blocks=16, block_size=4, num_cpu_blocks=8, policy="priority", swap_mode="async",
                    enable_kv_reuse=True, delay=0)
    _fill_host_with_prefixes(h, ["f0", "f1", "f2"])  # 6 host blocks cached, 2 free
    assert h.store.num_cached_blocks() == 6 and h.store.num_free_blocks == 2
    low = h.add("low", prompt_len=12, max_tokens=20, priority=5)  # 3 blocks
    mid = h.add("mid", prompt_len=24, max_tokens=20, priority=4)  # 6 blocks
    h.step()
    h.step()
    h.worker.delay = "hold"
    h.add("high1", prompt_len=36, max_tokens=1, priority=0)  # 9 blocks, 7 free: low must go
    plan = h.step()
    (command,) = plan.swaps
    assert command.kind == "out" and low.status is RequestStatus.SWAPPING_OUT
    low_host = h.host_blocks("low")
    assert len(low_host) == 4 and h.store.num_evictions == 1  # 2 free + f0 evicted (the least recently used)
    h.add("high2", prompt_len=40, max_tokens=1, priority=-1)  # 10 blocks: mid must go too
    plan = h.step()
    # mid needs 7 host blocks: 0 free + 4 cached are not enough, and low's blocks are under a copy
    assert not plan.swaps and mid.status is RequestStatus.WAITING and mid.num_computed_tokens == 0
    assert h.sched.num_recompute_fallbacks == 1
    assert h.host_blocks("low") == low_host and h.store.copy_of("low").pins > 0
    assert not h.store.prefixes and h.store.num_evictions == 3  # trying made room by evicting the cache only
    for _ in range(2):
        h.step()
        assert h.host_blocks("low") == low_host
    h.worker.release()
    h.worker.delay = 0
    h.run()
    h.check_all_done()


def test_rule4_host_blocks_read_by_an_in_flight_swap_in_are_never_reused():
    # the earlier same-plan test, asynchronous: x's swap-in is still in flight when g's growth preempts z,
    # and the whole host arena holds x's copy, so z must recompute
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=5, policy="priority", swap_mode="async", delay=0)
    x = h.add("x", prompt_len=20, max_tokens=6, priority=1)  # 5 blocks, a 6th at its first decode
    g = h.add("g", prompt_len=3, max_tokens=6, priority=2)  # 1 block, a 2nd at position 4
    z = h.add("z", prompt_len=3, max_tokens=6, priority=3)
    h.step()
    h.sched.update_priority("x", 9)
    h.add("w", prompt_len=8, max_tokens=1, priority=0)  # 2 blocks, 1 free: evicts x, the lowest now
    h.step_until(lambda: "w" in h.done)
    h.settle()
    assert x.status is RequestStatus.SWAPPED and h.store.num_free_blocks == 0
    x_host = h.host_blocks("x")
    h.sched.update_priority("x", 0)
    h.worker.delay = "hold"
    plan = h.step()
    assert x.status is RequestStatus.SWAPPING_IN and ins(plan)
    for _ in range(10):
        if g.num_computed_tokens >= 4:
            break
        plan = h.step()
        assert not outs(plan) and h.host_blocks("x") == x_host
    plan = h.step()  # g grows into a second block: z goes, and recomputes as the host is full
    assert z.status is RequestStatus.WAITING and h.sched.num_recompute_fallbacks == 1 and not outs(plan)
    assert x.status is RequestStatus.SWAPPING_IN and h.host_blocks("x") == x_host
    h.worker.release()
    h.worker.delay = 0
    h.run()
    h.check_all_done()


@pytest.mark.parametrize("swap_mode", ["async", "adaptive"])
def test_rule5_abort_during_a_swap_out_defers_the_release_until_it_lands(swap_mode):
    h, low, high = preempted_low(swap_mode)
    (swap_id,) = h.worker.submitted
    free_device, free_host = h.kv.num_free_blocks, h.store.num_free_blocks
    h.finish(low, RequestStatus.FINISHED_ABORTED)
    assert "low" not in h.sched.requests and not h.kv.holds("low") and h.store.copy_of("low") is None
    assert h.kv.num_free_blocks == free_device and h.store.num_free_blocks == free_host  # the copy still reads
    h.sched.check_invariants()
    again = h.add("low", prompt_len=3, max_tokens=4, priority=9)  # the id is free at once
    plan = h.step()
    assert plan.finished_ids == ["low"] and high.status is RequestStatus.WAITING
    for _ in range(2):
        h.step()
        assert h.kv.num_free_blocks == free_device and h.worker.in_flight(swap_id)
    h.worker.release()
    plan = h.step()
    assert h.worker.landed_in_step[swap_id] == plan.step_id
    assert h.kv.num_free_blocks + len(h.kv.block_ids("high")) + len(h.kv.block_ids("low")) == 8
    assert h.store.num_free_blocks == 16  # the aborted request's host copy is gone
    h.worker.delay = 0
    h.run()
    h.check_all_done()
    assert h.done["low"] is again and again.output_token_ids == [token_for("low", i) for i in range(4)]


@pytest.mark.parametrize("swap_mode", ["async", "adaptive"])
def test_rule5_abort_during_a_swap_in_defers_the_release_until_it_lands(swap_mode):
    h, low, high = preempted_low(swap_mode, adaptive_min_batch=1)
    h.worker.release()
    h.add("other", prompt_len=2, max_tokens=30, priority=1)  # keeps one request running (adaptive: no wait)
    h.step_until(lambda: high.status is RequestStatus.FINISHED_LENGTH)
    h.step_until(lambda: low.status is RequestStatus.SWAPPING_IN)
    (swap_id,) = h.inflight_of.values()
    device = list(h.kv.block_ids("low"))
    free_device, free_host = h.kv.num_free_blocks, h.store.num_free_blocks
    h.finish(low, RequestStatus.FINISHED_ABORTED)
    assert "low" not in h.sched.requests and not h.kv.holds("low")
    assert h.kv.num_free_blocks == free_device and h.store.num_free_blocks == free_host
    h.sched.check_invariants()
    again = h.add("low", prompt_len=3, max_tokens=2, priority=9)
    for _ in range(2):
        h.step()
        assert h.worker.in_flight(swap_id) and h.store.num_free_blocks == free_host
        assert not set(device) & set(h.kv.block_ids("low"))  # the copy still writes these
    h.worker.release()
    h.step()
    assert h.store.num_free_blocks == 16
    h.worker.delay = 0
    h.run()
    h.check_all_done()
    assert h.done["low"] is again


def test_rule6_a_request_that_regains_priority_while_swapping_out_is_reclaimed():
    h, low, high = preempted_low("async")
    device = list(h.kv.block_ids("low"))
    (swap_id,) = h.worker.submitted
    h.sched.update_priority("low", -1)  # low outranks high again before its copy landed
    plan = h.step()
    assert low.status is RequestStatus.SWAPPING_OUT and not plan.chunks  # the copy is still reading its blocks
    h.worker.release()
    plan = h.step()
    assert h.worker.landed_in_step[swap_id] == plan.step_id
    assert low.status is RequestStatus.RUNNING and h.kv.block_ids("low") == device  # never freed
    assert h.num_reclaims == 1 and h.store.copy_of("low") is None  # no kv reuse: the host copy is dropped
    plan = h.step()
    (chunk,) = [c for c in plan.chunks if c.request_id == "low"]
    # tokens intact (the worker read them), and the worker kept the table it had: only the new block is sent
    assert chunk.start_pos == 16 and h.worker.batch.table("low")[:4] == device and chunk.table_start == 4
    h.worker.delay = 0
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_ins == 0 and h.worker.blocks_swapped_in == 0
    assert h.sched.num_recomputed_tokens == 0


def test_rule6_a_reclaimed_request_keeps_to_max_num_seqs():
    # two seats: c takes b's seat; b regains the top rank while its swap-out is in flight. When the copy
    # lands, b must not make a third running request
    h = SwapHarness(num_blocks=64, block_size=4, num_cpu_blocks=64, max_num_seqs=2, policy="priority",
                    swap_mode="async", delay="hold")
    h.add("a", prompt_len=4, max_tokens=20, priority=1)
    b = h.add("b", prompt_len=4, max_tokens=20, priority=2)
    h.step()
    h.add("c", prompt_len=4, max_tokens=20, priority=0)
    h.step()
    assert b.status is RequestStatus.SWAPPING_OUT
    h.sched.update_priority("b", -1)
    h.step()
    h.worker.release()
    h.worker.delay = 0
    h.run()  # check_invariants after every step: never more seated requests than max_num_seqs
    h.check_all_done()


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
@pytest.mark.parametrize("num_running", [0, 1, 2, 3])
def test_adaptive_mode_waits_for_a_swap_in_only_when_the_batch_is_small(swap_mode, num_running):
    # low gives its seat to high and comes back when high is done, while num_running others keep running
    h = SwapHarness(num_blocks=64, block_size=4, num_cpu_blocks=64, max_num_seqs=num_running + 1,
                    policy="priority", swap_mode=swap_mode, adaptive_min_batch=2, delay=0)
    for i in range(num_running):
        h.add(f"bg{i}", prompt_len=3, max_tokens=40, priority=1)
    low = h.add("low", prompt_len=6, max_tokens=10, priority=5)
    h.step()
    h.step()
    high = h.add("high", prompt_len=3, max_tokens=2, priority=0)
    h.step_until(lambda: high.status is RequestStatus.FINISHED_LENGTH)
    h.step_until(lambda: ins(h.plans[-1]))
    plan = h.plans[-1]
    (command,) = ins(plan)
    running = sum(r.status is RequestStatus.RUNNING for r in h.sched.requests.values() if r is not low)
    assert running == num_running
    expected = {"sync": True, "async": False, "adaptive": num_running < 2}[swap_mode]
    assert command.wait == expected
    assert ("low" in [c.request_id for c in plan.chunks]) == expected
    h.run()
    h.check_all_done()


# ---- issue 4: the CPU KV reuse store ----------------------------------------------------------------------------


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
@pytest.mark.parametrize("first_computed", [16, 17])
def test_reuse_a_second_swap_out_copies_only_the_dirty_tail(swap_mode, first_computed):
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=32, policy="priority", swap_mode=swap_mode,
                    enable_kv_reuse=True, delay=1)
    low = h.add("low", prompt_len=14, max_tokens=12, priority=5)  # 25 tokens of KV at most: 7 blocks
    h.step_until(lambda: low.num_computed_tokens >= first_computed)
    h.add("high1", prompt_len=first_computed + 4, max_tokens=2, priority=0)  # needs more than the free 3-4
    h.step_until(lambda: outs(h.plans[-1]))
    (first,) = outs(h.plans[-1])
    assert runs_blocks(first.runs) == blocks_for(first_computed, 4) and h.sched.num_reused_swap_out_blocks == 0
    first_host = [hb for _, hb in pairs_of(first.runs)]
    h.step_until(lambda: low.status is RequestStatus.RUNNING and low.num_computed_tokens >= 22)
    assert low.num_computed_tokens == 22 and len(h.kv.block_ids("low")) == 6
    assert h.store.copy_of("low").valid_tokens == first_computed  # kept after the swap-in
    h.add("high2", prompt_len=20, max_tokens=2, priority=0)  # 5 blocks, 2 free
    plan = h.step()
    (second,) = outs(plan)
    kept = first_computed // 4  # a partial last block is dirty: it is copied again
    assert [i for i, b in enumerate(h.host_blocks("low")) if b in {hb for _, hb in pairs_of(second.runs)}] == \
        list(range(kept, 6))
    assert runs_blocks(second.runs) == 6 - kept
    assert h.sched.num_reused_swap_out_blocks == kept
    assert h.host_blocks("low")[:kept] == first_host[:kept]
    assert h.sched.stats()["reused_swap_out_blocks"] == kept
    h.run()  # low's write-back at its finish reuses the valid blocks again (the harness checks each count)
    h.check_all_done()


def finished_turn(h: SwapHarness, rid: str = "a", prompt_len: int = 10, max_tokens: int = 7,
                  session_id: str | None = None) -> Request:
    a = h.add(rid, prompt_len=prompt_len, max_tokens=max_tokens, session_id=session_id)
    h.step_until(lambda: rid in h.done)
    return a


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_reuse_a_finished_turns_blocks_are_written_back_and_stay_for_the_next_turn(swap_mode):
    h = SwapHarness(num_blocks=16, block_size=4, num_cpu_blocks=32, swap_mode=swap_mode, enable_kv_reuse=True,
                    delay=1)
    a = finished_turn(h)  # 10 + 7 tokens; its KV covers the first 16
    assert a.num_computed_tokens == 16 and not h.kv.holds("a")
    plan = h.step()
    (write_back,) = plan.swaps
    assert write_back.kind == "out" and runs_blocks(write_back.runs) == 4
    assert write_back.wait == (swap_mode == "sync")
    written_from = [gpu for gpu, _ in pairs_of(write_back.runs)]
    h.settle()
    assert len(h.store.prefixes) == 1 and h.store.num_cached_blocks() == 4 and not h.store.copies
    # the device keeps the 4 full blocks (the partial fifth was freed) as a cache that counts as free
    assert h.kv.num_unused_blocks == 12 and h.kv.num_evictable_blocks == 4 and h.kv.num_free_blocks == 16
    prompt = a.token_ids + [5, 6, 7, 8, 9]  # the next turn: the whole conversation, then more
    b = h.add("b", 0, max_tokens=3, prompt=prompt)
    plan = h.step()
    # adopted where it lies: no copy in either direction, and it computes only its new tokens at once
    assert h.resident_hits == [("b", 16)] and not h.prefix_hits and not plan.swaps
    assert h.kv.block_ids("b")[:4] == written_from and b.num_computed_tokens == len(prompt)
    assert h.sched.num_reused_resident_tokens == h.sched.num_reused_prefix_tokens == 16
    assert h.kv.num_evictable_blocks == 0
    h.run()
    h.check_all_done()
    (first,) = chunks_of(h.plans, "b")[:1]
    assert first.start_pos == 16 and first.token_ids == prompt[16:]


@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_reuse_the_next_turn_swaps_its_history_in_once_the_device_evicted_it(swap_mode):
    h = SwapHarness(num_blocks=16, block_size=4, num_cpu_blocks=32, swap_mode=swap_mode, enable_kv_reuse=True,
                    delay=1)
    a = finished_turn(h)
    h.settle()
    filler = h.add("filler", prompt_len=56, max_tokens=1)  # 14 blocks: 12 free and 2 of the 4 resident
    h.step()
    assert h.kv.num_resident_evictions == 1 and filler.num_computed_tokens == 56  # a's blocks were evicted
    h.run()
    prompt = a.token_ids + [5, 6, 7, 8, 9]
    b = h.add("b", 0, max_tokens=3, prompt=prompt)
    plan = h.step()
    assert h.prefix_hits == [("b", 16)] and not h.resident_hits  # from host memory
    assert b.num_computed_tokens == (16 if swap_mode == "async" else len(prompt))
    (swap_in,) = plan.swaps
    assert swap_in.kind == "in" and runs_blocks(swap_in.runs) == 4
    assert sorted(hb for hb, _ in pairs_of(swap_in.runs)) == sorted(next(iter(h.store.prefixes.values())).blocks)
    assert h.sched.num_reused_prefix_tokens == 16 and h.store.num_hits == 1
    h.run()
    h.check_all_done()
    (first,) = chunks_of(h.plans, "b")[:1]
    assert first.start_pos == 16 and first.token_ids == prompt[16:]
    assert sum(len(c.token_ids) for c in chunks_of(h.plans, "b")) == len(prompt) + 3 - 1 - 16


def test_reuse_a_next_turn_arriving_while_its_history_is_written_back_waits_for_the_blocks():
    # async: the write-back is in flight when the next turn comes. Its blocks are read by the copy, so the turn
    # waits for it to land (a step or so) and then adopts them: no prefill, no swap-in
    h = SwapHarness(num_blocks=16, block_size=4, num_cpu_blocks=32, swap_mode="async", enable_kv_reuse=True,
                    delay=2)
    a = finished_turn(h)
    prompt = a.token_ids + [5, 6]
    b = h.add("b", 0, max_tokens=2, prompt=prompt)
    plan = h.step()  # carries the write-back
    assert [c.kind for c in plan.swaps] == ["out"] and b.status is RequestStatus.WAITING
    h.run()
    h.check_all_done()
    assert h.resident_hits == [("b", 16)] and not h.prefix_hits
    assert chunks_of(h.plans, "b")[0].start_pos == 16


def test_reuse_a_prompt_that_differs_inside_a_block_matches_up_to_that_block():
    h = SwapHarness(num_blocks=16, block_size=4, num_cpu_blocks=32, enable_kv_reuse=True)
    a = finished_turn(h)
    h.settle()
    prompt = a.token_ids[:9] + [a.token_ids[9] + 1] + a.token_ids[10:]  # differs at position 9, in block 2
    h.add("b", 0, max_tokens=2, prompt=prompt)
    h.step()
    assert h.resident_hits == [("b", 8)]  # the first 2 of a's resident blocks; the other 2 are freed
    h.add("c", 0, max_tokens=2, prompt=[a.token_ids[0] + 1] + a.token_ids[1:])  # differs in block 0: no hit
    h.add("d", 0, max_tokens=2, prompt=a.token_ids[:16], session_id="other")  # another session: no hit
    h.add("e", 0, max_tokens=2, prompt=a.token_ids[:16])  # at least one token is left to compute
    h.run()
    h.check_all_done()
    assert h.resident_hits == [("b", 8)] and h.prefix_hits == [("e", 12)]  # e from the host copy


def test_reuse_a_recompute_preempted_request_can_hit_a_stored_prefix_again():
    # b starts from a's stored prefix (its host copy shares a's blocks), is preempted by recompute and comes
    # back: its own host copy is still there when the prefix hits again
    h = SwapHarness(num_blocks=10, block_size=4, num_cpu_blocks=32, policy="priority",
                    preemption_mode="recompute", enable_kv_reuse=True)
    a = finished_turn(h)
    h.settle()
    b = h.add("b", 0, max_tokens=8, prompt=a.token_ids + [1, 2, 3], priority=5)  # 20 tokens, 5 blocks
    h.step()
    assert h.resident_hits == [("b", 16)]  # a's blocks, still on the device
    h.add("high", prompt_len=24, max_tokens=2, priority=0)  # 6 blocks, 5 free: b goes
    h.step()
    assert b.status is RequestStatus.WAITING
    h.run()
    h.check_all_done()
    assert h.prefix_hits == [("b", 16)]  # its KV was dropped, and the host still had it


def test_reuse_a_prefix_matched_for_admission_is_not_evicted_by_the_victims_swap_out():
    # host memory: a's 4-block prefix and 2 free blocks. b (whose prompt starts with a's conversation) preempts
    # v, whose swap-out needs 3 host blocks: making room must not evict the prefix b is about to swap in
    h = SwapHarness(num_blocks=8, block_size=4, num_cpu_blocks=6, policy="priority", enable_kv_reuse=True)
    a = finished_turn(h)
    h.settle()
    v = h.add("v", prompt_len=12, max_tokens=20, priority=5)
    h.add("w", prompt_len=12, max_tokens=20, priority=4)
    h.step()
    h.step()
    assert v.num_computed_tokens == 13 and len(h.kv.block_ids("v")) == 4
    h.add("b", 0, max_tokens=2, prompt=a.token_ids + [1], priority=0)  # 18 tokens: 5 blocks, 0 free
    h.run()
    h.check_all_done()


def run_conversation_flips(seed: int, swap_mode: str, allocator: str) -> SwapHarness:
    """Closed-loop conversations (each turn's prompt is the whole history plus a new message) on tight device
    memory, with priority flips: finished turns' blocks stay resident and are adopted, evicted, or written back
    and swapped in, while other requests preempt and swap around them."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    h = SwapHarness(num_blocks=rng.randint(24, 40), block_size=block_size, num_cpu_blocks=rng.randint(12, 60),
                    max_num_batched_tokens=rng.randint(8, 48), policy="priority", cooldown=rng.choice([0, 2]),
                    allocator=allocator, swap_mode=swap_mode, enable_kv_reuse=True, seed=seed)
    history = {f"c{c}": [] for c in range(rng.randint(2, 4))}
    turns = dict.fromkeys(history, 0)
    due = {c: rng.randint(0, 4) for c in history}  # conversation -> step its next turn arrives
    live: dict[str, str] = {}  # conversation -> its live turn's request id
    for step in range(3000):
        for c, at in list(due.items()):
            if at <= step:
                del due[c]
                history[c] += [rng.randrange(900) for _ in range(rng.randint(1, 8))]
                rid = f"{c}-t{turns[c]}"
                h.add(rid, 0, max_tokens=rng.randint(1, 8), prompt=list(history[c]), session_id=c,
                      priority=rng.randint(0, 3))
                live[c] = rid
        if step < 80 and rng.random() < 0.15:  # one-off requests that compete for the blocks
            h.add(f"x{step}", rng.randint(1, h.kv.num_blocks * block_size // 3), max_tokens=rng.randint(1, 8),
                  priority=rng.randint(0, 3))
        if step % 3 == 0 and h.sched.requests:
            h.sched.update_priority(rng.choice(sorted(h.sched.requests)), rng.randint(0, 3))
        h.step()
        for c, rid in list(live.items()):
            if rid in h.done:
                del live[c]
                history[c] = list(h.done[rid].token_ids)
                turns[c] += 1
                if turns[c] < 6 and len(history[c]) + 16 <= h.kv.num_blocks * block_size * 3 // 4:
                    due[c] = step + rng.choice([0, 0, 1, 3, 12])  # often at once: the history is still resident
        if not due and not live and step >= 80:
            break
    h.run()
    h.check_all_done()
    return h


@pytest.mark.parametrize("allocator", ["group", "block"])
@pytest.mark.parametrize("swap_mode", SWAP_MODES)
def test_reuse_random_conversations_adopt_resident_history_or_swap_it_in(swap_mode, allocator):
    resident = host = 0
    for seed in range(8):
        h = run_conversation_flips(seed, swap_mode, allocator)
        resident += len(h.resident_hits)
        host += len(h.prefix_hits)
        assert h.kv.num_free_blocks == h.kv.num_blocks  # resident history is a cache, nothing is leaked
    assert resident > 0 and host > 0, f"adopted {resident} histories on the device, {host} from the host"
