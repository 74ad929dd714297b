"""Soak a served engine: many concurrent streaming clients, some misbehaving on purpose, for a bounded time.

A tool, not a CI test (``tests/integration/test_soak.py`` only smoke-tests it). It launches ``fs-engine launch
--port 0`` (the embedded tiny model; engine flags after ``--`` are passed on) in a session of its own, or
connects to ``--address``, and runs ``--streams`` closed-loop request loops on one asyncio event loop over
``--clients`` shared connections. Each stream sends a short random text prompt (``--max-tokens`` at most),
waits for its end and sends the next, until ``--minutes`` (or ``--seconds``) are up. A stream keeps one
behaviour all run; the fraction flags choose how many streams get each, the rest are well-behaved:

- well-behaved: reads every event; its TTFT (request sent -> first token), TBT (gap between two events that
  carry tokens: one per engine step) and end-to-end latency are the latency figures reported
- abort: stops mid-stream, half with ``abort()`` (the stream must end with finish_reason "abort") and half by
  closing the stream
- disconnect: a connection of its own, closed mid-stream (the frontend must abort its request, free its KV)
- slow: sleeps ``--slow-read-s`` between reads
- priority: ``update_priority`` mid-stream to a random priority in [-3, 3] (``--policy priority`` is passed
  to a launched engine, so that this reorders, and preempts, requests)
- malformed: one bad message a second, of a random kind: an undecodable frame, a bad field, a text prompt
  over --max-prompt-bytes' default, a prompt of max_model_len tokens, a frame over the frontend's 16 MiB
  (refused, or its connection cut), an abort of an unknown id; each must be refused and nothing else happen

A call that has not ended ``--call-timeout`` seconds after it started is a hang. At the end the soak waits
until the engine is idle and checks its KV: every device block free (``num_free_gpu_blocks`` counts the
settled resident cache of finished turns as free; ``resident_blocks`` shows it apart), every host block free
or cached, nothing running, waiting, swapped or being copied. It prints requests served, tokens, the
outcomes and errors of each behaviour (errors by exception class and normalised message), leaked blocks and
P50/P95/P99 latencies, and ``--json PATH`` writes the same.

Faults (``--fault KIND@SECONDS``, repeatable; only for an engine launched here), seconds into the run:
``kill-worker`` / ``kill-swap`` (SIGKILL the rank-0 worker / the swap process), ``stop-worker@S:D`` (SIGSTOP
the worker for D seconds, 5 by default, then SIGCONT), ``kill-frontend`` (SIGKILL). The children are found
by walking /proc for the frontend's children; worker and swap process have the same ``multiprocessing.spawn``
command line, so the engine's own list (``processes.json`` in its run directory) tells which is which. For
each fault it records what every call pending at that moment saw and how long after the fault it ended,
whether and when the frontend exited and with which code, and what was left behind: live processes of the
launch's process group and run directories (``/dev/shm/fs-engine-*`` whose ``owner.pid`` is the frontend),
which it then removes. After an ``EngineDeadError`` a stream waits up to 10 s for the frontend to exit,
then goes on with a new connection (a stopped worker may resume).

Exit code 0 when nothing leaked, no call hung, nothing was left behind, no call failed before the first
fault, requests were served (runs without faults) and the frontend exited as it should (0 when stopped,
non-zero within 10 s of a worker or swap process dying); 1 otherwise.

    python tools/soak.py --streams 200 --minutes 1
    python tools/soak.py --streams 100 --seconds 20 --fault kill-worker@5 --json out.json
    python tools/soak.py --streams 50 --seconds 30 --fault stop-worker@5:3 -- --num-gpu-blocks 256
    python tools/soak.py --address tcp://127.0.0.1:5555 --streams 1000 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fs_engine.client import AsyncClient  # noqa: E402
from ipc.codec import decode, encode  # noqa: E402
from ipc.errors import EngineDeadError, RemoteError  # noqa: E402
from ipc.messages import ErrorReply, GenerateRequest  # noqa: E402

MAX_MINUTES = 60
READY = re.compile(r"fs-engine ready at (tcp://\S+) .*frontend pid (\d+)")
DEFAULT_ENGINE_ARGS = ("--policy", "priority")  # priority changes then reorder and preempt requests
BEHAVIOURS = ("well-behaved", "abort", "disconnect", "slow", "priority", "malformed")
FAULTS = ("kill-worker", "kill-swap", "stop-worker", "kill-frontend")
WORDS = ("the", "a", "of", "block", "group", "swap", "fair", "share", "token", "cache", "host", "device", "queue",
         "step", "prompt", "stream", "tenant")
OVERSIZED_PROMPT_BYTES = (1 << 20) + 1  # one byte over --max-prompt-bytes' default
OVERSIZED_FRAME_BYTES = 17 << 20  # over the 16 MiB a frame the frontend reads
MALFORMED_PAUSE_S = 1.0
CUT_OFF_WAIT_S = 3.0  # an oversized frame that got no answer this long after it was sent was cut off
EXIT_BOUND_S = 10.0  # a dead child takes the frontend down within this long; the frontend's death, its children
IDLE_TIMEOUT_S = 30.0


# ---- what happened -----------------------------------------------------------------------------------------
class Unexpected(Exception):
    """A call ended in a way its behaviour does not allow (a malformed request accepted, a wrong finish)."""


class Hang(Exception):
    """A call that had not ended after --call-timeout seconds (it was cancelled)."""


def error_kind(error: BaseException) -> str:
    """Exception class and first line, with ids, addresses and numbers blanked, so that alike errors count as one."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"tcp://\S+", "<address>", lines[0] if lines else "")
    line = re.sub(r"'[^']*'", "'<id>'", re.sub(r"[0-9a-f]{12,}", "<id>", line))
    line = re.sub(r"[0-9]+(?:\.[0-9]+)?", "N", line)
    return f"{type(error).__name__}: {line[:140]}"


