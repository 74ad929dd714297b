"""Replay a trace against an engine in real time, recording when every token arrives.

Each conversation sends its first turn at its arrival time; every later turn is sent ``think_s`` after the
previous reply finished, with the whole history (earlier prompts and the engine's own replies) plus the new
user message as its prompt, and the conversation id as ``session_id`` so the engine can reuse the
history's KV. Every reply is greedy and exactly ``reply_tokens`` long (``ignore_eos``), so two engines
replaying one trace do the same work. Priorities change at the trace's ticks for requests in flight.

Two targets, one behaviour:
- ``run_in_process(engine, trace)``: drives an ``LLMEngine`` directly (steps it in this thread).
- ``run_against_server(address, trace)``: one ``AsyncClient``, a task per conversation, against a running
  ``fs-engine launch``; tokens are timestamped when their event reaches the client.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fs_engine.bench.metrics import RequestRecord
from fs_engine.bench.workload import Conversation, Trace
from fs_engine.sampling_params import SamplingParams

# engine counters that accumulate over a run (the rest of ``stats()`` are gauges or settings)
COUNTERS = ("num_steps", "num_batched_tokens", "num_prompt_tokens", "num_generated_tokens", "num_finished_requests",
            "num_aborted_requests", "num_preemptions", "num_swap_outs", "num_swap_ins", "swap_out_bytes",
            "swap_in_bytes", "swap_copies", "swap_commands", "swap_s", "swap_wait_s", "execute_s",
            "reused_swap_out_bytes", "reused_swap_out_blocks", "reused_prefix_tokens", "reused_resident_tokens",
            "num_recomputed_tokens", "num_recompute_fallbacks", "cpu_store_hits", "cpu_store_evictions",
            "resident_evictions", "sim_forward_s", "sim_stall_s", "sim_idle_s", "sim_steps", "sim_copy_out_busy_s",
            "sim_copy_in_busy_s", "sim_time_s", "wall_frontend_s")


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    engine_stats: dict[str, Any]
    rejected: list[str] = field(default_factory=list)  # "request id: reason" for turns the engine refused
    replies: dict[str, list[int]] = field(default_factory=dict)  # request id -> generated token ids


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} requests "
                         f"{now - self._start:6.1f} s")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.enabled:
            sys.stderr.write("\n")


class _ConversationState:
    def __init__(self, conv: Conversation, index: int = 0) -> None:
        self.conv = conv
        self.index = index
        self.history: list[int] = []
        self.next_turn = 0
        self.ready_at = conv.arrival_s

    @property
    def done(self) -> bool:
        return self.next_turn >= len(self.conv.turns)

    def request_id(self) -> str:
        return f"{self.conv.conversation_id}-t{self.next_turn}"

    def prompt(self) -> list[int]:
        return self.history + self.conv.turns[self.next_turn].user_token_ids

    def finish_turn(self, prompt: list[int], reply: list[int], now: float) -> None:
        self.history = prompt + reply
        self.next_turn += 1
        if not self.done:
            self.ready_at = now + self.conv.turns[self.next_turn].think_s


def _record(state: _ConversationState, request_id: str, sent_s: float, prompt: list[int]) -> RequestRecord:
    conv = state.conv
    return RequestRecord(request_id=request_id, conversation_id=conv.conversation_id, tenant=conv.tenant,
                         turn=state.next_turn, sent_s=sent_s, token_times=[], num_prompt_tokens=len(prompt))


# ---- in-process ----------------------------------------------------------------------------------------
def run_in_process(engine: Any, trace: Trace, progress: bool | None = None, label: str = "replay",
                   max_duration_s: float | None = None) -> RunResult:
    """Replay ``trace`` on ``engine`` (an ``LLMEngine``) on the engine's clock: wall time, or the virtual time
    of a simulated device (then the run takes as long as its host work and gives the same figures every time).
    Returns every request's record."""
    states = [_ConversationState(c, i) for i, c in enumerate(trace.conversations)]
    ready = [(s.ready_at, s.index) for s in states]  # conversations waiting to send their next turn
    heapq.heapify(ready)
    live: dict[str, tuple[_ConversationState, RequestRecord, list[int], list[int]]] = {}  # id -> state, record, prompt, reply
    records: list[RequestRecord] = []
    rejected: list[str] = []
    replies: dict[str, list[int]] = {}
    bar = Progress(trace.num_requests, label, progress)
    before = dict(engine.stats())
    engine_clock = engine.clock
    start = engine_clock.now()
    clock = lambda: engine_clock.now() - start  # noqa: E731
    last_tick = 0
    while True:
        now = clock()
        while ready and ready[0][0] <= now:
            state = states[heapq.heappop(ready)[1]]
            _submit(engine, trace, state, now, live, rejected)
        last_tick = _apply_priorities(trace, now, last_tick, ((rid, v[0]) for rid, v in live.items()),
                                      engine.update_priority)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            t = clock()
            for out in outputs:
                state, record, prompt, reply = live[out.request_id]
                new = out.token_ids[len(reply):]
                reply.extend(new)
                record.token_times.extend([t] * len(new))
                if out.finished:
                    record.num_cached_tokens, record.finish_reason = out.num_cached_tokens, out.finish_reason
                    records.append(record)
                    replies[out.request_id] = reply
                    del live[out.request_id]
                    state.finish_turn(prompt, reply, t)
                    if not state.done:
                        heapq.heappush(ready, (state.ready_at, state.index))
                    bar.update(len(records))
        elif ready:
            wait = ready[0][0] - clock()
            # on wall time, wake up at least every 50 ms (priority ticks); virtual time jumps to the arrival
            engine_clock.sleep(wait if engine_clock.virtual else min(0.05, max(0.0, wait)))
        elif not live:
            break
        if max_duration_s is not None and clock() > max_duration_s:
            for request_id in list(live):
                engine.abort(request_id)
            break
    duration = clock()
    bar.close(len(records))
    return RunResult(records, duration, _counters_since(before, engine.stats()), rejected, replies)


