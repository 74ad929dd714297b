"""Continuous-batching scheduler: decides, every step, which requests compute which tokens.

A step has a token budget (``max_num_batched_tokens``): running requests go first (a decode costs one token,
an unfinished prompt takes what the budget leaves: chunked prefill), then waiting requests are admitted in
arrival order while the budget, ``max_num_seqs`` and KV memory allow. When a running request needs a block
and none is free, the most recently admitted running request is preempted by recompute: its blocks are
freed and it returns to the front of the waiting queue to recompute prompt and outputs later.

The scheduler never touches tensors; the plan it returns is executed by the workers.
"""

from __future__ import annotations

from collections import deque

from fs_engine.config import SchedulerConfig
from fs_engine.kv.kv_manager import KVCacheManager
from fs_engine.request import Request, RequestStatus
from ipc.messages import NewRequest, ScheduledChunk, StepPlan, StepResult


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_for_worker: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0

    # ---- request lifecycle -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Release a request for good: its blocks return to the pool and the worker forgets it."""
        assert status.finished
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        if request.sent_to_worker:
            self._finished_for_worker.append(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_for_worker)
        self._finished_for_worker = []
        budget = self.config.max_num_batched_tokens

        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._reserve_or_preempt(request, num_new):
                self._add_chunk(plan, request, num_new)
                budget -= num_new
                i += 1
            # else: ``request`` itself was preempted, and everything after it in running already was
        # admit waiting requests only when nobody was just preempted, or the victims would bounce straight back
        preempted = self.num_preemptions > preemptions_before
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_chunk(plan, request, num_new)
            budget -= num_new
        return plan

    def _reserve_or_preempt(self, request: Request, num_new: int) -> bool:
        """Give ``request`` blocks for ``num_new`` more tokens, preempting from the back of running."""
        while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        self.num_preemptions += 1
        self.num_recomputed_tokens += request.num_computed_tokens
        request.num_preemptions += 1
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _add_chunk(self, plan: StepPlan, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        if not request.sent_to_worker:
            plan.new_requests.append(NewRequest(request.request_id, request.params.to_spec()))
            request.sent_to_worker = True
        plan.chunks.append(
            ScheduledChunk(
                request_id=request.request_id,
                token_ids=request.token_ids[start : start + num_new],
                start_pos=start,
                block_ids=list(self.kv.block_ids(request.request_id)),
                sample=start + num_new == request.num_tokens,
                sample_index=request.num_output_tokens,
            )
        )

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a step's result: advance computed tokens, append sampled ones. Returns the requests that
        received a token (stop checks are the caller's: they need the detokenized text)."""
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None:
                request.num_computed_tokens += len(chunk.token_ids)
        progressed = []
        for request_id, token_id in zip(result.request_ids, result.token_ids):
            request = self.requests.get(request_id)
            if request is None:  # aborted while its step ran
                continue
            request.append_token(token_id)
            progressed.append(request)
        return progressed

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions,
            "num_recomputed_tokens": self.num_recomputed_tokens,
        }