@dataclass
class Call:
    """One request of a stream: tokens it received and, when it ended as its behaviour expects, how."""

    tokens: int = 0
    outcome: str = ""
    detail: str = ""  # what a hang's report says of the call (a priority change: which way)


@dataclass
class Tally:
    """What the streams of one behaviour did: calls that ended as it expects (by how) and errors (by kind)."""

    streams: int = 0
    calls: int = 0
    tokens: int = 0
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float
    for_s: float = 5.0  # stop-worker: how long the worker stays stopped

    def __str__(self) -> str:
        return f"{self.kind}@{self.at_s:g}" + (f":{self.for_s:g}" if self.kind == "stop-worker" else "")


@dataclass
class FaultRecord:
    fault: Fault
    target: str  # "worker rank 0 pid 123"
    fired_s: float
    pending: set[int]  # streams with a call in flight when it fired, until that call ends
    num_pending: int
    ended_after_s: list[float] = field(default_factory=list)  # per pending call: fault -> its end
    seen: Counter = field(default_factory=Counter)  # how every call that ended after the fault ended
    frontend_exit: int | None = None
    frontend_exit_after_s: float | None = None


class Recorder:
    """Every call's end, by behaviour and, once faults fired, by fault; the well-behaved calls' latencies."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tallies = {b: Tally() for b in BEHAVIOURS}
        self.latency_s: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
        self.in_flight: set[int] = set()
        self.faults: list[FaultRecord] = []
        self.first_error_s: dict[str, float] = {}  # error kind -> when it first happened (s into the run)
        self.errors_before_faults = 0
        self.hangs = 0
        self.tracebacks = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(self, stream: int) -> None:
        self.in_flight.add(stream)

    def end(self, stream: int, behaviour: str, call: Call, error: BaseException | None) -> None:
        self.in_flight.discard(stream)
        tally = self.tallies[behaviour]
        tally.calls += 1
        tally.tokens += call.tokens
        what = call.outcome if error is None else error_kind(error)
        (tally.outcomes if error is None else tally.errors)[what] += 1
        if error is not None:
            self.first_error_s.setdefault(what, round(self.now(), 1))
            self.hangs += isinstance(error, Hang)
            self.tracebacks += "Traceback (most recent call last)" in str(error)
            self.errors_before_faults += not self.faults
        for record in self.faults:
            record.seen[what] += 1
            if stream in record.pending:
                record.pending.discard(stream)
                record.ended_after_s.append(self.now() - record.fired_s)


# ---- the engine's processes --------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) from /proc/<pid>/stat; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgid = text[text.rindex(")") + 2:].split()[:3]  # the name in (...) may hold spaces
    return state, int(ppid), int(pgid)


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process that has not exited (a zombie has)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[0] != "Z":
            found[int(entry.name)] = stat[1:]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def named_processes(frontend_pid: int) -> tuple[list[int], int | None]:
    """The engine's own word on which child is which: (worker pids by rank, swap pid), from ``processes.json``
    in its run directory (([], None) if there is none)."""
    for run_dir in run_dirs(frontend_pid):
        try:
            named = json.loads((run_dir / "processes.json").read_text())
        except (OSError, ValueError):
            continue
        return list(named["workers"]), named["swap"]
    return [], None


def engine_processes(frontend_pid: int) -> dict[int, str]:
    """The frontend's children (from /proc) by role. Worker and swap process run the same ``spawn_main``
    command line, so the engine's own list tells them apart; the resource tracker's command line names it."""
    workers, swap = named_processes(frontend_pid)
    roles = {pid: "resource tracker" if "resource_tracker" in cmdline(pid) else "process"
             for pid, (ppid, _) in live_processes().items() if ppid == frontend_pid}
    for pid, role in [(swap, "swap process"), *((pid, f"worker rank {r}") for r, pid in enumerate(workers))]:
        if pid in roles:
            roles[pid] = role
    return roles


def run_dirs(owner_pid: int) -> list[Path]:
    """The engine's run directories (ipc sockets, shared-memory arenas) whose owner file names ``owner_pid``."""
    found = []
    for base in {Path("/dev/shm"), Path(tempfile.gettempdir())}:
        for path in base.glob("fs-engine-*"):
            try:
                if int((path / "owner.pid").read_text()) == owner_pid:
                    found.append(path)
            except (OSError, ValueError):
                continue
    return found


