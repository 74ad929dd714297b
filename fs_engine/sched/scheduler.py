"""Policy-ranked continuous batching with swap or recompute preemption.

Every step, all live requests (running, waiting, swapped) are ranked by the policy and the batch is built
from the top, within a token budget (``max_num_batched_tokens``: long prompts are prefilled in chunks) and
``max_num_seqs``:

- a **running** request (its KV on the device) computes its next token or prompt chunk; if it needs a block
  and none is free, the lowest-ranked resident request outside the batch is preempted, or, if there is
  none, the request itself;
- a **waiting** or **swapped** request is admitted (or swapped back in) when it fits; when memory or
  sequence slots are short, it preempts lower-ranked resident requests outside the batch, except those
  scheduled in less than ``preemption_cooldown_steps`` ago (anti-thrashing). If it still does not fit,
  lower-ranked non-resident requests wait behind it, so it is not starved.

Preemption either swaps the victim's KV to host blocks (``swap``; one copy per contiguous run at ``group``
granularity) or drops it to recompute later (``recompute``, and the fallback when host memory is full).
Swaps here are synchronous: the worker performs a plan's swap-outs, then its swap-ins, then the forward
pass, so device blocks freed by a swap-out may be reused in the same plan. Host blocks read by a swap-in
are released only after the plan is built, so no swap-out of the same plan can overwrite them.

The scheduler never touches tensors; the plan it returns is executed by the workers.
"""

from __future__ import annotations

from fs_engine.config import SchedulerConfig
from fs_engine.kv.block_groups import paired_runs
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for
from fs_engine.request import Request, RequestStatus
from fs_engine.sched.policies import Policy, make_policy
from ipc.messages import NewRequest, ScheduledChunk, StepPlan, StepResult

