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
from ipc.messages import ScheduledChunk, StepPlan, StepResult


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


# ---- swap preemption, policies and anti-thrashing, with simulated KV contents --------------------------------


Slot = tuple[str, int, int]  # (request_id, position, token_id) written into one token slot of a block


class KVFakeWorker(FakeWorker):
    """A fake worker that also keeps KV *contents*: every device and host block is a list of ``block_size``
    slots, each holding the ``(request_id, position, token)`` written there. A plan runs in the worker's order:
    swap-outs (device -> host), swap-ins (host -> device), then each chunk first reads its earlier positions,
    which must hold exactly that request's earlier tokens, and writes its own. A swap that moves the wrong
    blocks, a block reused while still needed or a host block overwritten before it was read back all show up
    as a wrong slot."""

    def __init__(self, block_size: int, num_device_blocks: int, num_host_blocks: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.device: dict[int, list[Slot | None]] = {}
        self.host: dict[int, list[Slot | None]] = {}
        self.history: dict[str, list[int]] = {}  # tokens the worker was given, by position
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0

    def _copy(self, runs, src: dict, src_size: int, dst: dict, dst_size: int) -> int:
        moved = 0
        for s, d, n in runs:
            assert n >= 1 and 0 <= s and s + n <= src_size and 0 <= d and d + n <= dst_size, (s, d, n)
            for i in range(n):
                dst[d + i] = list(src.get(s + i, [None] * self.block_size))
            moved += n
        return moved

    def slot(self, blocks: dict, table: list[int], pos: int) -> Slot | None:
        block = blocks.get(table[pos // self.block_size])
        return None if block is None else block[pos % self.block_size]

    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_ids:
            self.history.pop(request_id, None)
        # swap-outs first: device blocks they free may be the destination of this plan's swap-ins and chunks
        self.blocks_swapped_out += self._copy(plan.swap_out, self.device, self.num_device_blocks,
                                              self.host, self.num_host_blocks)
        self.blocks_swapped_in += self._copy(plan.swap_in, self.host, self.num_host_blocks,
                                             self.device, self.num_device_blocks)
        result = super().execute(plan)
        for chunk in plan.chunks:
            rid, start = chunk.request_id, chunk.start_pos
            history = self.history.setdefault(rid, [])
            assert start <= len(history), f"{rid} computes position {start} but only {len(history)} were given"
            for pos in range(start):
                got = self.slot(self.device, chunk.block_ids, pos)
                assert got == (rid, pos, history[pos]), f"step {plan.step_id}: {rid} reads {got} at position {pos}"
            for i, token in enumerate(chunk.token_ids):
                pos = start + i
                block = self.device.setdefault(chunk.block_ids[pos // self.block_size], [None] * self.block_size)
                block[pos % self.block_size] = (rid, pos, token)
                if pos < len(history):
                    assert history[pos] == token, f"{rid} recomputes position {pos} with a different token"
                else:
                    history.append(token)
        return result


class SwapHarness(Harness):
    """The harness with host memory, any policy and preemption mode, and the KV-contents worker. After every
    step the scheduler's invariants hold, every swap run moves exactly the blocks of the requests whose state
    changed, and every running (swapped) request's device (host) blocks hold its computed tokens."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int | None = None, *,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048, policy: str = "fcfs",
                 preemption_mode: str = "swap", cooldown: int = 0, tenant_weights=None,
                 allocator: str = "group") -> None:
        super().__init__(num_blocks, block_size, max_num_seqs, max_num_batched_tokens)
        self.kv = KVCacheManager(num_blocks, block_size, allocator=allocator)
        self.cpu_kv = None if num_cpu_blocks is None else KVCacheManager(num_cpu_blocks, block_size)
        self.config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      policy=policy, preemption_mode=preemption_mode,
                                      preemption_cooldown_steps=cooldown, tenant_weights=tenant_weights)
        self.sched = Scheduler(self.config, self.kv, cpu_kv=self.cpu_kv)
        self.worker = KVFakeWorker(block_size, num_blocks, num_cpu_blocks or 0)
        self.plans_with_both_swaps = 0

    def add(self, request_id: str, prompt_len: int, max_tokens: int, seed: int | None = None, *,
            priority: int = 0, tenant: str = "default") -> Request:
        prompt = [(zlib.crc32(request_id.encode()) + i) % 900 for i in range(prompt_len)]
        request = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, seed=seed), priority=priority,
                          tenant=tenant, arrival_seq=self._arrivals)
        self._arrivals += 1
        self.max_tokens[request_id] = max_tokens
        self.sched.add_request(request)
        return request

    def step(self) -> StepPlan:
        before = {rid: (r.status, list(self.kv.block_ids(rid)),
                        list(self.cpu_kv.block_ids(rid)) if self.cpu_kv else [], r.num_computed_tokens)
                  for rid, r in self.sched.requests.items()}
        plan = self.sched.schedule()
        self.sched.check_invariants()
        self.check_plan(plan)
        self.check_swaps(plan, before)
        self.plans.append(plan)
        self.plans_with_both_swaps += bool(plan.swap_in and plan.swap_out)
        result = self.worker.execute(plan)
        for request in self.sched.update(plan, result):
            if request.num_output_tokens >= self.max_tokens[request.request_id]:
                self.sched.finish(request, RequestStatus.FINISHED_LENGTH)
                self.done[request.request_id] = request
        self.sched.check_invariants()
        self.check_kv_contents()
        return plan

    def check_swaps(self, plan: StepPlan, before: dict) -> None:
        expected_out, expected_in = [], []
        for rid, (status, device, host, computed) in before.items():
            request = self.sched.requests[rid]
            if status is RequestStatus.RUNNING and request.status is RequestStatus.SWAPPED:
                assert request.num_computed_tokens == computed, "swapping out changed the computed tokens"
                table = self.cpu_kv.block_ids(rid)
                assert len(table) == blocks_for(computed, self.kv.block_size)
                expected_out += zip(device[: len(table)], table)
            elif status is RequestStatus.SWAPPED and request.status is RequestStatus.RUNNING:
                assert request.num_computed_tokens == computed, "swapping in changed the computed tokens"
                expected_in += zip(host, self.kv.block_ids(rid)[: len(host)])
                assert not self.cpu_kv.holds(rid), "host blocks of a swapped-in request were not released"
            elif status is RequestStatus.SWAPPED:
                assert request.status is RequestStatus.SWAPPED and self.cpu_kv.block_ids(rid) == host
        def pairs(runs):
            return sorted((s + i, d + i) for s, d, n in runs for i in range(n))
        assert pairs(plan.swap_out) == sorted(expected_out)
        assert pairs(plan.swap_in) == sorted(expected_in)
        # host blocks read by this plan's swap-ins are not written by its swap-outs (which run first)
        assert not {h for _, h in pairs(plan.swap_out)} & {h for h, _ in pairs(plan.swap_in)}

    def check_kv_contents(self) -> None:
        for rid, request in self.sched.requests.items():
            if request.status is RequestStatus.RUNNING:
                blocks, table = self.worker.device, self.kv.block_ids(rid)
            elif request.status is RequestStatus.SWAPPED:
                blocks, table = self.worker.host, self.cpu_kv.block_ids(rid)
            else:
                continue
            for pos in range(request.num_computed_tokens):
                assert self.worker.slot(blocks, table, pos) == (rid, pos, request.token_ids[pos]), (
                    f"{request}: position {pos} lost")

    def check_all_done(self) -> None:
        super().check_all_done()
        if self.cpu_kv is not None:
            assert self.cpu_kv.num_free_blocks == self.cpu_kv.num_blocks
            self.cpu_kv.check_invariants()

    def status_of(self, request_id: str) -> RequestStatus:
        request = self.sched.requests.get(request_id) or self.done.get(request_id)
        return request.status


def test_fake_kv_worker_catches_a_swap_that_moves_the_wrong_blocks():
    # the check the tests below rely on: a plan whose swap-in brings back the wrong host block fails
    worker = KVFakeWorker(block_size=2, num_device_blocks=4, num_host_blocks=4)
    worker.host = {0: [("x", 0, 7), ("x", 1, 8)], 1: [("y", 0, 5), ("y", 1, 6)]}
    worker.history["x"] = [7, 8]
    worker.specs["x"] = None
    ok = StepPlan(step_id=1, swap_in=[(0, 3, 1)])
    ok.chunks.append(ScheduledChunk("x", [9], 2, [3, 0], sample=True))
    worker.execute(ok)
    bad = StepPlan(step_id=2, swap_in=[(1, 2, 1)])
    bad.chunks.append(ScheduledChunk("x", [9], 2, [2, 0], sample=True))
    with pytest.raises(AssertionError, match="reads"):
        worker.execute(bad)


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
    assert h.kv.block_ids("low") == [] and len(h.cpu_kv.block_ids("low")) == 4
    assert low.num_computed_tokens == 16
    expanded = [(s + i, d + i) for s, d, n in plan.swap_out for i in range(n)]
    assert expanded == list(zip(device_before, h.cpu_kv.block_ids("low")))
    assert len(plan.swap_out) == 1  # one contiguous run on both sides: one copy
    assert [c.request_id for c in plan.chunks] == ["high"]
    assert high.status is RequestStatus.RUNNING
    assert h.sched.stats()["num_swapped"] == 1
    # low returns once high is done, by a swap-in, resuming where it stopped
    while not h.plans[-1].swap_in:
        assert low.status is RequestStatus.SWAPPED
        h.step()
    plan = h.plans[-1]
    assert low.status is RequestStatus.RUNNING and not h.cpu_kv.holds("low")
    assert high.status is RequestStatus.FINISHED_LENGTH
    (chunk,) = [c for c in plan.chunks if c.request_id == "low"]
    assert chunk.start_pos == 16 and len(chunk.token_ids) == 1
    expanded = [(s + i, d + i) for s, d, n in plan.swap_in for i in range(n)]
    assert [d for _, d in expanded] == h.kv.block_ids("low")[:4]
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_outs == h.sched.num_swap_ins == 1
    assert h.sched.num_recomputed_tokens == 0 and h.sched.num_recompute_fallbacks == 0
    assert h.worker.blocks_swapped_out == h.worker.blocks_swapped_in == 4
    computed = sum(len(c.token_ids) for p in h.plans for c in p.chunks)
    assert computed == (14 + 12 - 1) + (20 + 4 - 1)  # nothing computed twice


def run_priority_flips(seed: int, mode: str, num_cpu_blocks: int | str | None,
                       max_num_seqs: int = 6) -> SwapHarness:
    """Random requests, arrivals and priority changes every third step on tight device memory; odd seeds use
    the one-block allocator, so swaps move many short runs. ``num_cpu_blocks="plenty"``: every victim fits."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    specs = [(f"r{i}", rng.randint(1, 24), rng.randint(1, 14), rng.randint(0, 3), rng.randint(0, 12))
             for i in range(rng.randint(6, 12))]
    max_len = max(p + m for _, p, m, _, _ in specs)
    num_blocks = blocks_for(max_len, block_size) + rng.randint(0, 3)  # tight: preemptions are certain
    if num_cpu_blocks == "plenty":
        num_cpu_blocks = 4 * num_blocks
    h = SwapHarness(num_blocks, block_size, num_cpu_blocks, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=rng.randint(4, 40), policy="priority", preemption_mode=mode,
                    cooldown=rng.choice([0, 1, 3]), allocator="block" if seed % 2 else "group")
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


@pytest.mark.parametrize("seed", range(16))
def test_random_priority_flips_with_swap_preemption(seed):
    h = run_priority_flips(seed, "swap", num_cpu_blocks="plenty")
    s = h.sched
    assert s.num_preemptions > 0
    assert s.num_recompute_fallbacks == 0 and s.num_recomputed_tokens == 0  # the host always had room
    assert s.num_swap_outs == s.num_preemptions == s.num_swap_ins
    assert h.worker.blocks_swapped_out == h.worker.blocks_swapped_in > 0


@pytest.mark.parametrize("seed", range(16))
def test_random_priority_flips_with_recompute_preemption(seed):
    h = run_priority_flips(seed, "recompute", num_cpu_blocks="plenty")
    s = h.sched
    assert s.num_preemptions > 0
    assert s.num_swap_outs == s.num_swap_ins == 0 and not any(p.swap_out or p.swap_in for p in h.plans)
    assert s.num_recompute_fallbacks == 0  # recompute by choice, not as a fallback
    assert h.cpu_kv.num_free_blocks == h.cpu_kv.num_blocks


def test_random_priority_flips_with_a_small_host_arena():
    # host memory often full: some victims swap, the rest fall back to recompute; both at once in some plans
    fallbacks = swaps = both = 0
    for seed in range(12):
        rng = random.Random(1000 + seed)
        h = run_priority_flips(1000 + seed, "swap", num_cpu_blocks=rng.randint(1, 8))
        s = h.sched
        assert s.num_swap_outs + s.num_recompute_fallbacks == s.num_preemptions
        assert s.num_swap_ins == s.num_swap_outs
        assert (s.num_recomputed_tokens > 0) == (s.num_recompute_fallbacks > 0)
        fallbacks += s.num_recompute_fallbacks
        swaps += s.num_swap_outs
        both += h.plans_with_both_swaps
    assert fallbacks > 0 and swaps > 0
    assert both > 0, "no plan both swapped in and swapped out: the host-block reuse hazard went untested"


@pytest.mark.parametrize("num_cpu_blocks", [None, 0, 2])
def test_swap_falls_back_to_recompute_when_the_host_cannot_take_the_victim(num_cpu_blocks):
    h = SwapHarness(num_blocks=6, block_size=4, num_cpu_blocks=num_cpu_blocks, policy="priority")
    low = h.add("low", prompt_len=16, max_tokens=6, priority=5)  # 4 blocks, 5 after its first decode
    h.step()
    h.step()
    assert low.num_computed_tokens == 17
    h.add("high", prompt_len=8, max_tokens=3, priority=0)  # 2 blocks: low must go, and needs 5 host blocks
    plan = h.step()
    assert not plan.swap_out
    assert low.status is RequestStatus.WAITING and low.num_computed_tokens == 0
    assert h.sched.num_recompute_fallbacks == 1 and h.sched.num_recomputed_tokens == 17
    assert h.sched.num_swap_outs == 0
    if h.cpu_kv is not None:
        assert h.cpu_kv.num_free_blocks == h.cpu_kv.num_blocks  # nothing half-allocated on the host
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
    assert sum(n for _, _, n in plan.swap_out) == 3
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
        assert [c.request_id for c in plan.chunks] == ["low"] and not plan.swap_out
    plan = h.step()
    assert plan.step_id == max(2, 1 + cooldown)
    assert low.status is RequestStatus.SWAPPED and plan.swap_out
    assert [c.request_id for c in plan.chunks] == ["high"]
    # swapped back in, it is protected again for `cooldown` steps
    while low.status is not RequestStatus.RUNNING:
        h.step()
    back_in = h.plans[-1].step_id
    assert low.scheduled_in_step == back_in
    h.add("high2", prompt_len=30, max_tokens=2, priority=0)
    while h.status_of("low") is RequestStatus.RUNNING and h.plans[-1].step_id < back_in + cooldown + 1:
        h.step()
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
    assert low.status is RequestStatus.SWAPPED and plan.swap_out
    assert [c.request_id for c in plan.chunks] == ["high"] and len(h.kv.block_ids("high")) == 2
    assert high.status is RequestStatus.RUNNING
    h.run()
    h.check_all_done()


def test_max_num_seqs_preempts_for_a_seat_even_with_free_memory():
    h = SwapHarness(num_blocks=64, block_size=4, num_cpu_blocks=64, max_num_seqs=1, policy="priority")
    low = h.add("low", prompt_len=5, max_tokens=8, priority=3)
    h.step()
    h.step()
    h.add("high", prompt_len=5, max_tokens=2, priority=1)
    plan = h.step()
    assert low.status is RequestStatus.SWAPPED and plan.swap_out
    assert [c.request_id for c in plan.chunks] == ["high"]
    assert [r.request_id for r in h.sched.running] == ["high"]
    h.run()
    h.check_all_done()
    assert h.sched.num_swap_ins == 1 and h.sched.num_recomputed_tokens == 0


@pytest.mark.parametrize("seed", range(4))
def test_max_num_seqs_bounds_resident_requests_under_priority_churn(seed):
    rng = random.Random(seed)
    h = SwapHarness(num_blocks=200, block_size=4, num_cpu_blocks=200, max_num_seqs=2, policy="priority")
    for i in range(8):
        h.add(f"r{i}", rng.randint(1, 12), rng.randint(2, 10), priority=rng.randint(0, 4))
    seen_full = False
    for step in range(2000):
        if not h.sched.has_unfinished():
            break
        if step % 2 == 0:
            h.sched.update_priority(rng.choice(sorted(h.sched.requests)), rng.randint(0, 4))
        plan = h.step()
        resident = [r for r in h.sched.requests.values() if r.status is RequestStatus.RUNNING]
        assert len(resident) <= 2 and len(plan.chunks) <= 2
        seen_full |= len(resident) == 2
    h.run()
    h.check_all_done()
    assert seen_full
    assert h.sched.num_preemptions > 0  # memory was never short: every preemption was for a seat


def run_vtc(steps: int, late_tenant_at: int | None = None, weights="a=3,b=1") -> tuple[SwapHarness, list[dict]]:
    """Backlogged tenants under vtc with two seats; returns the per-step served-token snapshots."""
    h = SwapHarness(num_blocks=256, block_size=4, num_cpu_blocks=256, max_num_seqs=2, policy="vtc",
                    cooldown=4, tenant_weights=weights, max_num_batched_tokens=64)
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


def test_vtc_two_backlogged_tenants_share_by_weight():
    h, snaps = run_vtc(600)
    a, b = (served_between(snaps, 99, 599, t) for t in "ab")
    print(f"\nvtc 3:1 served after warm-up: a={a:.0f} b={b:.0f} ratio={a / b:.2f}")
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
    assert low.status is RequestStatus.SWAPPED and len(h.cpu_kv.block_ids("low")) == 3
    free_device = h.kv.num_free_blocks
    h.sched.finish(low, RequestStatus.FINISHED_ABORTED)
    assert low.status is RequestStatus.FINISHED_ABORTED and "low" not in h.sched.requests
    assert not h.cpu_kv.holds("low") and h.cpu_kv.num_free_blocks == 6
    assert h.kv.num_free_blocks == free_device  # its device blocks were already released by the swap-out
    h.sched.check_invariants()
    plan = h.step()
    assert plan.finished_ids == ["low"] and "low" not in h.worker.specs
    assert not plan.swap_in
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
    assert x.status is RequestStatus.SWAPPED and h.cpu_kv.num_free_blocks == 0
    assert "w" in h.done
    h.sched.update_priority("x", 0)
    plan = h.step()
    assert x.status is RequestStatus.RUNNING and plan.swap_in
    assert z.status is RequestStatus.WAITING and not plan.swap_out
    assert h.sched.num_recompute_fallbacks == 1
    assert h.cpu_kv.num_free_blocks == 5  # released once the plan was built
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
    assert not plan.swap_out and h.sched.num_preemptions == 0 and w.status is RequestStatus.WAITING
    while w.status is RequestStatus.WAITING:  # once b's cooldown ends, a and b both make way at once
        plan = h.step()
    assert w.status is RequestStatus.RUNNING and h.sched.num_preemptions == 2
    h.run()
    h.check_all_done()
