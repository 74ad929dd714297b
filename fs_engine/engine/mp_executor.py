"""The multi-process executor: plans go to worker processes, swap commands to the swap process, over ZeroMQ.

    frontend (this process)          plans-<rank> (PUSH) ──> worker rank r ──> results (PULL)
        LLMEngine + scheduler        swap-commands (PUSH) ──> swap process ──> swap-done (PULL)

With ``tensor_parallel_size`` N there are N worker processes, one per rank, joined by torch.distributed
(gloo on CPU, NCCL on GPU; rendezvous at ``master_addr:master_port``). Each plan is encoded once and the same
frame goes to every rank; every rank computes and samples identically, and rank 0 returns the result. The
swap process maps every rank's arena shard and reports a copy done once every rank's share has landed.

Same interface as ``InProcessExecutor``, and the same copy orchestration (``swaps.start_plan`` / ``finish_plan``): the
plan's copies go to the swap process (``ProcessSwaps``), the plan without them to every rank, and rank 0's
result comes back with every copy completed since the last step. With async scheduling
(``SchedulerConfig.async_scheduling``) two steps may be in flight: the next plan waits in the worker's socket
while the current one computes, and results are collected in order.

Every wait polls with a timeout and checks that each child is alive: a dead worker or swap process (or one
that reports ``ProcessFailed``) raises ``EngineDeadError`` within about a second, never a hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from fs_engine.config import EngineConfig, ParallelConfig
from fs_engine.engine.swaps import PlanInFlight, ProcessSwaps, finish_plan, start_plan
from fs_engine.kv.layout import KVLayout
from fs_engine.model_config import ModelArch
from ipc.channels import PROCESSES_FILE, Puller, Pusher, instance_dir, ipc_address
from ipc.codec import encode
from ipc.errors import EngineDeadError
from ipc.messages import OpenArenas, ProcessFailed, Shutdown, StepPlan, StepResult, SwapReady, WorkerReady

POLL_S = 0.5
HEALTH_CHECK_S = 0.5  # a child that dies while nothing waits on it is still noticed this soon


def _rendezvous(host: str, port: int) -> str:
    """torch.distributed's init method for the ranks: ``tcp://host:port``, a free port of this machine if 0."""
    if port == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    return f"tcp://{host}:{port}"


