"""The scheduler, driven by a fake worker that samples a known token for every chunk with ``sample=True``.

The fake worker keeps the state a real one keeps (the sampling settings of every request it has been told
about) so that a plan the real worker could not execute fails here too.
"""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_engine.config import SchedulerConfig
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for
from fs_engine.request import Request, RequestStatus
from fs_engine.sampling_params import SamplingParams
from fs_engine.sched.scheduler import Scheduler
from ipc.messages import StepPlan, StepResult


def token_for(request_id: str, index: int) -> int:
    """The token the fake model samples as output ``index`` of ``request_id``."""
    return 1000 + zlib.crc32(f"{request_id}:{index}".encode()) % 1000


class FakeWorker:
    def __init__(self) -> None:
        self.specs: dict = {}
        self.ever_seen: list[str] = []
        self.finished: list[str] = []

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
            assert chunk.block_ids == self.kv.block_ids(chunk.request_id)
            assert len(chunk.block_ids) >= blocks_for(chunk.start_pos + n, self.kv.block_size)
            used_blocks += chunk.block_ids
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
