"""The client SDK against a fake frontend: a thread with a real ZeroMQ ROUTER that speaks the client protocol.

The fake generates deterministic tokens: a prompt's ids are its characters' code points (or the ids given),
output token i is ``(sum(prompt_ids) + i) % 1000`` and its text ``"<token>"``. It streams a few tokens per
event, round-robin over every request of every client, so concurrent streams arrive interleaved. Some
prompts trigger behaviour: "reject me" (ErrorReply), "slow..." (KeepAlives only for a while, then tokens),
"silence" (never answers anything again), "crash" (fatal ErrorReply), "garbage" (an undecodable frame),
"unreadable" (ErrorReply with request id "").
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import zmq

from fs_engine.client import AsyncClient, Client, CompletionResult
from fs_engine.sampling_params import SamplingParams
from ipc.channels import PeerGone, Router
from ipc.errors import EngineDeadError, ProtocolError, RemoteError
from ipc.messages import (
    AbortRequest, Ack, ErrorReply, GenerateRequest, KeepAlive, StatsReply, StatsRequest, TokenEvent, UpdatePriority,
)

NUM_CACHED = 3
SLOW_S = 0.5  # how long a "slow" prompt stays silent but for KeepAlives
KEEPALIVE_S = 0.02


def prompt_ids(prompt: str | list[int]) -> list[int]:
    return [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)


def token_at(ids: list[int], i: int) -> int:
    return (sum(ids) + i) % 1000


def expected(prompt: str | list[int], max_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> tuple[list[int], str]:
    ids = prompt_ids(prompt)
    out: list[int] = []
    for i in range(max_tokens):
        out.append(token_at(ids, i))
        if out[-1] in stop_token_ids:
            return out, "stop"
    return out, "length"


def text_of(tokens: list[int]) -> str:
    return "".join(f"<{t}>" for t in tokens)


@dataclass
class _Gen:
    identity: bytes
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    priority: int
    start_s: float
    pos: int = 0
    first: bool = True
    held: list[int] | None = None  # tokens of a stream=False request, sent all at once at the end


class FakeFrontend:
    def __init__(self, tokens_per_event: int = 2) -> None:
        self.tokens_per_event = tokens_per_event
        self.ctx = zmq.Context()
        self.router = Router(self.ctx, "tcp://127.0.0.1:0")
        self.address = self.router.address
        self.received: list[object] = []
        self.sent_events: list[str] = []  # request id of every TokenEvent sent, in order
        self.gens: dict[tuple[bytes, str], _Gen] = {}
        self.error: BaseException | None = None
        self._silent = False
        self._keepalive_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.router.close()
        self.ctx.term()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                got = self.router.recv(timeout_s=0.001)
                while got is not None:
                    self.received.append(got[1])
                    if not self._silent:
                        self._handle(*got)
                    got = self.router.recv(0)
                if not self._silent:
                    self._tick()
        except BaseException as e:  # noqa: BLE001 - surfaced by the fixture
            self.error = e

    def _send(self, identity: bytes, msg: object) -> None:
        try:
            self.router.send(identity, msg)
        except PeerGone:
            for key in [k for k in self.gens if k[0] == identity]:
                del self.gens[key]

    def _handle(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, ProtocolError):
            self._send(identity, ErrorReply("", str(msg)))
        elif isinstance(msg, GenerateRequest):
            self._generate(identity, msg)
        elif isinstance(msg, AbortRequest):
            gen = self.gens.pop((identity, msg.request_id), None)
            if gen is None:
                self._send(identity, ErrorReply(msg.request_id, f"unknown request {msg.request_id}"))
            else:
                self._send(identity, Ack(msg.request_id))
                self._send(identity, TokenEvent(msg.request_id, finished=True, finish_reason="abort"))
        elif isinstance(msg, UpdatePriority):
            gen = self.gens.get((identity, msg.request_id))
            if gen is None:
                self._send(identity, ErrorReply(msg.request_id, f"unknown request {msg.request_id}"))
            else:
                gen.priority = msg.priority
                self._send(identity, Ack(msg.request_id))
        elif isinstance(msg, StatsRequest):
            self._send(identity, StatsReply(msg.request_id, {"num_active": len(self.gens)}))

    def _generate(self, identity: bytes, req: GenerateRequest) -> None:
        if req.prompt == "silence":
            self._silent = True
            return
        if req.prompt == "crash":
            self._send(identity, ErrorReply(req.request_id, "engine going down: worker 0 died", fatal=True))
            return
        if req.prompt == "garbage":
            self.router.socket.send_multipart([identity, b"\xc1 not msgpack"])
            return
        if req.prompt == "unreadable":
            self._send(identity, ErrorReply("", "not a valid fs-engine message"))
            return
        if req.prompt == "reject me":
            self._send(identity, ErrorReply(req.request_id, "prompt rejected: say something else"))
            return
        try:
            params = SamplingParams(**req.params)  # what the real frontend does with the wire dict
        except (TypeError, ValueError) as e:
            self._send(identity, ErrorReply(req.request_id, f"bad params: {e}"))
            return
        ids = prompt_ids(req.prompt if req.prompt is not None else req.prompt_token_ids)
        start_s = time.monotonic() + (SLOW_S if (req.prompt or "").startswith("slow") else 0.0)
        self.gens[(identity, req.request_id)] = _Gen(identity, req.request_id, ids, params, req.stream,
                                                     req.priority, start_s)

    def _tick(self) -> None:
        now = time.monotonic()
        waiting = {g.identity for g in self.gens.values() if g.start_s > now}
        if waiting and now >= self._keepalive_s:
            self._keepalive_s = now + KEEPALIVE_S
            for identity in waiting:
                self._send(identity, KeepAlive())
        for key, gen in list(self.gens.items()):
            if gen.start_s <= now and key in self.gens:
                self._step(key, gen)

    def _step(self, key: tuple[bytes, str], gen: _Gen) -> None:
        tokens, reason = [], None
        for _ in range(self.tokens_per_event):
            tokens.append(token_at(gen.prompt_ids, gen.pos))
            gen.pos += 1
            if tokens[-1] in gen.params.stop_token_ids:
                reason = "stop"
            elif gen.pos >= gen.params.max_tokens:
                reason = "length"
            if reason:
                break
        if not gen.stream:
            gen.held = (gen.held or []) + tokens
            if not reason:
                return
            tokens = gen.held
        ev = TokenEvent(gen.request_id, tokens, text_of(tokens), reason is not None, reason, NUM_CACHED,
                        gen.prompt_ids if gen.first else None)
        gen.first = False
        if reason:
            del self.gens[key]
        self.sent_events.append(gen.request_id)
        self._send(gen.identity, ev)

    def requests(self, kind: type) -> list:
        return [m for m in list(self.received) if isinstance(m, kind)]


@pytest.fixture
def server():
    fake = FakeFrontend()
    yield fake
    fake.close()
    assert fake.error is None, f"fake frontend failed: {fake.error!r}"


@pytest.fixture
def client(server: FakeFrontend):
    with Client(server.address, timeout_s=2.0) as c:
        yield c


def check_stream(events: list, prompt: str | list[int], max_tokens: int, request_id: str | None = None) -> None:
    tokens, reason = expected(prompt, max_tokens)
    assert [t for ev in events for t in ev.token_ids] == tokens
    assert "".join(ev.text for ev in events) == text_of(tokens)
    assert [ev.finished for ev in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason == reason
    assert events[0].prompt_token_ids == prompt_ids(prompt)
    assert all(ev.prompt_token_ids is None for ev in events[1:])
    assert all(ev.num_cached_tokens == NUM_CACHED for ev in events)
    if request_id is not None:
        assert {ev.request_id for ev in events} == {request_id}


# ---- sync client ----------------------------------------------------------------------------------------


def test_stream_yields_new_tokens_in_order(client: Client, server: FakeFrontend) -> None:
    stream = client.generate("hello", max_tokens=7, temperature=0.5, stop=["zz"], seed=3)
    events = list(stream)
    assert len(events) == 4  # 2 + 2 + 2 + 1 tokens
    check_stream(events, "hello", 7, stream.request_id)
    [req] = server.requests(GenerateRequest)
    assert req.prompt == "hello" and req.prompt_token_ids is None and req.stream
    assert req.params["temperature"] == 0.5 and req.params["stop"] == ["zz"] and req.params["seed"] == 3


def test_token_id_prompt_and_stop_token(client: Client) -> None:
    stop_id = token_at([5, 6, 7], 4)
    events = list(client.generate([5, 6, 7], max_tokens=50, stop_token_ids=[stop_id]))
    assert [t for ev in events for t in ev.token_ids] == expected([5, 6, 7], 50, (stop_id,))[0]
    assert events[-1].finish_reason == "stop" and events[0].prompt_token_ids == [5, 6, 7]


def test_interleaved_iterators_get_their_own_events(client: Client, server: FakeFrontend) -> None:
    prompts = {"alpha": 21, "beta": 15, "gamma": 30}
    streams = {p: client.generate(p, max_tokens=n) for p, n in prompts.items()}
    assert len({s.request_id for s in streams.values()}) == 3
    events: dict[str, list] = {p: [] for p in prompts}
    live = dict(streams)
    while live:  # advance the iterators round-robin from one thread
        for p, s in list(live.items()):
            ev = next(s, None)
            if ev is None:
                del live[p]
            else:
                events[p].append(ev)
    for p, n in prompts.items():
        check_stream(events[p], p, n, streams[p].request_id)
    switches = sum(a != b for a, b in zip(server.sent_events, server.sent_events[1:]))
    assert switches >= 10, "the fake frontend did not interleave the streams"


def test_stream_consumed_after_another_is_buffered(client: Client) -> None:
    first, second = client.generate("one", max_tokens=9), client.generate("two", max_tokens=11)
    second_events = list(second)  # reading these files all of first's events into its buffer
    check_stream(second_events, "two", 11)
    check_stream(list(first), "one", 9)


def test_non_stream_returns_everything(client: Client, server: FakeFrontend) -> None:
    result = client.generate("whole", max_tokens=12, stream=False, request_id="mine")
    tokens, reason = expected("whole", 12)
    assert result == CompletionResult("mine", prompt_ids("whole"), tokens, text_of(tokens), reason, NUM_CACHED)
    assert client.complete([1, 2], max_tokens=3).token_ids == expected([1, 2], 3)[0]
    assert [r.stream for r in server.requests(GenerateRequest)] == [False, False]


@pytest.mark.parametrize("prompt, kwargs", [
    ("x", {"max_tokens": 0}), ("x", {"temperature": -1.0}), ("x", {"top_p": 0.0}), ("x", {"top_k": -1}),
    ("x", {"stop": [""]}), ("x", {"seed": 1.5}), ([], {}), ([3, -1], {}), (b"bytes", {}),
    ("x", {"priority": "high"}), ("x", {"tenant": ""}), ("x", {"request_id": ""}),
])
def test_local_validation_sends_nothing(client: Client, server: FakeFrontend, prompt, kwargs) -> None:
    with pytest.raises(ValueError):
        client.generate(prompt, **kwargs)
    with pytest.raises(ValueError):
        client.generate(prompt, stream=False, **kwargs)
    client.stats()  # a round trip: everything sent before it has arrived
    assert server.requests(GenerateRequest) == []


def test_server_rejection_raises_remote_error(client: Client) -> None:
    with pytest.raises(RemoteError, match="prompt rejected"):
        list(client.generate("reject me"))
    with pytest.raises(RemoteError, match="prompt rejected"):
        client.generate("reject me", stream=False)
    assert list(client.generate("still fine", max_tokens=2))[-1].finished


def test_abort_ends_stream_with_abort(client: Client, server: FakeFrontend) -> None:
    stream = client.generate("long", max_tokens=10**6)
    first = next(stream)
    assert first.token_ids and not first.finished
    client.abort(stream.request_id)
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert client.stats() == {"num_active": 0}
    with pytest.raises(RemoteError, match="unknown request"):
        client.abort(stream.request_id)


def test_update_priority_and_stats(client: Client, server: FakeFrontend) -> None:
    stream = client.generate("prio", max_tokens=10**6, priority=1, tenant="acme", session_id="s1")
    client.update_priority(stream.request_id, 7)
    assert [(m.request_id, m.priority) for m in server.requests(UpdatePriority)] == [(stream.request_id, 7)]
    assert server.gens[next(k for k in server.gens if k[1] == stream.request_id)].priority == 7
    assert client.stats() == {"num_active": 1}
    with pytest.raises(RemoteError, match="unknown request"):
        client.update_priority("nope", 1)
    req = server.requests(GenerateRequest)[0]
    assert (req.priority, req.tenant, req.session_id) == (1, "acme", "s1")
    stream.close()  # aborts the generation on the server
    assert client.stats() == {"num_active": 0}
    assert [m.request_id for m in server.requests(AbortRequest)] == [stream.request_id]


def test_keepalives_are_ignored_and_keep_the_call_alive(server: FakeFrontend) -> None:
    with Client(server.address, timeout_s=SLOW_S / 2) as client:
        start = time.monotonic()
        events = list(client.generate("slow start", max_tokens=4))
        assert time.monotonic() - start >= SLOW_S * 0.9
        check_stream(events, "slow start", 4)


def test_silence_raises_engine_dead_on_every_pending_call(server: FakeFrontend) -> None:
    with Client(server.address, timeout_s=0.3) as client:
        running = client.generate("running", max_tokens=10**6)
        next(running)
        quiet = client.generate("silence")
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="did not answer within 0.3 s"):
            for _ in running:  # drains what was buffered, then waits on a silent frontend
                pass
        assert 0.25 <= time.monotonic() - start < 2.0
        with pytest.raises(EngineDeadError):
            next(quiet)
        with pytest.raises(EngineDeadError):
            client.stats()
        with pytest.raises(EngineDeadError):
            client.generate("more")


def test_fatal_error_fails_every_pending_call(client: Client) -> None:
    running = [client.generate(f"r{i}", max_tokens=10**6) for i in range(3)]
    next(running[0])
    crash = client.generate("crash")
    with pytest.raises(EngineDeadError, match="worker 0 died"):
        list(crash)
    for stream in running:
        with pytest.raises(EngineDeadError, match="worker 0 died"):
            list(stream)
    with pytest.raises(EngineDeadError, match="worker 0 died"):
        client.stats()


def test_undecodable_and_unreadable_replies(client: Client) -> None:
    with pytest.raises(ProtocolError):
        list(client.generate("garbage"))
    with pytest.raises(RemoteError, match="could not read"):
        client.generate("unreadable", stream=False)
    assert client.stats() == {"num_active": 0}  # neither kills the client


def test_duplicate_request_id_and_closed_client(server: FakeFrontend) -> None:
    client = Client(server.address, timeout_s=2.0)
    stream = client.generate("dup", max_tokens=10**6, request_id="same")
    with pytest.raises(ValueError, match="already in progress"):
        client.generate("dup", request_id="same")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)
    with pytest.raises(RuntimeError, match="closed"):
        client.stats()
    client.close()  # idempotent


# ---- async client ---------------------------------------------------------------------------------------


def test_async_many_concurrent_tasks(server: FakeFrontend) -> None:
    async def stream_one(client: AsyncClient, prompt: str, n: int) -> None:
        events = [ev async for ev in client.generate(prompt, max_tokens=n)]
        check_stream(events, prompt, n)

    async def complete_one(client: AsyncClient, prompt: str, n: int) -> None:
        result = await (client.complete(prompt, max_tokens=n) if n % 2 else
                        client.generate(prompt, max_tokens=n, stream=False))
        assert (result.token_ids, result.finish_reason) == expected(prompt, n)
        assert result.text == text_of(result.token_ids) and result.prompt_token_ids == prompt_ids(prompt)

    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=2.0) as client:
            jobs = [stream_one(client, f"s{i}", 5 + i) for i in range(20)]
            jobs += [complete_one(client, f"c{i}", 3 + i) for i in range(20)]
            jobs += [client.stats() for _ in range(5)]
            results = await asyncio.gather(*jobs)
            assert all(isinstance(r, dict) for r in results[40:])
            assert await client.stats() == {"num_active": 0}

    asyncio.run(asyncio.wait_for(main(), 10))
    assert len(server.requests(GenerateRequest)) == 40


def test_async_abort_priority_and_errors(server: FakeFrontend) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=2.0) as client:
            with pytest.raises(ValueError):
                client.generate("x", top_p=2.0)  # raised at the call, before anything is awaited
            stream = client.generate("long", max_tokens=10**6)
            first = await stream.__anext__()
            assert not first.finished
            await client.update_priority(stream.request_id, 5)
            await client.abort(stream.request_id)
            rest = [ev async for ev in stream]
            assert rest[-1].finish_reason == "abort"
            with pytest.raises(RemoteError, match="unknown request"):
                await client.abort(stream.request_id)
            with pytest.raises(RemoteError, match="prompt rejected"):
                await client.complete("reject me")
            async with client.generate("closed early", max_tokens=10**6) as early:
                async for _ in early:
                    break
            assert await client.stats() == {"num_active": 0}
            assert len(server.requests(AbortRequest)) == 3

    asyncio.run(asyncio.wait_for(main(), 10))
    assert server.requests(GenerateRequest)[0].prompt == "long"


def test_async_fatal_error_fails_every_task(server: FakeFrontend) -> None:
    async def drain(client: AsyncClient, prompt: str) -> None:
        async for _ in client.generate(prompt, max_tokens=10**6):
            pass

    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=2.0) as client:
            tasks = [asyncio.create_task(drain(client, f"r{i}")) for i in range(5)]
            tasks.append(asyncio.create_task(client.complete("never", max_tokens=10**6)))
            await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(client.complete("crash")))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) and "worker 0 died" in str(r) for r in results), results
            with pytest.raises(EngineDeadError):
                await client.stats()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_async_silence_raises_engine_dead(server: FakeFrontend) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=0.3) as client:
            stream = client.generate("running", max_tokens=10**6)
            await stream.__anext__()
            quiet = asyncio.create_task(client.complete("silence"))
            start = time.monotonic()
            results = await asyncio.gather(quiet, client.stats(), return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert 0.25 <= time.monotonic() - start < 2.0
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass

    asyncio.run(asyncio.wait_for(main(), 10))


def test_async_keepalives_keep_the_call_alive(server: FakeFrontend) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=SLOW_S / 2) as client:
            events = [ev async for ev in client.generate("slow start", max_tokens=4)]
            check_stream(events, "slow start", 4)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_bad_address_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot connect"):
        Client("nonsense")
    with pytest.raises(ValueError, match="cannot connect"):
        AsyncClient("tcp://")


@pytest.mark.parametrize("arrives", ["before the cancel", "not at all"])
def test_a_cancelled_wait_for_an_event_neither_swallows_the_cancel_nor_loses_the_event(arrives):
    """The race behind a stream that kept running after its HTTP client hung up: an event lands in the inbox
    just as the waiting task is cancelled (Python 3.11's asyncio.wait_for then returned it and dropped the
    cancellation). The cancellation must go on, and the event stay first in line for whoever reads next."""
    import asyncio

    from fs_engine.client import _get_within

    async def main() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        inbox.put_nowait("later")  # (taken below, so the waiter waits on an empty inbox)
        assert inbox.get_nowait() == "later"
        waiter = asyncio.ensure_future(_get_within(inbox, 10.0))
        for _ in range(3):
            await asyncio.sleep(0)  # it waits now
        if arrives == "before the cancel":
            inbox.put_nowait("event")
            inbox.put_nowait("next")
            await asyncio.sleep(0)  # the inbox's getter takes "event"; the waiter has not resumed yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        left = [inbox.get_nowait() for _ in range(inbox.qsize())]
        assert left == (["event", "next"] if arrives == "before the cancel" else [])
        assert await _get_within(inbox, 0.01) is not None  # a timeout, not an error

    asyncio.run(main())