def engine_addresses(parallel: ParallelConfig, run_dir: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(where the frontend binds, where the children connect) for every socket of one engine: ``plans-<rank>``,
    ``results``, ``swap-commands-<node>``, ``swap-done``, and ``dist`` (torch.distributed's rendezvous).
    One machine: ipc:// paths in the run directory. Several: TCP ports of rank 0's machine, counted up from
    ``master_port`` (which torch.distributed takes), so that every machine derives the same addresses."""
    n, m = parallel.tensor_parallel_size, parallel.nnodes
    names = ["results", "swap-done", *(f"plans-{r}" for r in range(n)), *(f"swap-commands-{k}" for k in range(m))]
    if m == 1:
        bind = {name: ipc_address(run_dir, name) for name in names}
        return bind, {**bind, "dist": _rendezvous(parallel.master_addr, parallel.master_port)}
    ports = {name: parallel.master_port + 1 + i for i, name in enumerate(names)}
    bind = {name: f"tcp://*:{port}" for name, port in ports.items()}
    connect = {name: f"tcp://{parallel.master_addr}:{port}" for name, port in ports.items()}
    return bind, {**connect, "dist": f"tcp://{parallel.master_addr}:{parallel.master_port}"}


def node_processes(config: EngineConfig, arch: ModelArch, max_model_len: int, node: int, run_dir: Path,
                   addresses: dict[str, str]) -> tuple[list, Any]:
    """This machine's worker processes (its ranks) and its swap process (their arenas), not started."""
    from workers.procs import run_swap_process, run_worker

    spawn = multiprocessing.get_context("spawn")
    per_node = config.parallel.ranks_per_node
    workers = [spawn.Process(target=run_worker, name=f"fs-engine-worker-{r}", daemon=True,
                             args=(config, arch, max_model_len, r, str(run_dir), addresses))
               for r in range(node * per_node, (node + 1) * per_node)]
    swap_addresses = {**addresses, "swap-commands": addresses[f"swap-commands-{node}"]}
    swapper = spawn.Process(target=run_swap_process, name="fs-engine-swap", daemon=True,
                            args=(str(run_dir), swap_addresses))
    return workers, swapper


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int, ready_timeout_s: float = 600.0):
        parallel = config.parallel
        self.tp_size = parallel.tensor_parallel_size
        self.nnodes = parallel.nnodes
        self.run_dir = instance_dir()
        self.ctx = zmq.Context()
        bind, self.addresses = engine_addresses(parallel, self.run_dir)
        self._plans = [Pusher(self.ctx, bind[f"plans-{r}"], bind=True) for r in range(self.tp_size)]
        self._results = Puller(self.ctx, bind["results"])
        self._swap_commands = [Pusher(self.ctx, bind[f"swap-commands-{k}"], bind=True) for k in range(self.nnodes)]
        self._swap_done = Puller(self.ctx, bind["swap-done"])
        # this machine's ranks and swap process; the other machines' come from their own fs-engine launch
        self.workers, self.swapper = node_processes(config, arch, max_model_len, 0, self.run_dir, self.addresses)
        self.swaps = ProcessSwaps(self._swap_commands, self._swap_done, self._check_children, self._send)
        # steps the frontend may have in flight: two with async scheduling (the next plan queues behind the one
        # computing, so the worker never waits for the frontend between steps)
        self.max_steps_in_flight = 2 if config.scheduler.async_scheduling else 1
        self._runs: deque[PlanInFlight] = deque()
        self._last_collected = 0.0
        self._closed = False
        self._last_health_check = 0.0
        # called every POLL_S while a result is late (a worker stopped or slow): the server keeps telling its
        # clients it is alive meanwhile; it must not touch the engine
        self.on_wait: Callable[[], None] | None = None
        try:
            for proc in (*self.workers, self.swapper):
                proc.start()
            self._handshake(config, arch, ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _handshake(self, config: EngineConfig, arch: ModelArch, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        readies: dict[int, WorkerReady] = {}
        while len(readies) < self.tp_size:
            waiting = sorted(set(range(self.tp_size)) - set(readies))
            ready: WorkerReady = self._recv(self._results, f"worker ranks {waiting} to load the model",
                                            max(1.0, deadline - time.monotonic()))
            readies[ready.rank] = ready
        ranks = [readies[r] for r in range(self.tp_size)]
        ready = ranks[0]
        if len({(r.num_blocks, r.num_host_blocks, r.dtype) for r in ranks}) != 1:  # they agree at start-up
            raise EngineDeadError(f"the ranks sized different KV arenas: {[(r.num_blocks, r.num_host_blocks) for r in ranks]}")
        self.num_blocks = ready.num_blocks
        self.num_cpu_blocks = ready.num_host_blocks
        self.device = ready.device
        self.forward = ready.forward
        self.num_compilations = ready.num_compilations  # rank 0's; every rank runs the same shapes
        self.dtype_name = ready.dtype
        # the whole model's KV per block (every rank's shard together): what a swap of one block moves
        kv_heads = max(1, arch.num_kv_heads // self.tp_size) * self.tp_size
        self.layout = KVLayout(arch.num_layers, config.cache.block_size, kv_heads, arch.head_dim, ready.dtype)
        self.worker_pids = [r.pid for r in ranks]
        if len({r.config_digest for r in ranks}) != 1:
            differ = sorted(r.rank for r in ranks if r.config_digest != ready.config_digest)
            raise EngineDeadError(f"ranks {differ} run with other engine arguments than rank 0: start every "
                                  f"machine's fs-engine launch with the same arguments (but --node-rank)")
        per_node = config.parallel.ranks_per_node
        for node, channel in enumerate(self._swap_commands):  # each machine's swap process maps its ranks' arenas
            arenas = [r.arena for r in ranks[node * per_node:(node + 1) * per_node]]
            self._send(channel, OpenArenas(arenas, ready.num_host_blocks, ready.dtype, config.swap.copy_granularity,
                                           config.swap.swap_threads))
        readies = [self._recv(self._swap_done, "every swap process to map its KV arenas", 120.0)
                   for _ in range(self.nnodes)]
        assert all(isinstance(r, SwapReady) for r in readies), readies
        swap_pids = [r.pid for r in readies]
        self.swap_pid = swap_pids[0]  # (each machine has one: this is the frontend's machine's, or the first)
        # for operators (and tests) watching the processes: in the run directory, which only this user can read,
        # not in stats(), which any client can ask for
        (self.run_dir / PROCESSES_FILE).write_text(json.dumps(
            {"frontend": os.getpid(), "workers": self.worker_pids, "swap": self.swap_pid,
             "children": self.child_pids()}))

    # ---- waiting on children -----------------------------------------------------------------------------
    def _check_children(self) -> None:
        self._last_health_check = time.monotonic()
        for proc in (*self.workers, self.swapper):
            if not proc.is_alive():
                raise EngineDeadError(f"the engine's {proc.name} process died (exit code {proc.exitcode})")

    def _failure(self, msg: ProcessFailed) -> str:
        """What to tell of a child's reported failure. A rank whose peer was killed fails in its next
        collective: the killed process is the cause, and is named first."""
        time.sleep(0.05)  # a killed peer's exit is visible by now
        killed = [p for p in (*self.workers, self.swapper) if not p.is_alive() and (p.exitcode or 0) < 0]
        reason = f"{msg.who} failed:\n{msg.message}"
        if killed:
            return (f"the engine's {killed[0].name} process died (signal {-killed[0].exitcode}); then "
                    + reason)
        return reason

    def check_health(self) -> None:
        """Raise EngineDeadError if a child process is gone. Cheap; rate-limited to one look per
        HEALTH_CHECK_S, so it can be called every step (a dead swap process is otherwise only noticed when a
        swap is waited on, and an idle engine would never notice)."""
        if time.monotonic() - self._last_health_check >= HEALTH_CHECK_S:
            self._check_children()

    def _recv(self, channel: Puller, what: str, timeout_s: float | None = None) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            msg = channel.recv(timeout_s=POLL_S)
            if isinstance(msg, ProcessFailed):
                raise EngineDeadError(self._failure(msg))
            if msg is not None:
                return msg
            self._check_children()
            if self.on_wait is not None:
                self.on_wait()
            if deadline is not None and time.monotonic() > deadline:
                raise EngineDeadError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def _send(self, channel: Pusher, msg: Any) -> None:
        while not channel.send(msg, timeout_s=POLL_S):  # a dead peer takes nothing: notice it, never block
            self._check_children()

    # ---- one step ----------------------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> None:
        """Start a step; the workers compute it while the frontend goes on until ``collect``."""
        assert len(self._runs) < self.max_steps_in_flight, "too many steps in flight: collect one first"
        assert not (plan.swaps and self._runs), "a plan that copies KV must wait for the steps in flight (rule 1)"
        self.check_health()
        self._runs.append(start_plan(plan, self.swaps, self._send_plan))

    def _send_plan(self, plan: StepPlan) -> None:
        """To every rank, encoded once; rank 0's result is read in ``collect``."""
        frame = encode(plan)
        for channel in self._plans:
            while not channel.send_frame(frame, timeout_s=POLL_S):
                self._check_children()

    def collect(self) -> StepResult:
        """The oldest step's result. Its time is counted from when it started or the step before it ended,
        whichever is later: a plan queued behind another does not count the other's time."""
        run = self._runs.popleft()
        run.started = max(run.started, self._last_collected)
        result = finish_plan(run, self.swaps, lambda: self._recv(self._results, f"step {run.plan.step_id}"))
        self._last_collected = time.perf_counter()
        # a step that computed nothing (only waited for copies) has no count of its own
        self.num_compilations = max(self.num_compilations, result.num_compilations)
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect()

    def stats(self) -> dict[str, float]:
        """Executor-specific counters for ``LLMEngine.stats``: with ``compile`` on, how many times rank 0's
        forward was compiled (once, at start-up, in steady state)."""
        return {"num_compilations": self.num_compilations} if self.num_compilations else {}

    def child_pids(self) -> list[int]:
        return [p.pid for p in (*self.workers, self.swapper) if p.pid is not None]

    def shutdown(self) -> None:
        """Ask every child to stop, wait briefly, then make sure: no process outlives the engine."""
        if self._closed:
            return
        self._closed = True
        for channel in (*self._plans, *self._swap_commands):
            try:
                channel.send(Shutdown("engine shutdown"), timeout_s=0.1)  # a dead child takes nothing
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in (*self.workers, self.swapper):
            if proc.pid is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for channel in (*self._plans, *self._swap_commands):  # their Shutdown may still be on its way (TCP)
            channel.close(linger_s=1.0)
        for channel in (self._results, self._swap_done):
            channel.close()
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