_RESIDENT = (RequestStatus.RUNNING,)  # statuses whose KV is on the device


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        cpu_kv: KVCacheManager | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.cpu_kv = cpu_kv
        self.policy = policy or make_policy(config.policy, config.tenant_weights)
        self.requests: dict[str, Request] = {}
        self._finished_for_worker: list[str] = []
        self._host_frees: list[str] = []  # host blocks read by this plan's swap-ins, released after it
        self._preempted_now: set[str] = set()
        self._step_id = 0
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_recomputed_tokens = 0
        self.num_recompute_fallbacks = 0  # swap preemptions that recomputed because host memory was full

    # ---- views -------------------------------------------------------------------------------------------
    def _ranked(self, status: RequestStatus | None = None) -> list[Request]:
        live = self.requests.values() if status is None else (r for r in self.requests.values() if r.status is status)
        return sorted(live, key=self.policy.rank)

    @property
    def running(self) -> list[Request]:
        return self._ranked(RequestStatus.RUNNING)

    @property
    def waiting(self) -> list[Request]:
        return self._ranked(RequestStatus.WAITING)

    @property
    def swapped(self) -> list[Request]:
        return self._ranked(RequestStatus.SWAPPED)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- request lifecycle -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.policy.on_arrival(request, self.requests.values())
        self.requests[request.request_id] = request

    def update_priority(self, request_id: str, priority: int) -> None:
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}: it never existed or has already finished")
        request.priority = priority

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Release a request for good: its device and host blocks return and the worker forgets it."""
        assert status.finished
        request.status = status
        self.kv.free(request.request_id)
        if self.cpu_kv is not None:
            self.cpu_kv.free(request.request_id)
        del self.requests[request.request_id]
        if request.sent_to_worker:
            self._finished_for_worker.append(request.request_id)

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_for_worker)
        self._finished_for_worker = []
        self._host_frees = []
        budget = self.config.max_num_batched_tokens
        ranked = self._ranked()
        in_batch: set[str] = set()
        blocked = False  # a higher-ranked non-resident request did not fit: the ones below it wait
        self._preempted_now: set[str] = set()
        for request in ranked:
            if budget <= 0 or len(in_batch) >= self.config.max_num_seqs:
                break
            if request.status is not RequestStatus.RUNNING:
                if request.request_id in self._preempted_now:
                    blocked = True  # a victim of this step neither bounces back nor lets lower ranks overtake it
                if blocked:
                    continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if request.status is RequestStatus.RUNNING:
                if not self._grow(plan, request, num_new, ranked, in_batch):
                    continue  # it preempted itself
            elif not self._admit(plan, request, num_new, ranked, in_batch):
                blocked = True
                continue
            self._add_chunk(plan, request, num_new)
            in_batch.add(request.request_id)
            budget -= num_new
        for request_id in self._host_frees:  # after the plan: its swap-outs must not land on these blocks
            self.cpu_kv.free(request_id)
        return plan

    def _grow(self, plan: StepPlan, request: Request, num_new: int, ranked: list[Request], in_batch: set[str]) -> bool:
        """Blocks for a resident request's next tokens, preempting lower-ranked residents outside the batch
        (cooldown ignored: memory must come from somewhere), else the request itself."""
        target = request.num_computed_tokens + num_new
        while not self.kv.allocate_slots(request.request_id, target):
            victim = self._lowest_resident(ranked, in_batch, exclude=request)
            if victim is None:
                self._preempt(plan, request)
                return False
            self._preempt(plan, victim)
        return True

    def _admit(self, plan: StepPlan, request: Request, num_new: int, ranked: list[Request], in_batch: set[str]) -> bool:
        """Bring a waiting or swapped request in, preempting lower-ranked residents that are past their cooldown."""
        victims = self._victims_for(request, num_new, ranked, in_batch)
        if victims is None:
            return False
        for victim in victims:
            self._preempt(plan, victim)
        if request.status is RequestStatus.SWAPPED:
            self._swap_in(plan, request, num_new)
        else:
            assert self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
        request.status = RequestStatus.RUNNING
        request.scheduled_in_step = self._step_id
        return True

    def _victims_for(
        self, request: Request, num_new: int, ranked: list[Request], in_batch: set[str]
    ) -> list[Request] | None:
        """The fewest lower-ranked residents (lowest first, past their cooldown) whose preemption makes room
        for ``request``: [] if it fits already, None if even all of them would not do (then nobody is
        preempted for nothing)."""
        need_blocks = blocks_for(request.num_computed_tokens + num_new, self.kv.block_size)
        free_blocks = self.kv.num_free_blocks
        seats = self.config.max_num_seqs - self._num_resident()
        rank = self.policy.rank(request)
        victims: list[Request] = []
        for victim in reversed(ranked):
            if free_blocks >= need_blocks and seats > 0:
                return victims
            if (victim is request or victim.status not in _RESIDENT or victim.request_id in in_batch
                    or self.policy.rank(victim) <= rank
                    or self._step_id - victim.scheduled_in_step < self.config.preemption_cooldown_steps):
                continue
            victims.append(victim)
            free_blocks += len(self.kv.block_ids(victim.request_id))
            seats += 1
        return victims if free_blocks >= need_blocks and seats > 0 else None

    def _num_resident(self) -> int:
        return sum(1 for r in self.requests.values() if r.status in _RESIDENT)

    def _lowest_resident(self, ranked: list[Request], in_batch: set[str], exclude: Request) -> Request | None:
        for victim in reversed(ranked):
            if victim is not exclude and victim.status in _RESIDENT and victim.request_id not in in_batch:
                return victim
        return None

    # ---- preemption and swaps ----------------------------------------------------------------------------
    def _preempt(self, plan: StepPlan, request: Request) -> None:
        self._preempted_now.add(request.request_id)
        self.num_preemptions += 1
        request.num_preemptions += 1
        if self.config.preemption_mode == "swap" and self._swap_out(plan, request):
            return
        if self.config.preemption_mode == "swap":
            self.num_recompute_fallbacks += 1
        self.kv.free(request.request_id)
        self.num_recomputed_tokens += request.num_computed_tokens
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING

    def _swap_out(self, plan: StepPlan, request: Request) -> bool:
        """Copy a victim's computed KV to host blocks; False if host memory cannot take it."""
        rid = request.request_id
        # blocks a request holds are all written: they were allocated for chunks whose results arrived
        num_blocks = blocks_for(request.num_computed_tokens, self.kv.block_size)
        gpu_blocks = self.kv.block_ids(rid)[:num_blocks]
        if self.cpu_kv is None or not self.cpu_kv.allocate_slots(rid, request.num_computed_tokens):
            return False
        plan.swap_out.extend(paired_runs(gpu_blocks, self.cpu_kv.block_ids(rid)))
        self.kv.free(rid)  # reusable within this plan: the worker runs swap-outs before anything else
        request.status = RequestStatus.SWAPPED
        self.num_swap_outs += 1
        return True

    def _swap_in(self, plan: StepPlan, request: Request, num_new: int) -> None:
        rid = request.request_id
        assert self.kv.allocate_slots(rid, request.num_computed_tokens + num_new)
        cpu_blocks = self.cpu_kv.block_ids(rid)
        plan.swap_in.extend(paired_runs(cpu_blocks, self.kv.block_ids(rid)[: len(cpu_blocks)]))
        self._host_frees.append(rid)
        self.num_swap_ins += 1

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

    # ---- results -----------------------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a step's result: advance computed tokens, append sampled ones, account service. Returns the
        requests that received a token (stop checks are the caller's: they need the detokenized text)."""
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None:
                continue
            end = chunk.start_pos + len(chunk.token_ids)
            # service counts prompt tokens the first time they are computed, never recomputation
            new_prompt = max(0, min(end, request.num_prompt_tokens) - request.num_prompt_tokens_served)
            request.num_prompt_tokens_served += new_prompt
            request.num_computed_tokens = end
            if new_prompt:
                self.policy.on_served(request, new_prompt, 0)
        progressed = []
        for request_id, token_id in zip(result.request_ids, result.token_ids):
            request = self.requests.get(request_id)
            if request is None:  # aborted while its step ran
                continue
            request.append_token(token_id)
            self.policy.on_served(request, 0, 1)
            progressed.append(request)
        return progressed

    def stats(self) -> dict[str, int | float]:
        counts = {s: 0 for s in (RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.SWAPPED)}
        for r in self.requests.values():
            counts[r.status] += 1
        return {
            "num_running": counts[RequestStatus.RUNNING],
            "num_waiting": counts[RequestStatus.WAITING],
            "num_swapped": counts[RequestStatus.SWAPPED],
            "num_preemptions": self.num_preemptions,
            "num_swap_outs": self.num_swap_outs,
            "num_swap_ins": self.num_swap_ins,
            "num_recomputed_tokens": self.num_recomputed_tokens,
            "num_recompute_fallbacks": self.num_recompute_fallbacks,
            **self.policy.stats(),
        }

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        if self.cpu_kv is not None:
            self.cpu_kv.check_invariants()
        self.policy.check_invariants()
        for r in self.requests.values():
            on_device = self.kv.holds(r.request_id)
            on_host = self.cpu_kv is not None and self.cpu_kv.holds(r.request_id)
            if r.status is RequestStatus.RUNNING:
                assert on_device and not on_host, f"{r} runs without device blocks or still holds host blocks"
                assert len(self.kv.block_ids(r.request_id)) >= blocks_for(r.num_computed_tokens, self.kv.block_size)
            elif r.status is RequestStatus.SWAPPED:
                assert on_host and not on_device, f"{r} is swapped but its KV is not (only) on the host"
            else:
                assert not on_device and not on_host and r.num_computed_tokens == 0, f"{r} waits holding KV"
        assert self._num_resident() <= self.config.max_num_seqs, "more resident requests than max_num_seqs"
