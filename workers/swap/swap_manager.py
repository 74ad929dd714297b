"""Asynchronous, multi-threaded swap execution (FastSwitch, section 4.2).

Copy commands are queued per direction and executed by background threads (by default one for
device -> host and one for host -> device, so the two directions overlap each other and the forward pass).
On a GPU each thread copies on its own CUDA stream and records an event per command; a command is done when
its event has completed. On a CPU the threads copy directly (torch releases the GIL while copying), so the
same code, and every ordering rule built on it, runs and is tested without a GPU.

The manager decides nothing: the frontend guarantees that no block under an in-flight copy is written by
anyone else until the command is reported done.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from ipc.messages import SwapCommand, SwapDone
from workers.swap.copier import KVCopier


@dataclass
class _Job:
    command: SwapCommand
    event: threading.Event
    done: SwapDone | None = None


class SwapManager:
    def __init__(self, copier: KVCopier, num_threads: int = 2) -> None:
        self.copier = copier
        self.inject_delay_s = 0.0  # test hook: every command sleeps this long before copying
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._finished: list[int] = []  # done, not yet reported
        cuda = copier.device_arena.is_cuda
        self._queues = {"out": queue.Queue(), "in": queue.Queue()}
        self._threads = []
        for i in range(max(2, num_threads)):  # at least one thread per direction
            direction = "out" if i % 2 == 0 else "in"
            stream = torch.cuda.Stream(device=copier.device_arena.device) if cuda else None
            t = threading.Thread(target=self._run, args=(self._queues[direction], stream),
                                 name=f"fs-swap-{direction}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # ---- frontend-facing ---------------------------------------------------------------------------------
    def submit(self, command: SwapCommand) -> None:
        job = _Job(command, threading.Event())
        with self._lock:
            if command.swap_id in self._jobs:
                raise ValueError(f"swap {command.swap_id} submitted twice")
            self._jobs[command.swap_id] = job
        self._queues[command.kind].put(job)

    def wait(self, swap_ids: list[int], timeout_s: float | None = None) -> float:
        """Block until these commands are done; returns the seconds waited."""
        start = time.perf_counter()
        for swap_id in swap_ids:
            with self._lock:
                job = self._jobs.get(swap_id)
            if job is not None and not job.event.wait(timeout_s):
                raise TimeoutError(f"swap {swap_id} did not complete within {timeout_s} s")
        return time.perf_counter() - start

    def wait_any(self, timeout_s: float) -> float:
        """Block until at least one in-flight command is done (or the timeout); returns the seconds waited."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            with self._lock:
                if self._finished or not self._jobs:
                    break
                pending = next(iter(self._jobs.values()))
            pending.event.wait(0.005)
        return time.perf_counter() - start

    def poll(self) -> list[SwapDone]:
        """Commands completed since the last poll."""
        with self._lock:
            ids, self._finished = self._finished, []
            return [self._jobs.pop(i).done for i in ids]

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def shutdown(self) -> None:
        for q in self._queues.values():
            for _ in self._threads:
                q.put(None)

    # ---- copy threads ------------------------------------------------------------------------------------
    def _run(self, jobs: queue.Queue, stream: torch.cuda.Stream | None) -> None:
        while (job := jobs.get()) is not None:
            if self.inject_delay_s:
                time.sleep(self.inject_delay_s)
            start = time.perf_counter()
            command = job.command
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        stats = self._copy(command)
                        stream.synchronize()  # the command's copies have landed
                else:
                    stats = self._copy(command)
                job.done = SwapDone(command.swap_id, stats.calls, stats.bytes, time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - reported to the frontend; the thread serves the next command
                job.done = SwapDone(command.swap_id, 0, 0, time.perf_counter() - start,
                                    error=f"{type(e).__name__}: {e}")
            with self._lock:
                self._finished.append(command.swap_id)
            job.event.set()

    def _copy(self, command: SwapCommand):
        if command.kind == "out":
            return self.copier.swap_out(command.runs)
        return self.copier.swap_in(command.runs)
