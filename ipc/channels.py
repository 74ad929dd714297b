"""Typed wrappers over ZeroMQ sockets: every frame is one encoded message (``ipc.codec``).

- ``Pusher`` / ``Puller``: one-way pipelines (plans to workers, results and swap completions back).
- ``Router``: the frontend's client socket; every client is a ``Dealer`` with its own identity. The router
  is ``ROUTER_MANDATORY``: sending to a client that has gone away raises ``PeerGone`` instead of dropping
  the message silently, which is how the frontend learns a client disconnected mid-stream.

Receives take a timeout so that no caller ever blocks forever on a dead peer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    def __init__(self, ctx: zmq.Context, kind: int, address: str, bind: bool) -> None:
        self.address = address
        self.socket = ctx.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        if bind:
            self.socket.bind(address)
            if address.startswith("tcp://") and address.endswith(":0"):
                self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.socket.connect(address)

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


class Router(_Channel):
    def __init__(self, ctx: zmq.Context, address: str, max_frame_bytes: int = MAX_CLIENT_FRAME_BYTES) -> None:
        super().__init__(ctx, zmq.ROUTER, address, bind=True)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a peer that sends more is disconnected by libzmq at once: an oversized frame is never read in full
        # (and so never stalls the engine loop); a client's frames are decoded with every field checked
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes

    def recv(self, timeout_s: float | None = 0) -> tuple[bytes, Any] | None:
        """(client identity, message or ProtocolError) or None. A malformed frame is returned as the error
        so the caller can answer that client and keep serving the others."""
        if not self.poll(timeout_s):
            return None
        frames = self.socket.recv_multipart()
        identity, payload = frames[0], frames[-1]
        if len(frames) != 2:
            return identity, ProtocolError(f"expected one message frame, got {len(frames) - 1}")
        try:
            return identity, decode(payload, checked=True, max_bytes=self.max_frame_bytes)
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
    def __init__(self, ctx: zmq.Context, address: str) -> None:
        super().__init__(ctx, zmq.DEALER, address, bind=False)

    def send(self, msg: Any) -> None:
        self.socket.send(encode(msg))

    def recv(self, timeout_s: float | None = None) -> Any | None:
        if not self.poll(timeout_s):
            return None
        return decode(self.socket.recv())


RUN_DIR_PREFIX = "fs-engine-"
OWNER_FILE = "owner.pid"


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
