"""Where KV copy commands run, behind one interface, and the one order every engine runs them in.

``SwapExecutor`` is a place that moves KV blocks: ``ThreadSwaps`` runs the copy threads in this process (the
in-process engine), ``ProcessSwaps`` sends the commands to the swap process and reads its completions (the
engine ``fs-engine launch`` deploys). Both executors step a plan through ``start_plan`` and ``finish_plan``
(the frontend works on while the workers compute between the two), so every test of the in-process engine
exercises the copy orchestration the deployed engine runs:

1. submit the plan's swap-outs; wait for those marked ``wait`` (their device blocks may be reused below);
2. submit its swap-ins; wait for those marked ``wait`` (the forward reads what they bring back);
3. run the forward pass on the workers (a plan without swaps: the workers never copy KV themselves);
4. with nothing to compute and copies in flight, block until one lands instead of spinning;
5. report every command completed since the last step with the result.

Ordering against the device (safety rule 1): a worker returns a step's result only after the step's device
work has completed, so a copy, issued by the frontend after that result, can never overtake a kernel that
wrote or read its blocks, in this process or in the swap process. A copy thread reports a command done only
after its stream has finished it, so a forward that waits for a swap-in reads the copied KV.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from ipc.errors import EngineDeadError
from ipc.messages import ProcessFailed, StepPlan, StepResult, SwapBatch, SwapCommand, SwapDone

POLL_S = 0.5


class SwapExecutor(ABC):
    @abstractmethod
    def submit(self, commands: list[SwapCommand]) -> None:
        """Start these copies (in order within a direction)."""

    @abstractmethod
    def wait(self, swap_ids: set[int]) -> None:
        """Block until these commands are done (their completions are kept for ``poll``)."""

    @abstractmethod
    def wait_any(self, timeout_s: float) -> None:
        """Block until some in-flight command is done, or the timeout."""

    @abstractmethod
    def poll(self) -> list[SwapDone]:
        """Commands completed since the last poll."""

    @property
    @abstractmethod
    def num_in_flight(self) -> int: ...

    def shutdown(self) -> None:
        pass


@dataclass
class PlanInFlight:
    """A plan whose copies are issued and whose forward pass runs on the workers (``start_plan``)."""

    plan: StepPlan
    started: float
    wait_s: float
    sent: bool  # the workers have it (False: nothing to compute)
    result: StepResult | None = None  # what ``send`` returned: workers in this process run the step in it


def start_plan(plan: StepPlan, swaps: SwapExecutor | None,
               send: Callable[[StepPlan], StepResult | None]) -> PlanInFlight:
    """Steps 1-3: the plan's copies in order, then hand it (without swaps) to the workers. ``send`` returns
    the result when the workers run in this process, None when it comes back later (``finish_plan``)."""
    started = time.perf_counter()
    if plan.swaps and swaps is None:
        raise RuntimeError("the plan swaps KV but the engine has no host arena (num_cpu_blocks=0)")
    wait_s = 0.0
    for kind in ("out", "in"):  # waited swap-outs land before swap-ins may reuse their device blocks
        commands = [c for c in plan.swaps if c.kind == kind]
        if commands:
            swaps.submit(commands)
            t = time.perf_counter()
            swaps.wait({c.swap_id for c in commands if c.wait})
            wait_s += time.perf_counter() - t
    sent = bool(plan.request_ids or plan.new_requests or plan.finished_ids)
    result = send(plan.with_swaps([]) if plan.swaps else plan) if sent else None
    return PlanInFlight(plan, started, wait_s, sent, result)


def finish_plan(run: PlanInFlight, swaps: SwapExecutor | None,
                receive: Callable[[], StepResult] | None = None) -> StepResult:
    """Steps 4-5: the workers' result (or, with nothing to compute, a wait for a copy), with every copy
    completed since the last step."""
    plan, wait_s = run.plan, run.wait_s
    if run.sent:
        result = run.result if run.result is not None else receive()
    else:
        result = StepResult(step_id=plan.step_id)
        if swaps is not None and swaps.num_in_flight and not any(c.wait for c in plan.swaps):
            t = time.perf_counter()
            swaps.wait_any(1.0)  # nothing to compute: the engine waits for copies
            wait_s += time.perf_counter() - t
    if swaps is not None:
        result.swaps_done = swaps.poll()
    result.swap_wait_s = wait_s
    result.execute_s = time.perf_counter() - run.started
    return result


class ThreadSwaps(SwapExecutor):
    """Copy threads in this process, over the in-process worker's device arena and a host arena."""

    def __init__(self, device_arena, host_arena, granularity: str, threads: int) -> None:
        from workers.swap.copier import KVCopier
        from workers.swap.swap_manager import SwapManager

        self.manager = SwapManager(KVCopier(device_arena, host_arena, granularity), threads)

    def submit(self, commands: list[SwapCommand]) -> None:
        for command in commands:
            self.manager.submit(command)

    def wait(self, swap_ids: set[int]) -> None:
        self.manager.wait(sorted(swap_ids))

    def wait_any(self, timeout_s: float) -> None:
        self.manager.wait_any(timeout_s)

    def poll(self) -> list[SwapDone]:
        return self.manager.poll()

    @property
    def num_in_flight(self) -> int:
        return self.manager.num_in_flight

    def shutdown(self) -> None:
        self.manager.shutdown()


class ProcessSwaps(SwapExecutor):
    """The swap processes (one per machine of the engine's ranks), over ZeroMQ. Every command goes to each of
    them; it is done once each has reported it (a machine's report covers all of its ranks). ``check_alive``
    raises ``EngineDeadError`` if a child process is gone; every wait polls with a timeout and calls it, so a
    dead swap process is an error, never a hang."""

    def __init__(self, commands: list, done, check_alive: Callable[[], None], send: Callable) -> None:
        self._commands = commands  # a Pusher to each swap process
        self._done_channel = done  # Puller of their SwapDone messages
        self._check_alive = check_alive
        self._send = send  # send(channel, msg): a send that notices a dead peer
        self._done: list[SwapDone] = []
        self._parts: dict[int, list[SwapDone]] = {}  # swap id -> the reports so far (several machines)
        self._in_flight: set[int] = set()

    def submit(self, commands: list[SwapCommand]) -> None:
        self._in_flight.update(c.swap_id for c in commands)
        batch = SwapBatch(commands)
        for channel in self._commands:
            self._send(channel, batch)

    def _collect(self, timeout_s: float) -> None:
        msg = self._done_channel.recv(timeout_s=timeout_s)
        while msg is not None:
            if isinstance(msg, ProcessFailed):
                raise EngineDeadError(f"{msg.who} failed:\n{msg.message}")
            parts = self._parts.setdefault(msg.swap_id, [])
            parts.append(msg)
            if len(parts) == len(self._commands):
                del self._parts[msg.swap_id]
                self._done.append(parts[0] if len(parts) == 1 else SwapDone(
                    msg.swap_id, sum(d.copies for d in parts), sum(d.bytes for d in parts),
                    max(d.seconds for d in parts), next((d.error for d in parts if d.error), None)))
                self._in_flight.discard(msg.swap_id)
            msg = self._done_channel.recv(timeout_s=0)

    def wait(self, swap_ids: set[int]) -> None:
        while swap_ids & self._in_flight:
            self._collect(POLL_S)
            self._check_alive()

    def wait_any(self, timeout_s: float) -> None:
        self._collect(timeout_s)

    def poll(self) -> list[SwapDone]:
        self._collect(0)
        done, self._done = self._done, []
        return done

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)
