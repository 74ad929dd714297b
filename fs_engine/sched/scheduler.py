"""Policy-ranked continuous batching with swap or recompute preemption and asynchronous swaps.

Every step, all live requests are ranked by the policy and the batch is built from the top, within a token
budget (``max_num_batched_tokens``: long prompts are prefilled in chunks) and ``max_num_seqs``:

- a **running** request computes its next token or prompt chunk; if it needs a block and none is free, the
  lowest-ranked running request outside the batch is preempted, or, if there is none, the request itself;
- a **waiting** or **swapped** request is admitted (swapped back in, or with a stored prefix swapped in)
  when it fits; when memory or seats are short it preempts lower-ranked running requests outside the batch
  that are past their ``preemption_cooldown_steps`` (anti-thrashing), but only if that makes room. If it
  still does not fit, lower-ranked waiting and swapped requests wait behind it, so it is not starved.

Preemption swaps the victim's KV to host memory (copying only the dirty tail when the host already holds a
valid prefix of it) or drops it to recompute (``recompute``, and the fallback when host memory is full).

Swap modes (``SwapConfig.swap_mode``): ``sync`` waits for every swap inside the step that issues it;
``async`` lets steps go on while swaps run and learns of completions from later results; ``adaptive`` is
async except that a step waits for a swap-in when fewer than ``adaptive_min_batch`` requests could run.
The safety rules of the design, as enforced here:

1. Copies are ordered after the device work that last wrote or read their blocks: a worker returns a step's
   result only once its device work has completed (``ModelRunner.execute`` waits on its stream, also when
   the step sampled nothing), and a plan's copies are issued only once every earlier step's result is in.
   With async scheduling (``LLMEngine``) a plan may be made while the previous step runs; one that copies KV
   then waits for it, and runs alone (its result is applied before the next plan is made). A forward reads
   swapped-in KV only after the copy is done: waited in its step, or reported in a later result.
2. Device blocks of an in-flight swap-out stay owned until its completion arrives (``_soon_free_blocks``
   counts them for admission, nobody can allocate them).
3. A request with an in-flight swap-in is ``SWAPPING_IN`` and not scheduled; in sync mode the step waits.
4. Host blocks under an in-flight copy are pinned in the CPU store and never evicted or reused; host blocks
   read by a waited swap-in are released only after the plan is built.
5. Abort during a swap hands the request's blocks to the swap record; they are released at completion.
6. A request that regains its rank while swapping out is reclaimed: the swap-out completes (its host copy
   stays as a valid cache) and the request runs on from its still-owned device blocks.

The scheduler never touches tensors; the plan it returns is executed by the workers. Planning a chunk
advances the request's ``num_inflight_tokens`` (and ``num_pending_tokens`` if it samples); ``update``
moves them into ``num_computed_tokens`` and ``token_ids``. Without async scheduling both are 0 whenever a
plan is made.

Its per-step cost follows the batch, not the number of live requests: requests stay ranked in a
``RankedQueue`` updated on arrival, priority change, status change and finish (never re-sorted), the
running ones in a second queue for victim searches, status counts are kept as statuses change, a waiting
request's block hashes are computed once, and a step stops looking once nobody below could change it. A
plan sends each request's block table to the worker once and then only the blocks it gained.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fs_engine.config import SchedulerConfig, SwapConfig
from fs_engine.kv.block_groups import paired_runs
from fs_engine.kv.cpu_store import CpuKVStore
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for
from fs_engine.request import FINISHED, Request, RequestStatus
from fs_engine.sched.policies import Policy, make_policy
from fs_engine.sched.ranking import RankedQueue
from ipc.messages import PENDING_TOKEN, NewRequest, StepPlan, StepResult, SwapCommand, SwapDone

S = RequestStatus
_SEATED = (S.RUNNING, S.SWAPPING_IN)  # statuses that count against max_num_seqs


@dataclass
class _InFlight:
    kind: str  # "out" | "in" | "writeback"
    owner: str  # key of the device blocks and host copy (the request id, or a record key once it ended)
    request: Request | None  # None once the request finished or was aborted
    num_tokens: int  # tokens the copy covers
    waited: bool  # a sync command: its step waited for it
    token_ids: list[int] | None = None  # write-backs: the tokens whose KV becomes a stored prefix
    session_id: str | None = None


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        cpu_store: CpuKVStore | None = None,
        swap: SwapConfig | None = None,
        policy: Policy | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len  # a request ends at this many tokens (the engine's stop check)
        self.swap = swap or SwapConfig(swap_mode="sync")
        self.kv = kv
        self.cpu_store = cpu_store
        self.policy = policy or make_policy(config.policy, config.tenant_weights)
        self._accounts_service = type(self.policy).on_served is not Policy.on_served
        self.requests: dict[str, Request] = {}
        self._ranked = RankedQueue(self.policy)  # every live request
        self._running = RankedQueue(self.policy)  # the RUNNING ones (victims are searched from the bottom)
        self._counts = dict.fromkeys(S, 0)  # live requests per status
        self._inflight: dict[int, _InFlight] = {}
        self._pending: list[SwapCommand] = []  # write-backs issued between steps, sent with the next plan
        self._swap_ids = itertools.count(1)
        self._finished_for_worker: list[str] = []
        self._batches: dict[int, list[Request]] = {}  # step id -> its chunks' requests, until the result is applied
        self._batch: list[Request] = []  # the plan being built's
        self._release_after_plan: list[str] = []
        self._preempted_now: set[str] = set()
        self._step_id = 0
        self.faults: list[tuple[Request, Exception]] = []  # see take_faults
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_recomputed_tokens = 0
        self.num_recompute_fallbacks = 0  # swap preemptions that recomputed because host memory was full
        self.num_reused_swap_out_blocks = 0  # blocks a swap-out did not copy: the host copy was still valid
        self.num_reused_prefix_tokens = 0  # prompt tokens taken from earlier turns' KV instead of prefilled
        self.num_reused_resident_tokens = 0  # ... of which a finished turn left on the device (no copy at all)
        self.swap_copies = 0
        self.swap_commands = 0  # copy commands completed (swap-outs, swap-ins, write-backs)
        self.swap_s = 0.0  # their durations, as the worker measured them: the context-switch latency
        self.swap_out_bytes = 0
        self.swap_in_bytes = 0

    # ---- views -------------------------------------------------------------------------------------------
    @property
    def running(self) -> list[Request]:
        return list(self._running)

    @property
    def waiting(self) -> list[Request]:
        return [r for r in self._ranked if r.status is S.WAITING]

    @property
    def swapped(self) -> list[Request]:
        return [r for r in self._ranked if r.status is S.SWAPPED]

    @property
    def _num_seated(self) -> int:
        return self._counts[S.RUNNING] + self._counts[S.SWAPPING_IN]

    # ---- keeping the views current (the requests' observer) ----------------------------------------------
    def status_changed(self, request: Request, old: RequestStatus) -> None:
        new = request.status
        self._counts[old] -= 1
        if old is S.RUNNING:
            self._running.remove(request)
        if new.finished:
            self._ranked.remove(request)
            request.observer = None
            return
        self._counts[new] += 1
        if new is S.RUNNING:
            self._running.add(request)

    def priority_changed(self, request: Request) -> None:
        self._ranked.regroup(request)
        self._running.regroup(request)

    def has_unfinished(self) -> bool:
        """Requests live, or copies still to issue or to land (their blocks are not free yet)."""
        return bool(self.requests or self._inflight or self._pending)

    @property
    def _reuse(self) -> bool:
        return self.cpu_store is not None and self.cpu_store.enable_reuse

    # ---- request lifecycle -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        assert request.status is S.WAITING and request.observer is None, f"{request} was scheduled before"
        self.policy.on_arrival(request, self._ranked.group_heads())
        self.requests[request.request_id] = request
        self._counts[S.WAITING] += 1
        self._ranked.add(request)
        request.observer = self

    def update_priority(self, request_id: str, priority: int) -> None:
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}: it never existed or has already finished")
        request.priority = priority

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request. Its blocks are released now, or when a copy that reads them lands."""
        assert status.finished
        rid = request.request_id
        was = request.status
        request.status = status
        del self.requests[rid]
        if request.sent_to_worker:
            self._finished_for_worker.append(rid)
        swap_id = next((i for i, r in self._inflight.items() if r.request is request), None)
        if swap_id is not None:  # rule 5: the copy in flight still reads or writes these blocks
            self._hand_to_record(swap_id)
            return
        if status is S.FINISHED_STOPPED or status is S.FINISHED_LENGTH:
            if was is S.RUNNING and self._reuse and self._write_back(request):
                return
        self.kv.free(rid)
        if self.cpu_store is not None:
            self.cpu_store.discard(rid)

    def _hand_to_record(self, swap_id: int) -> None:
        """The request ended (or this is its write-back): its blocks now belong to the swap record."""
        record = self._inflight[swap_id]
        key = f"~swap{swap_id}"
        self.kv.rename(record.owner, key)
        if self.cpu_store is not None:
            self.cpu_store.rename(record.owner, key)
        record.owner, record.request = key, None

    def _write_back(self, request: Request) -> bool:
        """Copy a finished request's full blocks to host memory so the next turn can reuse them."""
        num_tokens = request.num_computed_tokens // self.kv.block_size * self.kv.block_size
        if num_tokens == 0:
            return False
        prepared = self.cpu_store.prepare_swap_out(request.request_id, num_tokens)
        if prepared is None:
            return False
        writes, reused = prepared
        self.num_reused_swap_out_blocks += reused
        record = _InFlight("writeback", request.request_id, None, num_tokens, self.swap.swap_mode == "sync",
                           token_ids=request.token_ids[:num_tokens], session_id=request.session_id)
        swap_id = next(self._swap_ids)
        self._inflight[swap_id] = record
        self._hand_to_record(swap_id)
        # the device keeps the blocks too: a next turn that comes soon adopts them without any copy
        self.kv.keep_resident(record.owner, record.token_ids, record.session_id)
        gpu = self.kv.block_ids(record.owner)
        runs = paired_runs([gpu[i] for i, _ in writes], [h for _, h in writes])
        if not runs:  # the host copy was complete already: nothing to move
            self._complete(SwapDone(swap_id, 0, 0, 0.0))
        else:
            self._pending.append(SwapCommand(swap_id, "out", runs, wait=record.waited))
        return True

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_for_worker, swaps=self._pending)
        self._finished_for_worker, self._pending = [], []
        self._release_after_plan, self._preempted_now = [], set()
        batch = self._batches[plan.step_id] = self._batch = []
        budget = self.config.max_num_batched_tokens
        max_seqs = self.config.max_num_seqs
        block_size = self.kv.block_size
        in_batch: set[str] = set()
        preempted_now = self._preempted_now
        blocked = False  # a higher-ranked waiting or swapped request did not fit: lower ones wait behind it
        memory_waiter = False  # a higher-ranked request waits for device blocks in flight to be freed
        # requests below the current one that hold device blocks (running or swapping out when the step
        # began): once blocked and past the last of them, nothing further down can change this step
        active_below = self._counts[S.RUNNING] + self._counts[S.SWAPPING_OUT]
        tables = self.kv.tables  # read only
        # the plan's columns, bound once: a steady decode appends to them inline (below)
        ids, starts, counts, tokens_col = plan.request_ids, plan.start_pos, plan.num_scheduled, plan.token_ids
        samples, table_starts, new_blocks = plan.sample_index, plan.table_start, plan.num_new_blocks
        request = None
        try:
            for request in self._ranked:
                if budget <= 0 or len(in_batch) >= max_seqs or (blocked and active_below <= 0):
                    break
                status = request._status
                rid = request.request_id
                if status is S.RUNNING:  # the common case, kept lean: a decode step or the next prompt chunk
                    active_below -= 1
                    computed = request.num_computed_tokens + request.num_inflight_tokens
                    tokens = request.token_ids
                    pending = request.num_pending_tokens  # its token from the step in flight (async scheduling)
                    num_tokens = len(tokens) + pending
                    if pending and self._last_token_pending(request, num_tokens):
                        continue  # that token ends it: computing one more would be thrown away
                    table = tables[rid]
                    num_blocks = len(table)
                    if (num_tokens == computed + 1 and computed < num_blocks * block_size
                            and request.worker_table is table and request.worker_table_len == num_blocks):
                        # a steady decode (its block has room, the worker holds this table whole): ``_add_chunk``
                        # inlined, which halves the scheduler's time per running request
                        ids.append(rid)
                        starts.append(computed)
                        counts.append(1)
                        tokens_col.append(PENDING_TOKEN if pending else tokens[computed])
                        samples.append(num_tokens - request.num_prompt_tokens)
                        table_starts.append(num_blocks)
                        new_blocks.append(0)
                        request.num_inflight_tokens += 1
                        request.num_pending_tokens = pending + 1
                        batch.append(request)
                        in_batch.add(rid)
                        budget -= 1
                        continue
                    num_new = min(num_tokens - computed, budget)
                    if computed + num_new > num_blocks * block_size:
                        grown = self._grow(plan, request, num_new, in_batch)
                        memory_waiter = memory_waiter or grown == "wait"
                        if grown != "ok":
                            continue
                        table = tables[rid]
                    self._add_chunk(plan, request, num_new, table)
                    in_batch.add(rid)
                    budget -= num_new
                    continue
                if status is S.SWAPPING_OUT or rid in preempted_now:
                    active_below -= 1
                if status is S.SWAPPING_OUT:
                    # rule 6: ranked above everyone waiting for memory, it keeps its device blocks when the copy
                    # lands; below a waiter, those blocks are promised to the waiter
                    request.reclaim = not memory_waiter
                    continue
                if status is S.SWAPPING_IN:
                    continue  # rule 3
                blocked = blocked or rid in preempted_now  # victims do not bounce back
                if blocked:
                    continue
                admitted = self._admit(plan, request, budget, in_batch)
                if admitted is None:
                    blocked = memory_waiter = True
                    continue
                if not admitted:  # swapping in asynchronously: it runs once the copy lands
                    continue
                assert not (request.num_pending_tokens or request.num_inflight_tokens), f"{rid}: admitted mid-step"
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                self._add_chunk(plan, request, num_new, self.kv.block_ids(rid))
                in_batch.add(rid)
                budget -= num_new
        except Exception as e:  # noqa: BLE001 - one request's fault fails that request, not the step
            self._fault(plan, request, e)
        for owner in self._release_after_plan:  # rule 4: no swap-out of this plan may land on these blocks
            self.cpu_store.release(owner)
        return plan

    def _fault(self, plan: StepPlan, request: Request | None, error: Exception) -> None:
        """Scheduling ``request`` raised: the plan keeps the chunks completed before it (each chunk's request
        joins the batch last, so the batch says how many), and the engine fails the request (``take_faults``)."""
        if request is None:
            raise error
        n = len(self._batch)
        for name in ("request_ids", "start_pos", "num_scheduled", "sample_index", "table_start", "num_new_blocks"):
            del getattr(plan, name)[n:]
        del plan.token_ids[sum(plan.num_scheduled):]
        del plan.new_block_ids[sum(plan.num_new_blocks):]
        self.faults.append((request, error))

    def take_faults(self) -> list[tuple[Request, Exception]]:
        """Requests whose scheduling or result raised since the last call, with the error: the engine fails
        them (``RequestStatus.FINISHED_ERROR``) and serves on."""
        faults, self.faults = self.faults, []
        return faults

    def _last_token_pending(self, request: Request, num_tokens: int) -> bool:
        """The token a step in flight samples for ``request`` is its last by length (``max_tokens`` or
        ``max_model_len``): it finishes when that token lands, so it is not scheduled again."""
        return (num_tokens - request.num_prompt_tokens >= request.params.max_tokens
                or (self.max_model_len is not None and num_tokens >= self.max_model_len))

    def _finishing(self, request: Request) -> bool:
        """A step in flight samples the request's last token: it frees its blocks when that lands, and
        preempting it would only throw computed KV away."""
        pending = request.num_pending_tokens
        return bool(pending) and self._last_token_pending(request, len(request.token_ids) + pending)

    def _grow(self, plan: StepPlan, request: Request, num_new: int, in_batch: set[str]) -> str:
        """Blocks for a running request's next tokens. Preempts lower-ranked running requests outside the batch
        (cooldown ignored: the memory must come from somewhere), else the request itself. Returns "ok", "wait"
        (blocks that in-flight swap-outs will free are enough: it skips this step) or "preempted"."""
        target = request.num_computed_tokens + request.num_inflight_tokens + num_new
        while not self.kv.allocate_slots(request.request_id, target):
            if self._soon_free_blocks() >= self.kv.num_blocks_needed(request.request_id, target):
                return "wait"
            victim = next((v for v in self._running.reversed() if v is not request and v.request_id not in in_batch
                           and not self._finishing(v)), None)
            self._preempt(plan, victim or request)
            if victim is None:
                return "preempted"
        return "ok"

    def _admit(self, plan: StepPlan, request: Request, budget: int, in_batch: set[str]):
        """Bring in a waiting or swapped request. True: it runs this step; False: it is swapping in
        asynchronously; None: it does not fit (yet)."""
        rid = request.request_id
        matched = self._pin_reusable_kv(request) if request.status is S.WAITING and self._reuse else 0
        resident, resident_tokens, settled = (
            self.kv.match_resident(request.token_ids, request.session_id, request.block_hashes(self.kv.block_size))
            if request.status is S.WAITING and self._reuse else (None, 0, False))
        if resident_tokens and resident_tokens >= matched and not settled:
            # the device holds its history, but a write-back still reads those blocks: adopt them once it lands
            # (a step or so) rather than prefill or swap in what is already there
            if matched:
                self.cpu_store.release(rid, keep=True)
            return False
        if resident_tokens < matched:
            resident = None
        computed = request.num_computed_tokens if request.status is S.SWAPPED else max(matched, resident_tokens)
        num_new = min(request.num_tokens - computed, budget)
        need = blocks_for(computed + num_new, self.kv.block_size)
        victims = self._victims_for(request, need, in_batch)
        if victims is not None:
            for victim in victims:  # the KV to swap in is pinned: no victim's swap-out can evict it
                self._preempt(plan, victim)
        if victims is None or self.kv.num_free_blocks < need:  # (victims' blocks free up when their copies land)
            if matched:
                self.cpu_store.release(rid, keep=True)
            return None
        if resident is not None:
            self.kv.adopt(resident, rid, computed)
        if not self.kv.allocate_slots(rid, computed + num_new):  # checked above: need <= free blocks
            raise RuntimeError(f"{rid}: {need} blocks were free but the allocation failed")
        request.scheduled_in_step = self._step_id
        if not computed:
            request.status = S.RUNNING
            return True
        if request.status is S.WAITING:
            request.num_computed_tokens = computed
            # tokens a recompute preemption dropped but memory still had are not recomputed after all
            self.num_recomputed_tokens -= min(computed, request.num_dropped_tokens)
            request.num_dropped_tokens = 0
            request.num_cached_tokens = max(request.num_cached_tokens, min(computed, request.num_prompt_tokens))
            self.num_reused_prefix_tokens += computed
        if resident is not None:  # on the device already: it computes this step, no copy
            self.num_reused_resident_tokens += computed
            if matched:  # the host prefix stays its CPU copy, so a later swap-out copies only the dirty tail
                self.cpu_store.release(rid, keep=True)
            request.status = S.RUNNING
            return True
        return self._swap_in(plan, request, self.cpu_store.prepare_swap_in(rid, computed))

    def _pin_reusable_kv(self, request: Request) -> int:
        """Pin host KV a waiting request can start from: its own CPU copy (kept after an earlier swap-in, still
        valid after a recompute preemption) or a stored prefix of its tokens, whichever covers more. Returns
        the tokens covered (0: nothing pinned). Whole blocks only, and at least one token left to compute."""
        rid = request.request_id
        own = self.cpu_store.copy_of(rid)
        limit = (request.num_tokens - 1) // self.kv.block_size * self.kv.block_size
        own_tokens = min(own.valid_tokens, limit) // self.kv.block_size * self.kv.block_size if own else 0
        prefix_blocks, prefix_tokens = self.cpu_store.lookup(request.token_ids, request.session_id,
                                                             request.block_hashes(self.kv.block_size))
        if prefix_tokens > own_tokens:
            self.cpu_store.discard(rid)  # a stale copy shorter than what the store offers
            self.cpu_store.attach_prefix(rid, prefix_blocks, prefix_tokens)
            return prefix_tokens
        if own_tokens:
            self.cpu_store.pin(rid)
        return own_tokens

    def _swap_in(self, plan: StepPlan, request: Request, host_blocks: list[int]) -> bool:
        mode = self.swap.swap_mode
        wait = mode == "sync" or (mode == "adaptive" and self._counts[S.RUNNING] < self.swap.adaptive_min_batch)
        gpu_blocks = self.kv.block_ids(request.request_id)[: len(host_blocks)]
        swap_id = next(self._swap_ids)
        self._inflight[swap_id] = _InFlight("in", request.request_id, request, request.num_computed_tokens, wait)
        plan.swaps.append(SwapCommand(swap_id, "in", paired_runs(host_blocks, gpu_blocks), wait=wait))
        self.num_swap_ins += 1
        if wait:  # the step waits for the copy: the request computes in this very step
            request.status = S.RUNNING
            self._release_after_plan.append(request.request_id)
        else:
            request.status = S.SWAPPING_IN
        return wait

    def _victims_for(self, request: Request, need_blocks: int, in_batch: set[str]) -> list[Request] | None:
        """The fewest lower-ranked running requests (lowest first, past their cooldown) whose preemption makes
        room for ``request``: [] if it fits already (or will once in-flight swap-outs land), None if even all
        of them would not do, so that nobody is preempted for nothing."""
        free_blocks = self.kv.num_free_blocks + self._soon_free_blocks()
        seats = self.config.max_num_seqs - self._num_seated
        if free_blocks >= need_blocks and seats > 0:
            return []
        rank = self.policy.rank(request)
        victims: list[Request] = []
        for victim in self._running.reversed():  # lowest-ranked first
            if free_blocks >= need_blocks and seats > 0:
                return victims
            if self.policy.rank(victim) <= rank:
                break  # everyone further up ranks above the request too
            if (victim.request_id in in_batch or self._finishing(victim)
                    or self._step_id - victim.scheduled_in_step < self.config.preemption_cooldown_steps):
                continue
            victims.append(victim)
            free_blocks += len(self.kv.block_ids(victim.request_id))
            seats += 1
        return victims if free_blocks >= need_blocks and seats > 0 else None

    def _soon_free_blocks(self) -> int:
        """Device blocks that in-flight swap-outs and write-backs will release when they land."""
        return sum(len(self.kv.block_ids(r.owner)) for r in self._inflight.values()
                   if r.kind != "in" and not (r.request is not None and r.request.reclaim))

    # ---- preemption --------------------------------------------------------------------------------------
    def _preempt(self, plan: StepPlan, request: Request) -> None:
        self._preempted_now.add(request.request_id)
        self.num_preemptions += 1
        request.num_preemptions += 1
        if self.config.preemption_mode == "swap" and self._swap_out(plan, request):
            return
        if self.config.preemption_mode == "swap":
            self.num_recompute_fallbacks += 1
        self.kv.free(request.request_id)
        dropped = request.num_computed_tokens + request.num_inflight_tokens
        self.num_recomputed_tokens += dropped
        request.num_dropped_tokens = dropped
        request.num_computed_tokens = request.num_inflight_tokens = 0  # (a step in flight computes in vain)
        request.status = S.WAITING

    def _swap_out(self, plan: StepPlan, request: Request) -> bool:
        """Copy a victim's KV to host memory (only what the host does not hold yet); False if it cannot take it."""
        rid = request.request_id
        if self.cpu_store is None:
            return False
        num_tokens = request.num_computed_tokens + request.num_inflight_tokens  # copied once steps in flight land
        prepared = self.cpu_store.prepare_swap_out(rid, num_tokens)
        if prepared is None:
            return False
        writes, reused = prepared
        self.num_reused_swap_out_blocks += reused
        self.num_swap_outs += 1
        gpu = self.kv.block_ids(rid)
        runs = paired_runs([gpu[i] for i, _ in writes], [h for _, h in writes])
        sync = self.swap.swap_mode == "sync" or not runs
        swap_id = next(self._swap_ids)
        self._inflight[swap_id] = _InFlight("out", rid, request, num_tokens, sync)
        request.reclaim = False
        if not runs:  # the host copy is complete: nothing to move, the device blocks are free at once
            self._complete(SwapDone(swap_id, 0, 0, 0.0))
        else:
            plan.swaps.append(SwapCommand(swap_id, "out", runs, wait=sync))
            request.status = S.SWAPPING_OUT
        if sync:  # the worker lands the copy before anything else in this plan: the blocks are reusable now
            self.kv.free(rid)
            request.status = S.SWAPPED
        return True

    # ---- results -----------------------------------------------------------------------------------------
    def _complete(self, done: SwapDone) -> None:
        if done.error is not None:
            raise RuntimeError(f"KV swap {done.swap_id} failed on the worker, its KV is lost: {done.error}")
        record = self._inflight.pop(done.swap_id)
        self.swap_copies += done.copies
        if done.copies:
            self.swap_commands += 1
            self.swap_s += done.seconds
        if record.kind == "in":
            self.swap_in_bytes += done.bytes
        else:
            self.swap_out_bytes += done.bytes
            self.cpu_store.complete_swap_out(record.owner, record.num_tokens)
        request = record.request
        if request is None:  # the request ended while the copy ran (rule 5), or this is a write-back
            if record.kind == "writeback":
                self.cpu_store.release(record.owner, keep=True)
                self.cpu_store.commit_prefix(record.owner, record.token_ids, record.session_id)
                self.kv.settle(record.owner)  # its resident device blocks are an evictable cache from now on
            else:
                self.cpu_store.discard(record.owner)
                self.kv.free(record.owner)
            return
        if record.kind == "in":
            if not record.waited:  # a waited swap-in was released when its plan was built
                request.status = S.RUNNING
                request.scheduled_in_step = self._step_id
                self.cpu_store.release(request.request_id)
        elif request.status is S.SWAPPING_OUT:
            if request.reclaim and self._num_seated < self.config.max_num_seqs:  # rule 6: run on from the device copy
                request.status = S.RUNNING
                request.scheduled_in_step = self._step_id
                self.cpu_store.release(request.request_id)
            else:
                self.kv.free(request.request_id)
                request.status = S.SWAPPED

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a step's result: land completed swaps, append sampled tokens, account service. Returns the
        requests that received a token (stop checks are the caller's). Results are applied in step order; with
        async scheduling the next plan is already out. A request that finished or was aborted while its step
        ran gets nothing (its id may name a new request by now); one preempted by recompute since keeps 0
        computed tokens but gets its sampled token."""
        batch = self._batches.pop(plan.step_id, None)
        if batch is None:
            raise ValueError(f"step {plan.step_id} was not planned by this scheduler, or its result was applied")
        tokens = result.token_ids  # one per sampling chunk, in batch order
        if result.request_ids != plan.sampled_ids or len(tokens) != len(result.request_ids):
            raise RuntimeError(f"step {plan.step_id}: the result samples {result.request_ids} "
                               f"({len(tokens)} tokens), the plan {plan.sampled_ids}")
        for done in result.swaps_done:
            self._complete(done)
        accounts = self._accounts_service
        logprob_ids, logprob_values = result.logprob_ids, result.logprob_values
        k = 0
        progressed = []
        for request, start, n, sample in zip(batch, plan.start_pos, plan.num_scheduled, plan.sample_index):
            if sample >= 0:
                token = tokens[k]
                logprobs = dict(zip(logprob_ids[k], logprob_values[k])) if logprob_ids else None
                k += 1
                request.num_pending_tokens -= 1
            if request._status in FINISHED:  # aborted or stopped while its step ran: the token is dropped
                continue
            try:  # (free when nothing raises)
                if request.num_inflight_tokens >= n:  # (else a recompute preemption dropped this chunk's KV)
                    request.num_inflight_tokens -= n
                    request.num_computed_tokens = start + n
                if request.num_prompt_tokens_served < request.num_prompt_tokens:
                    # service counts prompt tokens the first time they are computed, never recomputation
                    new_prompt = max(0, min(start + n, request.num_prompt_tokens) - request.num_prompt_tokens_served)
                    request.num_prompt_tokens_served += new_prompt
                    if new_prompt and accounts:
                        self.policy.on_served(request, new_prompt, 0)
                if sample >= 0:
                    request.token_ids.append(token)
                    if request.logprobs is not None:
                        request.logprobs.append(logprobs)
                    if accounts:
                        self.policy.on_served(request, 0, 1)
                    progressed.append(request)
            except Exception as e:  # noqa: BLE001 - one request's fault fails that request, not the step
                self.faults.append((request, e))
        return progressed

    def _add_chunk(self, plan: StepPlan, request: Request, num_new: int, table: list[int]) -> None:
        """Append the request's chunk to the plan's columns (``StepPlan.append``, inlined: this runs once per
        request per step). ``table``: the request's block table (``kv.block_ids``), covering the chunk."""
        rid = request.request_id
        if not request.sent_to_worker:
            spec = request.params.to_spec()
            prompt = request.prompt_token_ids if spec.repetition_penalty != 1 else []
            plan.new_requests.append(NewRequest(rid, spec, prompt))
            request.sent_to_worker = True
        # the worker holds the table it was last sent: send only the blocks added since, or the whole table
        # when the KV manager holds a new one (the request was preempted, swapped in or adopted blocks); the
        # manager only ever appends to a table it keeps, so the list object identifies the table
        kept = request.worker_table_len if request.worker_table is table else 0
        num_blocks = len(table)
        request.worker_table, request.worker_table_len = table, num_blocks
        start = request.num_computed_tokens + request.num_inflight_tokens
        end = start + num_new
        tokens = request.token_ids
        plan.request_ids.append(rid)
        plan.start_pos.append(start)
        plan.num_scheduled.append(num_new)
        if num_new == 1:  # (the token a step in flight samples is only ever a chunk of its own)
            plan.token_ids.append(tokens[start] if start < len(tokens) else PENDING_TOKEN)
        else:
            plan.token_ids += tokens[start:end]
        samples = end == len(tokens) + request.num_pending_tokens
        plan.sample_index.append(end - request.num_prompt_tokens if samples else -1)
        plan.table_start.append(kept)
        plan.num_new_blocks.append(num_blocks - kept)
        if kept < num_blocks:
            plan.new_block_ids += table[kept:]
        request.num_inflight_tokens += num_new
        request.num_pending_tokens += samples
        self._batch.append(request)

    # ---- introspection -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        counts = self._counts
        store = self.cpu_store
        return {
            "num_running": counts[S.RUNNING],
            "num_waiting": counts[S.WAITING],
            "num_swapped": counts[S.SWAPPED] + counts[S.SWAPPING_OUT] + counts[S.SWAPPING_IN],
            "num_swaps_in_flight": len(self._inflight),
            "num_preemptions": self.num_preemptions,
            "num_swap_outs": self.num_swap_outs,
            "num_swap_ins": self.num_swap_ins,
            "num_recomputed_tokens": self.num_recomputed_tokens,
            "num_recompute_fallbacks": self.num_recompute_fallbacks,
            "swap_copies": self.swap_copies,
            "swap_commands": self.swap_commands,
            "swap_s": round(self.swap_s, 6),
            "swap_out_bytes": self.swap_out_bytes,
            "swap_in_bytes": self.swap_in_bytes,
            "reused_swap_out_blocks": self.num_reused_swap_out_blocks,
            "reused_prefix_tokens": self.num_reused_prefix_tokens,
            "reused_resident_tokens": self.num_reused_resident_tokens,
            "resident_blocks": self.kv.num_evictable_blocks,
            "resident_evictions": self.kv.num_resident_evictions,
            "cpu_store_hits": store.num_hits if store else 0,
            "cpu_store_evictions": store.num_evictions if store else 0,
            **self.policy.stats(),
        }

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        if self.cpu_store is not None:
            self.cpu_store.check_invariants()
        self.policy.check_invariants()
        in_flight = {r.request.request_id: r for r in self._inflight.values() if r.request is not None}
        for r in self.requests.values():
            rid = r.request_id
            on_device = self.kv.holds(rid)
            computed = r.num_computed_tokens + r.num_inflight_tokens
            assert min(r.num_pending_tokens, r.num_inflight_tokens) >= 0, r
            assert computed <= r.num_tokens + r.num_pending_tokens, r
            copy = self.cpu_store.copy_of(rid) if self.cpu_store is not None else None
            if r.status is S.RUNNING:
                assert on_device and len(self.kv.block_ids(rid)) >= blocks_for(computed, self.kv.block_size)
            elif r.status in (S.SWAPPING_OUT, S.SWAPPING_IN):
                assert on_device and copy is not None and copy.pins > 0 and rid in in_flight, f"{r}: copy not pinned"
            elif r.status is S.SWAPPED:
                assert not on_device and copy is not None and copy.pins > 0, f"{r}: its only copy is not pinned"
                if rid not in in_flight:  # (a sync swap-out's copy is valid once its step has run)
                    assert copy.valid_tokens >= computed, f"{r}: host copy is incomplete"
            else:
                assert not on_device and computed == 0, f"{r} waits holding device blocks"
        seated = sum(1 for r in self.requests.values() if r.status in _SEATED)
        assert seated <= self.config.max_num_seqs, "more seated requests than max_num_seqs"
        counts = dict.fromkeys(S, 0)
        for r in self.requests.values():
            counts[r.status] += 1
        assert counts == self._counts, f"status counts {self._counts} != {counts}"
        live = list(self.requests.values())
        self._ranked.check_invariants(live)
        self._running.check_invariants([r for r in live if r.status is S.RUNNING])
