"""The frontend's sends to one client: a full queue is backpressure (kept, in order, sent when the client reads),
never a disconnect; past ``max_queued_messages`` unread, that client's requests are aborted and nobody else's."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fs_engine.engine.limits import ClientLimits
from fs_engine.engine.server import FrontendServer, _Pending
from ipc.channels import PeerBusy, PeerGone
from fs_engine.request import RequestOutput
from ipc.messages import Ack, TokenEvent


class FakeRouter:
    """Takes ``room`` messages per client, then raises PeerBusy until ``read`` makes room again."""

    def __init__(self, room: int) -> None:
        self.room: dict[bytes, int] = {}
        self.default_room = room
        self.sent: dict[bytes, list] = {}
        self.gone: set[bytes] = set()

    def send(self, identity: bytes, msg) -> None:
        if identity in self.gone:
            raise PeerGone(identity)
        if self.room.setdefault(identity, self.default_room) == 0:
            raise PeerBusy(identity)
        self.room[identity] -= 1
        self.sent.setdefault(identity, []).append(msg)

    def read(self, identity: bytes, n: int) -> None:
        self.room[identity] = self.room.get(identity, 0) + n

    def close(self) -> None:
        pass


def make_server(room: int, max_queued: int):
    aborted = []
    requests = {}
    engine = SimpleNamespace(scheduler=SimpleNamespace(requests=requests), abort=lambda key: aborted.append(key))
    server = FrontendServer.__new__(FrontendServer)  # no sockets: the send logic alone
    server.engine, server.limits = engine, ClientLimits(max_queued_messages=max_queued)
    server.router = FakeRouter(room)
    server._pending, server._load, server._tenant_load, server._outbox, server._unsent = {}, {}, {}, {}, {}
    server._tokenizing = {}
    for client in (b"slow", b"fast"):
        key = server._key(client, "r")
        server._pending[key] = _Pending(client, "r", True, 0, client.decode(), 4)
        server._load[client] = [1, 4]
        server._tenant_load[client.decode()] = [1, 4]
        requests[key] = object()
    return server, aborted


def _output(key: str, n: int, finished: bool = False) -> RequestOutput:
    tokens = list(range(n))
    return RequestOutput(key, None, [1], tokens, "".join(chr(97 + t % 26) for t in tokens), finished,
                         "length" if finished else None)


def test_a_full_queue_keeps_the_messages_in_order_until_the_client_reads():
    server, aborted = make_server(room=3, max_queued=100)
    events = [TokenEvent("r", [i]) for i in range(10)]
    for event in events:
        server._send(b"slow", event)
        server._send(b"fast", event)
        server.router.read(b"fast", 1)  # this one reads as it goes
    assert server.router.sent[b"fast"] == events and b"fast" not in server._outbox
    assert server.router.sent[b"slow"] == events[:3] and len(server._outbox[b"slow"]) == 7
    server.router.read(b"slow", 4)
    server._flush()
    assert server.router.sent[b"slow"] == events[:7]
    server.router.read(b"slow", 100)
    server._flush()
    assert server.router.sent[b"slow"] == events and not server._outbox
    assert not aborted  # backpressure is not a disconnect


def test_past_the_bound_only_the_unread_clients_requests_are_aborted():
    server, aborted = make_server(room=2, max_queued=5)
    for i in range(20):
        server._send(b"slow", TokenEvent("r", [i]))
        server._send(b"fast", TokenEvent("r", [i]))
        server.router.read(b"fast", 1)
    assert aborted == [server._key(b"slow", "r")]
    assert server._key(b"fast", "r") in server._pending and b"slow" not in server._load
    assert len(server.router.sent[b"fast"]) == 20


def test_a_client_that_disconnects_while_queued_has_its_requests_aborted():
    server, aborted = make_server(room=1, max_queued=100)
    server._send(b"slow", TokenEvent("r", [1]))
    server._send(b"slow", TokenEvent("r", [2]))
    server.router.gone.add(b"slow")
    server._flush()
    assert aborted == [server._key(b"slow", "r")] and not server._outbox


def test_a_busy_clients_stream_events_merge_and_arrive_whole_and_in_order_when_it_reads():
    """Its buffer is one output per stream, whatever the number of steps it does not read for."""
    server, aborted = make_server(room=2, max_queued=5)
    slow, fast = server._key(b"slow", "r"), server._key(b"fast", "r")
    for n in range(1, 101):  # 100 steps, one token each
        server._deliver([_output(slow, n, finished=n == 100), _output(fast, n, finished=n == 100)])
        server.router.read(b"fast", 1)
        if n == 50:
            server._send(b"slow", Ack("x"))  # a control reply queued while it is busy keeps its place
    assert len(server.router.sent[b"fast"]) == 100 and not aborted
    assert len(server._outbox[b"slow"]) == 1 and server._unsent[b"slow"][slow].unsent.finished
    server.router.read(b"slow", 100)
    server._flush()
    sent = server.router.sent[b"slow"]
    assert len(sent) == 4 and sent[2] == Ack("x")  # two events, the ack, then everything since in one event
    tokens = [t for ev in sent if isinstance(ev, TokenEvent) for t in ev.token_ids]
    text = "".join(ev.text for ev in sent if isinstance(ev, TokenEvent))
    assert tokens == list(range(100)) and text == _output(slow, 100).text and sent[-1].finished
    assert not server._outbox and not server._unsent and slow not in server._pending


def test_an_aborted_stream_of_a_busy_client_sends_nothing_after_its_end():
    server, _ = make_server(room=1, max_queued=5)
    slow = server._key(b"slow", "r")
    server._deliver([_output(slow, 1)])
    server._deliver([_output(slow, 2)])  # busy now: held
    server._forget(slow)
    server._send(b"slow", TokenEvent("r", finished=True, finish_reason="abort"))
    server.router.read(b"slow", 10)
    server._flush()
    sent = server.router.sent[b"slow"]
    assert [ev.token_ids for ev in sent] == [[0], []] and sent[-1].finish_reason == "abort"


def test_when_the_engine_dies_messages_not_read_yet_are_answered_too():
    import zmq

    from ipc.channels import Dealer, Router
    from ipc.messages import ErrorReply, GenerateRequest, StatsRequest

    ctx = zmq.Context()
    router = Router(ctx, "tcp://127.0.0.1:0")
    dealer = Dealer(ctx, router.address)
    try:
        server = FrontendServer.__new__(FrontendServer)  # the sockets only
        server.router = router
        dealer.send(GenerateRequest("g", None, prompt_token_ids=[1]))
        dealer.send(StatsRequest("s"))
        time.sleep(0.2)
        server._refuse_queued("the engine died: worker gone")
        replies = [dealer.recv(timeout_s=2) for _ in range(2)]
        assert [(r.request_id, r.fatal) for r in replies] == [("g", True), ("s", True)]
        assert all(isinstance(r, ErrorReply) and "worker gone" in r.message for r in replies)
    finally:
        dealer.close()
        router.close()
        ctx.term()