def _counters_since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The run's own counts: counters minus their value at the start; gauges and settings as they are now."""
    return {k: (v - before.get(k, 0) if k in COUNTERS else v) for k, v in after.items()}


def _submit(engine: Any, trace: Trace, state: _ConversationState, now: float, live: dict, rejected: list) -> None:
    conv, turn = state.conv, state.conv.turns[state.next_turn]
    request_id, prompt = state.request_id(), state.prompt()
    params = SamplingParams(max_tokens=turn.reply_tokens, temperature=0, ignore_eos=True)
    try:
        engine.add_request(request_id, prompt, params, priority=trace.priority_at(conv, now), tenant=conv.tenant,
                           session_id=conv.conversation_id)
    except ValueError as e:  # e.g. the history outgrew the model's context: the conversation ends here
        rejected.append(f"{request_id}: {e}")
        state.next_turn = len(conv.turns)
        return
    live[request_id] = (state, _record(state, request_id, now, prompt), prompt, [])


def _apply_priorities(trace: Trace, now: float, last_tick: int, live: Iterable[tuple[str, _ConversationState]],
                      update: Callable[[str, int], Any]) -> int:
    """At a new priority tick, ``update`` every request in flight whose conversation's level changed."""
    if trace.priority_interval_s <= 0:
        return last_tick
    tick = int(now // trace.priority_interval_s)
    if tick == last_tick:
        return tick
    for request_id, state in live:
        old = trace.priority_at(state.conv, last_tick * trace.priority_interval_s)
        new = trace.priority_at(state.conv, now)
        if new != old:
            update(request_id, new)
    return tick


# ---- against a running server ----------------------------------------------------------------------------
def run_against_server(address: str, trace: Trace, progress: bool | None = None, label: str = "replay",
                       timeout_s: float = 120.0) -> RunResult:
    """Replay ``trace`` through the client SDK against ``fs-engine launch`` at ``address``."""
    return asyncio.run(_replay(address, trace, Progress(trace.num_requests, label, progress), timeout_s))


async def _replay(address: str, trace: Trace, bar: Progress, timeout_s: float) -> RunResult:
    from fs_engine.client import AsyncClient
    from ipc.errors import RemoteError

    records: list[RequestRecord] = []
    rejected: list[str] = []
    replies: dict[str, list[int]] = {}
    live: dict[str, _ConversationState] = {}
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731

    async with AsyncClient(address, timeout_s=timeout_s) as client:
        before = await client.stats()

        async def conversation(state: _ConversationState) -> None:
            await asyncio.sleep(max(0.0, state.ready_at - clock()))
            while not state.done:
                conv, turn = state.conv, state.conv.turns[state.next_turn]
                request_id, prompt, now = state.request_id(), state.prompt(), clock()
                record = _record(state, request_id, now, prompt)
                reply: list[int] = []
                live[request_id] = state
                try:
                    async for event in client.generate(prompt, max_tokens=turn.reply_tokens, temperature=0,
                                                       ignore_eos=True, priority=trace.priority_at(conv, now),
                                                       tenant=conv.tenant, session_id=conv.conversation_id,
                                                       request_id=request_id):
                        t = clock()
                        reply += event.token_ids
                        record.token_times += [t] * len(event.token_ids)
                        record.num_cached_tokens, record.finish_reason = event.num_cached_tokens, event.finish_reason
                except RemoteError as e:
                    rejected.append(f"{request_id}: {e}")
                    return
                finally:
                    live.pop(request_id, None)
                records.append(record)
                replies[request_id] = reply
                bar.update(len(records))
                state.finish_turn(prompt, reply, clock())
                if not state.done:
                    await asyncio.sleep(max(0.0, state.ready_at - clock()))

        async def priorities() -> None:
            last_tick = 0
            while True:
                await asyncio.sleep(min(0.05, trace.priority_interval_s or 0.05))
                updates: list[tuple[str, int]] = []
                last_tick = _apply_priorities(trace, clock(), last_tick, list(live.items()),
                                              lambda r, p: updates.append((r, p)))
                for request_id, priority in updates:
                    try:
                        await client.update_priority(request_id, priority)
                    except RemoteError:
                        pass  # it finished in the meantime

        ticker = asyncio.create_task(priorities())
        try:
            await asyncio.gather(*(conversation(_ConversationState(c)) for c in trace.conversations))
        finally:
            ticker.cancel()
        duration = clock()
        after = await client.stats()
    bar.close(len(records))
    return RunResult(sorted(records, key=lambda r: r.sent_s), duration, _counters_since(before, after), rejected,
                     replies)
