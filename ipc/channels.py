"""Typed wrappers over ZeroMQ sockets: every frame is one encoded message (``ipc.codec``).

- ``Pusher`` / ``Puller``: one-way pipelines (plans to workers, results and swap completions back).
- ``Router``: the frontend's client socket; every client is a ``Dealer`` with its own identity. The router
  is ``ROUTER_MANDATORY``: sending to a client that has gone away raises ``PeerGone`` instead of dropping
  the message silently, which is how the frontend learns a client disconnected mid-stream.

Client identities. A client's routing id is how the frontend tells its requests from everyone else's, so
nobody may guess or take another's. SDK clients pick 16 random bytes (``new_routing_id``); libzmq refuses a
second connection that claims a routing id in use. Clients that set none are numbered by libzmq from a
counter that libc's ``rand()`` starts, which nothing seeds: every process would hand out the same ids from
the same start, and a client that claimed the next one made libzmq abort (an assertion) when the client it
belonged to connected. The router seeds ``rand()`` from the OS first, so that start is unguessable, and no
reply ever names a routing id. With CURVE (``CurveKeys``) the frontend also knows which key each message
came from (``Router.last_user_id``), checked by ``zmq.auth`` against the keys the operator lists.

Receives take a timeout so that no caller ever blocks forever on a dead peer.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ipc.codec import decode, encode
from ipc.errors import ProtocolError


class PeerGone(ConnectionError):
    """The client this message was for has disconnected."""


class PeerBusy(BlockingIOError):
    """The client's send queue is full (it is not reading): the message was not sent, try again later."""


class _Channel:
    def __init__(self, ctx: zmq.Context, kind: int, address: str, bind: bool,
                 configure: Callable[[zmq.Socket], None] | None = None) -> None:
        """``configure`` sets what must be set before the socket binds or connects (security, identity)."""
        self.address = address
        self.socket = ctx.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if configure is not None:
                configure(self.socket)
            if bind:
                self.socket.bind(address)
                if address.startswith("tcp://") and address.endswith(":0"):
                    self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self.socket.connect(address)
        except BaseException:
            self.socket.close(linger=0)  # a port in use, a bad address: no socket left open
            raise

    def poll(self, timeout_s: float | None) -> bool:
        return bool(self.socket.poll(None if timeout_s is None else int(timeout_s * 1000)))

    def close(self, linger_s: float = 0.0) -> None:
        """Close; ``linger_s``: how long messages still queued (a last ``Shutdown``) may take to leave."""
        self.socket.close(linger=int(linger_s * 1000))


class Pusher(_Channel):
    def __init__(self, ctx: zmq.Context, address: str, bind: bool = False) -> None:
        super().__init__(ctx, zmq.PUSH, address, bind)

    def send(self, msg: Any, timeout_s: float | None = None) -> bool:
        """Send; with a timeout, give up (False) if no peer takes it in time. A PUSH socket with no
        connected peer (it died) blocks forever on a plain send: callers that can outlive a peer pass a
        timeout and check the peer's health between tries."""
        return self.send_frame(encode(msg), timeout_s)

    def send_frame(self, frame: bytes, timeout_s: float | None = None) -> bool:
        """``send`` of a message encoded already (one encoding sent to several peers)."""
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000), zmq.POLLOUT):
            return False
        self.socket.send(frame, copy=False)
        return True


class Puller(_Channel):
    def __init__(self, ctx: zmq.Context, address: str, bind: bool = True) -> None:
        super().__init__(ctx, zmq.PULL, address, bind)

    def recv(self, timeout_s: float | None = None) -> Any | None:
        """The next message, or None when none arrived within the timeout."""
        if not self.poll(timeout_s):
            return None
        return decode(self.socket.recv(copy=False).bytes)


MAX_CLIENT_FRAME_BYTES = 16 << 20  # a client frame over this is refused by libzmq before it is buffered
ZAP_DOMAIN = b"fs-engine"


def new_routing_id() -> bytes:
    """A client's own routing id: 16 random bytes, the first never zero (libzmq keeps those for the ids it
    numbers itself), so that no other client can guess it or collide with it."""
    return bytes([1 + secrets.randbelow(255)]) + secrets.token_bytes(15)