class Launched:
    """``python -m fs_engine launch --port 0`` in a session of its own: its process group is its pid, which is
    how whatever it leaves behind is found."""

    def __init__(self, engine_args: list[str], log: Path, ready_timeout_s: float = 300.0) -> None:
        argv = [sys.executable, "-m", "fs_engine", "launch", "--port", "0", *DEFAULT_ENGINE_ARGS, *engine_args]
        self.log = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         start_new_session=True)
        try:
            selector = selectors.DefaultSelector()
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline() if selector.select(ready_timeout_s) else ""
            match = READY.search(line)
            if not match:
                raise SystemExit(f"soak: fs-engine launch did not start ({line!r}); its log:\n"
                                 f"{log.read_text()[-3000:]}")
        except BaseException:  # (an interrupt too)
            os.killpg(self.proc.pid, signal.SIGKILL)  # the children it may have started, too
            raise
        self.address, self.pid = match.group(1), int(match.group(2))

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after 30 s); the exit code (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def left_behind(self) -> dict[str, list[str]]:
        """What of the launch is still there once its processes had EXIT_BOUND_S to go: live processes of its
        group and its run directories. Both are then removed (killed, deleted), so that a run cleans up."""
        deadline = time.monotonic() + EXIT_BOUND_S
        while True:
            procs = [pid for pid, (_, pgid) in live_processes().items() if pgid == self.pid]
            dirs = run_dirs(self.pid)
            if not (procs or dirs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        left = {"processes": [f"{pid} {cmdline(pid)[:100]}" for pid in procs], "run_dirs": [str(d) for d in dirs]}
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):  # it may have gone meanwhile
                os.kill(pid, signal.SIGKILL)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
        return left


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"{code} ({signal.Signals(-code).name})" if code < 0 else str(code)


# ---- the load ----------------------------------------------------------------------------------------------
class Soak:
    """One run's shared state: the engine's address, the shared connections, the clock and the records."""

    def __init__(self, args: argparse.Namespace, address: str, max_model_len: int) -> None:
        self.args = args
        self.address = address
        self.max_model_len = max_model_len
        self.rec = Recorder()
        self.gone = asyncio.Event()  # the launched frontend has exited
        self.clients = [self.connect() for _ in range(args.clients)]

    def connect(self) -> AsyncClient:
        return AsyncClient(self.address, timeout_s=self.args.client_timeout)

    def running(self) -> bool:
        return self.rec.now() < self.args.duration_s and not self.gone.is_set()

    def client(self, stream: int) -> AsyncClient:
        return self.clients[stream % len(self.clients)]

    async def replace(self, stream: int, dead: AsyncClient) -> None:
        """A dead client stays dead: its streams go on with a new one (after a stop-worker fault the engine
        may serve on). The first of its streams to get here replaces it for all."""
        slot = stream % len(self.clients)
        if self.clients[slot] is dead:
            self.clients[slot] = self.connect()
            await dead.close()

    def request(self, rng: random.Random) -> tuple[str, dict]:
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
        return prompt, {"max_tokens": rng.randint(2, self.args.max_tokens), "ignore_eos": True}


async def well_behaved(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    prompt, kw = s.request(rng)
    sent = last = time.monotonic()
    gaps: list[float] = []
    async with s.client(stream).generate(prompt, **kw) as events:
        async for ev in events:
            if ev.token_ids:
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                call.tokens += len(ev.token_ids)
            if ev.finished and ev.finish_reason not in ("length", "stop"):
                raise Unexpected(f"finish_reason {ev.finish_reason!r}")
    call.outcome = "finished"
    s.rec.latency_s["ttft"].append(gaps[0])
    s.rec.latency_s["tbt"].extend(gaps[1:])
    s.rec.latency_s["e2e"].append(time.monotonic() - sent)


async def read_until(events, call: Call, cut: int) -> bool:
    """Read until ``cut`` tokens arrived (True) or the stream ended first (False)."""
    async for ev in events:
        call.tokens += len(ev.token_ids)
        if ev.finished:
            call.outcome = f"finished before its cut ({ev.finish_reason})"
            return False
        if call.tokens >= cut:
            return True
    return False


async def abort_midway(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    prompt, kw = s.request(rng)
    client = s.client(stream)
    async with client.generate(prompt, **kw) as events:
        if not await read_until(events, call, rng.randint(1, kw["max_tokens"] - 1)):
            return
        if rng.random() < 0.5:
            call.outcome = "closed the stream"  # leaving the block aborts it on the server
            return
        try:
            await client.abort(events.request_id)
        except RemoteError as e:
            if "unknown request id" not in str(e):
                raise
        async for ev in events:  # the last event says which won: the abort, or the request's own end
            call.tokens += len(ev.token_ids)
            call.outcome = "aborted" if ev.finish_reason == "abort" else "finished before abort() arrived"


async def disconnect_midway(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    prompt, kw = s.request(rng)
    client = s.connect()  # its own connection: closing it must not touch the other streams
    try:
        if await read_until(client.generate(prompt, **kw), call, rng.randint(1, kw["max_tokens"] - 1)):
            call.outcome = "disconnected"
    finally:
        await client.close()


async def slow_reader(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    prompt, kw = s.request(rng)
    async with s.client(stream).generate(prompt, **kw) as events:
        async for ev in events:
            call.tokens += len(ev.token_ids)
            await asyncio.sleep(s.args.slow_read_s)
    call.outcome = "finished"


async def change_priority(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    prompt, kw = s.request(rng)
    client = s.client(stream)
    async with client.generate(prompt, **kw) as events:
        if await read_until(events, call, rng.randint(1, kw["max_tokens"] - 1)):
            call.outcome = "finished after its priority change"
            priority = rng.randint(-3, 3)
            call.detail = ("after its priority was lowered below everyone else's" if priority > 0 else
                           "after its priority was raised" if priority < 0 else "after an unchanged priority")
            try:
                await client.update_priority(events.request_id, priority)
            except RemoteError as e:
                if "unknown request id" not in str(e):
                    raise
                call.outcome = "finished before its priority change"
            async for ev in events:
                call.tokens += len(ev.token_ids)


async def raw_reply(address: str, frame: bytes, wait_s: float) -> object | None:
    """Send one frame on a fresh connection: the decoded reply, or None if none came within ``wait_s``."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        await sock.send(frame)
        return decode(await sock.recv()) if await sock.poll(wait_s * 1000) else None
    finally:
        sock.close()


async def refused_frame(s: Soak, frame: bytes, may_cut: bool = False) -> str:
    """"refused": the frontend answered with a non-fatal error; "cut off": no answer within CUT_OFF_WAIT_S,
    which is what libzmq's frame size limit does to an oversized frame (it drops the connection)."""
    reply = await raw_reply(s.address, frame, CUT_OFF_WAIT_S if may_cut else s.args.client_timeout)
    if isinstance(reply, ErrorReply) and not reply.fatal:
        return "refused"
    if reply is None and may_cut:
        return "cut off"
    raise Unexpected(f"answered {reply!r:.80}")


async def refused_call(request: Awaitable) -> str:
    try:
        await request
    except RemoteError:
        return "refused"
    raise Unexpected("accepted")


async def malformed(s: Soak, stream: int, rng: random.Random, call: Call) -> None:
    """One bad message of a random kind (it serves nobody: ``call`` gets no tokens)."""
    client = s.client(stream)
    bad_field = GenerateRequest(uuid.uuid4().hex, None, prompt_token_ids=[3, 4, 5], params={"max_tokens": 2 ** 40})
    kinds: dict[str, Callable[[], Awaitable[str]]] = {
        "garbage frame": lambda: refused_frame(s, b"\xc1" + os.urandom(15)),  # 0xc1: never valid msgpack
        "bad field": lambda: refused_frame(s, encode(bad_field)),
        "oversized frame": lambda: refused_frame(s, bytes(OVERSIZED_FRAME_BYTES), may_cut=True),
        "oversized prompt": lambda: refused_call(client.complete("x" * OVERSIZED_PROMPT_BYTES, max_tokens=1)),
        "prompt of max_model_len": lambda: refused_call(client.complete([3] * s.max_model_len, max_tokens=1)),
        "unknown abort": lambda: refused_call(client.abort(f"soak-unknown-{uuid.uuid4().hex}")),
    }
    name = rng.choice(list(kinds))
    try:
        call.outcome = f"{name}: {await kinds[name]()}"
    except Unexpected as e:
        raise Unexpected(f"{name}: {e}") from None


CALLS = dict(zip(BEHAVIOURS, (well_behaved, abort_midway, disconnect_midway, slow_reader, change_priority,
                              malformed)))


async def run_stream(s: Soak, stream: int, behaviour: str, seed: int) -> None:
    rng = random.Random(seed * 1_000_003 + stream)
    await asyncio.sleep(rng.random() * min(1.0, s.args.duration_s / 10))  # not every stream in the same step
    while s.running():
        call, error = Call(), None
        client = s.client(stream)
        s.rec.begin(stream)
        try:
            await asyncio.wait_for(CALLS[behaviour](s, stream, rng, call), s.args.call_timeout)
        except asyncio.TimeoutError:
            error = Hang(f"no end within {s.args.call_timeout:g} s {call.detail}".rstrip())
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind; the stream goes on
            error = e
        s.rec.end(stream, behaviour, call, error)
        if isinstance(error, EngineDeadError):
            try:  # a dead engine's frontend exits within EXIT_BOUND_S; one that does not may serve on
                await asyncio.wait_for(s.gone.wait(), EXIT_BOUND_S)
            except asyncio.TimeoutError:
                if behaviour != "disconnect":  # (whose own connection died; the shared one may be fine)
                    await s.replace(stream, client)
        elif behaviour == "malformed":
            await asyncio.sleep(MALFORMED_PAUSE_S)


def fault_target(fault: Fault, roles: dict[int, str], frontend_pid: int) -> tuple[int, str]:
    """(pid, role) of the process a fault signals."""
    if fault.kind == "kill-frontend":
        return frontend_pid, "frontend"
    role = "swap process" if fault.kind == "kill-swap" else "worker rank 0"
    pids = [pid for pid, r in roles.items() if r == role]
    if not pids:
        raise SystemExit(f"soak: no {role} among the frontend's children {roles} for --fault {fault}")
    return pids[0], role


async def inject(s: Soak, fault: Fault, pid: int, role: str) -> None:
    await asyncio.sleep(max(0.0, fault.at_s - s.rec.now()))
    rec = s.rec
    rec.faults.append(FaultRecord(fault, f"{role} pid {pid}", rec.now(), set(rec.in_flight), len(rec.in_flight)))
    if fault.kind != "stop-worker":
        os.kill(pid, signal.SIGKILL)
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(fault.for_s)
    finally:  # also when the run ends first: a worker left stopped would never let the engine stop
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def watch_frontend(s: Soak, launched: Launched) -> None:
    while (code := launched.proc.poll()) is None:
        await asyncio.sleep(0.05)
    for record in s.rec.faults:
        record.frontend_exit, record.frontend_exit_after_s = code, s.rec.now() - record.fired_s
    s.gone.set()


async def report_progress(s: Soak) -> None:
    while True:
        await asyncio.sleep(10)
        tallies = s.rec.tallies.values()
        print(f"soak: {s.rec.now():5.0f} s  {sum(t.calls for t in tallies)} calls, "
              f"{sum(t.tokens for t in tallies)} tokens, {sum(sum(t.errors.values()) for t in tallies)} errors",
              file=sys.stderr, flush=True)


async def idle_stats(address: str, timeout_s: float) -> tuple[dict, bool]:
    """The engine's stats once it is idle with every block back (or after IDLE_TIMEOUT_S: not idle)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    async with AsyncClient(address, timeout_s=timeout_s) as client:
        while True:
            stats = await client.stats()
            idle = not any(stats[k] for k in ("num_running", "num_waiting", "num_swapped", "num_swaps_in_flight"))
            if (idle and not any(kv_leaks(stats).values())) or time.monotonic() > deadline:
                return stats, idle
            await asyncio.sleep(0.2)


def kv_leaks(stats: dict) -> dict[str, int]:
    # num_free_gpu_blocks counts the settled resident cache as free (an allocation evicts it)
    return {"gpu": stats["num_gpu_blocks"] - stats["num_free_gpu_blocks"],
            "cpu": stats["num_cpu_blocks"] - stats["num_free_cpu_blocks"] - stats["num_cached_cpu_blocks"]}


def assign_behaviours(args: argparse.Namespace) -> list[str]:
    """Each stream's behaviour: round(fraction * streams) of each, well-behaved the rest, shuffled (seeded)."""
    counts = {b: round(getattr(args, b) * args.streams) for b in BEHAVIOURS[1:]}
    behaviours = [b for b, n in counts.items() for _ in range(n)][: args.streams]
    behaviours += ["well-behaved"] * (args.streams - len(behaviours))
    random.Random(args.seed).shuffle(behaviours)
    return behaviours


async def drive(args: argparse.Namespace, launched: Launched | None) -> dict:
    """Run the streams (and faults) to the end; what they saw and, if the engine lives, its KV afterwards."""
    address = launched.address if launched else args.address
    try:
        async with AsyncClient(address, timeout_s=args.client_timeout) as probe:
            first = await probe.stats()
    except EngineDeadError as e:
        raise SystemExit(f"soak: no engine answers at {address}: {e}") from None
    roles = engine_processes(launched.pid) if launched else {}
    targets = [fault_target(f, roles, launched.pid) for f in args.fault] if launched else []
    s = Soak(args, address, first["max_model_len"])
    behaviours = assign_behaviours(args)
    for b in behaviours:
        s.rec.tallies[b].streams += 1
    helpers = [asyncio.create_task(report_progress(s))]
    if launched:
        helpers.append(asyncio.create_task(watch_frontend(s, launched)))
        helpers += [asyncio.create_task(inject(s, f, *target)) for f, target in zip(args.fault, targets)]
    await asyncio.gather(*(run_stream(s, i, b, args.seed) for i, b in enumerate(behaviours)))
    duration_s = s.rec.now()
    for task in helpers:
        task.cancel()
    for client in s.clients:
        await client.close()
    stats, idle = None, False
    if not s.gone.is_set():
        try:
            stats, idle = await idle_stats(address, args.client_timeout)
        except EngineDeadError:  # it died as the load ended: there is no KV left to check
            pass
    return summarize(args, s.rec, duration_s, roles, stats, idle)


# ---- the report ---------------------------------------------------------------------------------------------
def percentiles_ms(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)

    def rank(q: float) -> float | None:  # nearest rank
        return round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1) if ordered else None

    return {"n": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


KV_STATS = ("num_gpu_blocks", "num_free_gpu_blocks", "resident_blocks", "num_cpu_blocks", "num_free_cpu_blocks",
            "num_cached_cpu_blocks", "num_running", "num_waiting", "num_swapped", "num_swaps_in_flight",
            "num_preemptions", "num_swap_outs", "num_finished_requests", "num_aborted_requests")


def summarize(args: argparse.Namespace, rec: Recorder, duration_s: float, roles: dict[int, str],
              stats: dict | None, idle: bool) -> dict:
    """The run as a JSON-able report (``render`` prints it)."""
    tallies = rec.tallies
    served = sum(n for b in BEHAVIOURS[:-1] for n in tallies[b].outcomes.values())
    kv = None if stats is None else {"idle": idle, **{f"leaked_{k}_blocks": n for k, n in kv_leaks(stats).items()},
                                     **{k: stats[k] for k in KV_STATS}}
    return {
        "command": " ".join(["python", "tools/soak.py", *args.argv]),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": args.load_at_start,
                    "load_average_at_end": round(os.getloadavg()[0], 2)},
        "streams": args.streams, "clients": args.clients, "seconds": round(duration_s, 1),
        "processes": {str(pid): role for pid, role in roles.items()},
        "served_requests": served, "tokens": sum(t.tokens for t in tallies.values()),
        "behaviours": {b: {"streams": t.streams, "calls": t.calls, "tokens": t.tokens, "outcomes": dict(t.outcomes),
                           "errors": dict(t.errors)} for b, t in tallies.items()},
        "first_error_s": rec.first_error_s, "errors_before_faults": rec.errors_before_faults, "hangs": rec.hangs,
        "tracebacks_to_clients": rec.tracebacks,
        "latency_ms": {k: percentiles_ms(v) for k, v in rec.latency_s.items()},
        "kv": kv,
        "faults": [{"fault": str(r.fault), "target": r.target, "fired_s": round(r.fired_s, 2),
                    "pending_calls": r.num_pending,
                    "pending_ended_within_s": round(max(r.ended_after_s, default=0.0), 2),
                    "clients_saw": dict(r.seen.most_common()), "frontend_exit": r.frontend_exit,
                    "frontend_exit_after_s": None if r.frontend_exit_after_s is None else
                    round(r.frontend_exit_after_s, 2)} for r in rec.faults],
    }


def judge(report: dict, faults: list[Fault], launched: bool) -> list[str]:
    """Why the run failed (empty: it passed)."""
    failures = []
    kv = report["kv"]
    if kv is not None and not kv["idle"]:
        failures.append(f"the engine was not idle {IDLE_TIMEOUT_S:g} s after the load stopped")
    if kv is not None and (kv["leaked_gpu_blocks"] or kv["leaked_cpu_blocks"]):
        failures.append(f"KV blocks leaked: {kv['leaked_gpu_blocks']} device, {kv['leaked_cpu_blocks']} host")
    if report["hangs"]:
        failures.append(f"{report['hangs']} calls hung")
    if report["errors_before_faults"]:
        failures.append(f"{report['errors_before_faults']} calls failed with no fault to explain it")
    if report["tracebacks_to_clients"]:
        failures.append(f"{report['tracebacks_to_clients']} errors sent a traceback to a client")
    if not report["served_requests"] and not faults:
        failures.append("no request was served")
    if launched:
        left = report["left_behind"]
        if left["processes"] or left["run_dirs"]:
            failures.append(f"left behind: {left['processes'] + left['run_dirs']}")
        code = report["frontend_exit"]
        if not faults and code != 0:
            failures.append(f"the frontend exited with {exit_text(code)} when stopped")
        for record in report["faults"]:
            after = record["frontend_exit_after_s"]
            if record["fault"].startswith(("kill-worker", "kill-swap")) and (not code or after is None
                                                                              or after > EXIT_BOUND_S):
                failures.append(f"the frontend did not exit non-zero within {EXIT_BOUND_S:g} s of {record['fault']}")
    return failures


def render(report: dict) -> str:
    out = [(f"soak: {report['streams']} streams on {report['clients']} connections for {report['seconds']} s: "
            f"{report['served_requests']} requests served, {report['tokens']} tokens "
            f"({report['tokens'] / max(report['seconds'], 1e-9):.0f}/s)")]
    machine = report["machine"]
    out.append(f"machine: {machine['cpus']} CPUs, load average {machine['load_average_at_start']} at the start, "
               f"{machine['load_average_at_end']} at the end")
    if report["processes"]:
        out.append("engine: frontend pid " + str(report["frontend_pid"]) + ", "
                   + ", ".join(f"{role} pid {pid}" for pid, role in report["processes"].items()))
    out.append(f"\n{'behaviour':<14}{'streams':>8}{'calls':>8}{'tokens':>9}  outcomes / errors")
    for name, b in report["behaviours"].items():
        rows = [f"{n} {k}" for k, n in b["outcomes"].items()]
        rows += [f"{n} ERROR {k} (first at {report['first_error_s'][k]} s)" for k, n in b["errors"].items()]
        indent = "\n" + " " * 41
        out.append(f"{name:<14}{b['streams']:>8}{b['calls']:>8}{b['tokens']:>9}  " + indent.join(rows or ["-"]))
    out.append(f"\nwell-behaved latency (ms) {'n':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for name, p in report["latency_ms"].items():
        out.append(f"  {name.upper():<23} {p['n']:>8}" + "".join(f"{'-' if p[q] is None else p[q]:>9}"
                                                         for q in ("p50", "p95", "p99", "max")))
    kv = report["kv"]
    if kv is None:
        out.append("\nKV: not checked (the engine is gone)")
    else:
        out.append(f"\nKV after the load ({'idle' if kv['idle'] else 'NOT idle'}): {kv['num_free_gpu_blocks']}/"
                   f"{kv['num_gpu_blocks']} device blocks free ({kv['resident_blocks']} of them resident cache), "
                   f"{kv['num_free_cpu_blocks']} + {kv['num_cached_cpu_blocks']} cached / {kv['num_cpu_blocks']} "
                   f"host; {kv['num_preemptions']} preemptions, {kv['num_swap_outs']} swap-outs; "
                   f"leaked {kv['leaked_gpu_blocks'] + kv['leaked_cpu_blocks']}")
    for f in report["faults"]:
        saw = "; ".join(f"{n} {k}" for k, n in list(f["clients_saw"].items())[:4])
        out.append(f"\nfault {f['fault']} ({f['target']}) at {f['fired_s']} s: {f['pending_calls']} calls pending, "
                   f"all ended within {f['pending_ended_within_s']} s; frontend exit "
                   f"{exit_text(f['frontend_exit'])}" + (f" {f['frontend_exit_after_s']} s after" if
                                                         f["frontend_exit_after_s"] is not None else "")
                   + f"\n  clients saw: {saw}")
    if "frontend_exit" in report:
        left = report["left_behind"]
        out.append(f"\nfrontend exit code {exit_text(report['frontend_exit'])}; left behind: "
                   + (", ".join(left["processes"] + left["run_dirs"]) or "nothing"))
    out.append("\nresult: " + ("PASS" if not report["failures"] else "FAIL: " + "; ".join(report["failures"])))
    return "\n".join(out)


# ---- command line ------------------------------------------------------------------------------------------
def parse_fault(text: str) -> Fault:
    match = re.fullmatch(r"([a-z-]+)@([0-9.]+)(?::([0-9.]+))?", text)
    if not match or match.group(1) not in FAULTS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND@SECONDS[:STOPPED_S], KIND one of {FAULTS}")
    kind, at, stopped = match.groups()
    if stopped and kind != "stop-worker":
        raise argparse.ArgumentTypeError(f"{text!r}: only stop-worker takes :STOPPED_S")
    return Fault(kind, float(at), float(stopped or 5.0))


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction of the streams is in [0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--address", help="a running frontend (tcp://HOST:PORT); default: launch one here")
    ap.add_argument("--streams", type=int, default=100, help="concurrent request loops (default: %(default)s)")
    ap.add_argument("--clients", type=int, help="shared connections the streams spread over "
                                                "(default: one per 100 streams)")
    span = ap.add_mutually_exclusive_group()
    span.add_argument("--minutes", type=float, help=f"how long to send requests (default 1, at most {MAX_MINUTES})")
    span.add_argument("--seconds", type=float, help="the same in seconds")
    ap.add_argument("--max-tokens", type=int, default=32,
                    help="each request asks for 2..N tokens (default: %(default)s)")
    for name, default, what in (("abort", 0.1, "abort mid-stream"), ("disconnect", 0.05, "disconnect mid-stream"),
                                ("slow", 0.1, "read slowly"), ("priority", 0.1, "change their priority mid-stream"),
                                ("malformed", 0.02, "send malformed or oversized requests")):
        ap.add_argument(f"--{name}", type=fraction, default=default, metavar="FRACTION",
                        help=f"share of the streams that {what} (default: {default})")
    ap.add_argument("--slow-read-s", type=float, default=0.2, help="a slow reader's sleep between reads")
    ap.add_argument("--fault", type=parse_fault, action="append", default=[], metavar="KIND@SECONDS[:STOPPED_S]",
                    help=f"inject a fault this many seconds into the run; KIND: {', '.join(FAULTS)}; repeatable")
    ap.add_argument("--client-timeout", type=float, default=30.0,
                    help="a client's silence limit: an engine that sends nothing for this long is dead "
                         "(default: %(default)s s, as the SDK's)")
    ap.add_argument("--call-timeout", type=float, default=120.0, help="a call not ended after this long hung (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("engine_args", nargs="*", metavar="-- ENGINE_FLAG",
                    help="flags for fs-engine launch (after --), e.g. -- --model DIR --num-gpu-blocks 256")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.load_at_start = round(os.getloadavg()[0], 2)  # latencies mean little on a machine busy with more
    minutes = args.seconds / 60 if args.seconds is not None else 1.0 if args.minutes is None else args.minutes
    if not 0 < minutes <= MAX_MINUTES:
        ap.error(f"a soak runs for more than 0 and at most {MAX_MINUTES} minutes, got {minutes:g}")
    args.duration_s = 60 * minutes
    if args.streams < 1 or args.max_tokens < 2:
        ap.error("--streams must be at least 1 and --max-tokens at least 2")
    if sum(getattr(args, b) for b in BEHAVIOURS[1:]) > 1:
        ap.error("the behaviour fractions add up to more than 1")
    if args.address and (args.fault or args.engine_args):
        ap.error("--fault and engine flags need an engine launched here (no --address)")
    if any(f.at_s >= args.duration_s for f in args.fault):
        ap.error("every --fault must fire before the run ends")
    args.clients = args.clients or math.ceil(args.streams / 100)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.address is not None:
        report = asyncio.run(drive(args, None))
    else:
        # a soak stopped from outside (or failing) still stops the engine it launched: the finally below
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
        log = Path(tempfile.mkdtemp(prefix="soak-")) / "launch.log"
        launched = Launched(args.engine_args, log)
        try:
            print(f"soak: launched {launched.address} (frontend pid {launched.pid}, log {log})", file=sys.stderr)
            report = asyncio.run(drive(args, launched))
        finally:
            code = launched.stop()
            left = launched.left_behind()
        report.update(frontend_pid=launched.pid, frontend_exit=code, left_behind=left)
    report["failures"] = judge(report, args.fault, args.address is None)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