def _seed_routing_ids() -> None:
    """Start libzmq's routing-id counter (libc ``rand()``) somewhere unguessable (see the module docstring)."""
    try:
        ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))
    except (OSError, AttributeError):  # no C library to seed (not a POSIX system): its ids stay as they are
        pass


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE key pair (Z85 text, as ``zmq.auth.create_certificates`` writes them) and, for a client, the
    server's public key. ``fs-engine keys`` makes certificate files; ``load`` reads them."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path | None = None) -> CurveKeys:
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(str(secret_file))
            server = zmq.auth.load_certificate(str(server_public_file))[0] if server_public_file else None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read a CURVE certificate: {e} (make one with `fs-engine keys`)") from e
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key: pass the .key_secret file of the pair")
        return cls(public, secret, server)

    def apply_client(self, socket: zmq.Socket) -> None:
        if self.server_public is None:
            raise ValueError("a CURVE client needs the server's public key")
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_serverkey = self.server_public


def client_socket_options(socket: zmq.Socket, curve: CurveKeys | None = None) -> None:
    """What every client socket sets before it connects: its own unguessable routing id and, for a frontend
    that authenticates clients, its CURVE keys."""
    socket.setsockopt(zmq.ROUTING_ID, new_routing_id())
    if curve is not None:
        curve.apply_client(socket)


class Router(_Channel):
    """``curve``: the server's key pair; then only clients whose keys ``zmq.auth`` accepts (an authenticator
    the caller starts on the same context) can connect, and ``last_user_id`` names the key of the message
    ``recv`` returned last."""

    def __init__(self, ctx: zmq.Context, address: str, max_frame_bytes: int = MAX_CLIENT_FRAME_BYTES,
                 curve: CurveKeys | None = None) -> None:
        _seed_routing_ids()
        self.curve = curve
        self.last_user_id: str | None = None
        self.max_frame_bytes = max_frame_bytes
        super().__init__(ctx, zmq.ROUTER, address, bind=True, configure=self._configure)

    def _configure(self, socket: zmq.Socket) -> None:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a peer that sends more is disconnected by libzmq at once: an oversized frame is never read in full
        # (and so never stalls the engine loop); a client's frames are decoded with every field checked
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        if self.curve is not None:
            socket.curve_server = True
            socket.curve_secretkey, socket.curve_publickey = self.curve.secret, self.curve.public
            socket.zap_domain = ZAP_DOMAIN

    def recv(self, timeout_s: float | None = 0) -> tuple[bytes, Any] | None:
        """(client identity, message or ProtocolError) or None. A malformed frame is returned as the error
        so the caller can answer that client and keep serving the others."""
        if not self.poll(timeout_s):
            return None
        frames = self.socket.recv_multipart(copy=False)
        identity, payload = frames[0].bytes, frames[-1]
        if self.curve is not None:
            self.last_user_id = payload.get("User-Id")
        if len(frames) != 2:
            return identity, ProtocolError(f"expected one message frame, got {len(frames) - 1}")
        try:
            return identity, decode(payload.bytes, checked=True, max_bytes=self.max_frame_bytes)
        except ProtocolError as e:
            return identity, e

    def send(self, identity: bytes, msg: Any) -> None:
        try:
            self.socket.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK)
        except zmq.error.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise PeerGone(identity) from e
            if e.errno == zmq.EAGAIN:  # its queue is full: backpressure, not a disconnect
                raise PeerBusy(identity) from e
            raise


class Dealer(_Channel):
    def __init__(self, ctx: zmq.Context, address: str, curve: CurveKeys | None = None) -> None:
        super().__init__(ctx, zmq.DEALER, address, bind=False,
                         configure=lambda socket: client_socket_options(socket, curve))

    def send(self, msg: Any) -> None:
        self.socket.send(encode(msg))

    def recv(self, timeout_s: float | None = None) -> Any | None:
        if not self.poll(timeout_s):
            return None
        return decode(self.socket.recv())


RUN_DIR_PREFIX = "fs-engine-"
OWNER_FILE = "owner.pid"
PROCESSES_FILE = "processes.json"  # the engine's process ids: {"frontend", "workers", "swap", "children"}


def instance_dir() -> Path:
    """A fresh directory for one engine's ipc:// endpoints (and CPU shared-memory arenas), so that two
    engines on one machine never share a socket path. It names its owner (this process), and making one
    first removes the directories of owners that are gone (killed with their whole process group, so that
    nobody was left to clean up): a dead engine's arenas do not hold memory until the next reboot."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    reap_run_dirs(Path(base or tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=base))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def reap_run_dirs(base: Path) -> list[Path]:
    """Remove run directories under ``base`` whose owner process is gone; returns them. A directory without
    an owner file (or an unreadable one) is left alone: nothing says it is stale."""
    reaped = []
    for path in base.glob(RUN_DIR_PREFIX + "*"):
        try:
            owner = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            reaped.append(path)
    return reaped


def ipc_address(run_dir: Path, name: str) -> str:
    return f"ipc://{run_dir / name}"
