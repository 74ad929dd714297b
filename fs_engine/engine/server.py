"""The frontend server: clients on a ZeroMQ ROUTER socket, one ``LLMEngine`` stepping in this process.

Loop: drain client messages (without waiting while the engine has work) -> ``engine.begin_step()`` -> while
the workers compute it, send each request's new tokens and text of the previous step to its client and take
in new client messages -> ``engine.end_step()``. A client names its requests itself; ids are kept apart per
client. Bad input gets an ``ErrorReply`` and the server keeps serving the others. A client that vanished is
noticed on the next send to it (streamed tokens, or a ``KeepAlive`` every second) and its requests are
aborted, so their KV is freed. If the engine dies (a worker or the swap process is gone; checked every step
and once a second when idle), every pending request gets a fatal ``ErrorReply`` and ``serve`` returns a
non-zero exit code.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import sys
import time
import traceback
import uuid
from typing import Any

import zmq

from fs_engine.engine.limits import ClientLimits
from fs_engine.engine.llm_engine import LLMEngine
from fs_engine.request import RequestOutput
from fs_engine.sampling_params import SamplingParams
from ipc.channels import PeerBusy, PeerGone, Router
from ipc.errors import EngineDeadError, ProtocolError
from ipc.messages import (
    AbortRequest,
    Ack,
    ErrorReply,
    GenerateRequest,
    KeepAlive,
    StatsReply,
    StatsRequest,
    TokenEvent,
    UpdatePriority,
)

KEEPALIVE_S = 1.0


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclasses.dataclass
class _Pending:
    identity: bytes
    client_id: str
    stream: bool
    holdback: int  # trailing characters kept back while they could still start a stop string
    num_prompt_tokens: int = 0
    tokens_sent: int = 0
    chars_sent: int = 0
    first: bool = True


class FrontendServer:
    def __init__(self, engine: LLMEngine, address: str, limits: ClientLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or ClientLimits()
        self.ctx = zmq.Context()
        self.router = Router(self.ctx, address)
        self.address = self.router.address
        self._pending: dict[str, _Pending] = {}
        self._load: dict[bytes, list[int]] = {}  # client -> [requests in flight, their prompt tokens]
        self._outbox: dict[bytes, collections.deque] = {}  # messages a busy client has not taken yet
        self._stop = False
        self._last_keepalive = 0.0

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    # ---- the loop ----------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until ``request_stop``; 0 on a clean stop, 1 if the engine died."""
        code = 0
        try:
            while not self._stop:
                busy = self.engine.has_unfinished_requests()
                self._drain(timeout_s=0 if busy else 0.05)
                began = self.engine.begin_step()
                # while the workers compute: stream the last step's tokens, take in new requests and aborts
                # (they apply from the next plan)
                self._deliver(self.engine.take_outputs())
                if began:
                    self._drain(timeout_s=0)
                self.engine.end_step()
                if self._outbox:
                    self._flush()
                self._keepalive()
        except EngineDeadError as e:
            print(f"fs-engine: the engine died, shutting down: {e}", file=sys.stderr, flush=True)
            # clients learn what died and why in one line; tracebacks (file paths, code) stay in this log
            self._fail_all(f"the engine died: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            code = 1
        finally:
            if code == 0:
                self._fail_all("the engine is shutting down")
            self.close()
        return code

    def close(self) -> None:
        self.engine.shutdown()
        self.router.close()
        self.ctx.term()

    def _drain(self, timeout_s: float) -> None:
        while (item := self.router.recv(timeout_s=timeout_s)) is not None:
            timeout_s = 0
            identity, msg = item
            try:
                self._handle(identity, msg)
            except EngineDeadError:
                raise
            except Exception:  # noqa: BLE001 - one client's message never takes the engine down
                # the client learns that it failed and an id to quote; the traceback stays in this log
                error_id = uuid.uuid4().hex[:12]
                print(f"fs-engine: internal error {error_id} handling {type(msg).__name__} from client "
                      f"{identity.hex()}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                request_id = getattr(msg, "request_id", "")
                request_id = request_id if isinstance(request_id, str) else ""
                key = self._key(identity, request_id)
                self._forget(key)
                if isinstance(msg, GenerateRequest) and key in self.engine.scheduler.requests:
                    self.engine.abort(key)  # it got in before the failure: nobody would read its tokens
                self._send(identity, ErrorReply(request_id, f"internal error {error_id}: the request failed "
                                                            f"(the server's log has the details); the engine "
                                                            f"serves on"))

    # ---- client messages ---------------------------------------------------------------------------------
    def _handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, ProtocolError):
            return self._send(identity, ErrorReply("", f"malformed message: {msg}"))
        if isinstance(msg, GenerateRequest):
            return self._generate(identity, msg)
        if isinstance(msg, AbortRequest):
            key = self._key(identity, msg.request_id)
            try:
                self.engine.abort(key)
            except ValueError as e:
                return self._send(identity, ErrorReply(msg.request_id, str(e)))
            pending = self._forget(key)
            if pending is not None:  # the generate call ends, telling why
                self._send(identity, TokenEvent(msg.request_id, finished=True, finish_reason="abort"))
            return self._send(identity, Ack(msg.request_id))
        if isinstance(msg, UpdatePriority):
            try:
                self.engine.update_priority(self._key(identity, msg.request_id), msg.priority)
            except ValueError as e:
                return self._send(identity, ErrorReply(msg.request_id, str(e)))
            return self._send(identity, Ack(msg.request_id))
        if isinstance(msg, StatsRequest):
            stats: dict[str, Any] = dict(self.engine.stats())
            executor = self.engine.executor
            if hasattr(executor, "child_pids"):  # for operators (and tests) watching the processes
                stats.update(child_pids=executor.child_pids(), worker_pids=list(executor.worker_pids),
                             swap_pid=executor.swap_pid, run_dir=str(executor.run_dir))
            return self._send(identity, StatsReply(msg.request_id, stats))
        self._send(identity, ErrorReply("", f"unexpected message {type(msg).__name__} from a client"))

    @staticmethod
    def _key(identity: bytes, request_id: str) -> str:
        return f"{identity.hex()}/{request_id}"

    def _generate(self, identity: bytes, msg: GenerateRequest) -> None:
        key = self._key(identity, msg.request_id)
        try:
            unknown = set(msg.params) - _SAMPLING_FIELDS
            if unknown:
                raise ValueError(f"unknown sampling parameters {sorted(unknown)}; valid: {sorted(_SAMPLING_FIELDS)}")
            params = SamplingParams(**msg.params)
            prompt = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
            if prompt is None:
                raise ValueError("give a prompt: text or prompt_token_ids")
            if not isinstance(msg.priority, int) or not isinstance(msg.tenant, str):
                raise ValueError("priority must be an integer and tenant a string")
            if key in self._pending:
                raise ValueError(f"request id {msg.request_id!r} is already in use by this client")
            limits, load = self.limits, self._load.setdefault(identity, [0, 0])
            if load[0] >= limits.max_requests:
                raise ValueError(f"this client has {load[0]} requests in flight, the limit "
                                 f"(max_requests_per_client) is {limits.max_requests}: wait for some to finish")
            if isinstance(prompt, str) and len(prompt.encode()) > limits.max_prompt_bytes:
                raise ValueError(f"a prompt of {len(prompt.encode())} bytes is over the limit "
                                 f"(max_prompt_bytes) of {limits.max_prompt_bytes}")
            self.engine.add_request(key, prompt, params, priority=msg.priority, tenant=msg.tenant,
                                    session_id=msg.session_id)
            num_prompt = self.engine.scheduler.requests[key].num_prompt_tokens
            if load[1] + num_prompt > limits.max_prompt_tokens:
                self.engine.abort(key)
                raise ValueError(f"this client's requests in flight would hold {load[1] + num_prompt} prompt "
                                 f"tokens, the limit (max_prompt_tokens_per_client) is {limits.max_prompt_tokens}")
        except (ValueError, TypeError) as e:
            return self._send(identity, ErrorReply(msg.request_id, str(e)))
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._pending[key] = _Pending(identity, msg.request_id, msg.stream, holdback, num_prompt)
        load[0] += 1
        load[1] += num_prompt

    # ---- outputs -----------------------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is None:
                continue
            if out.finished:
                self._forget(out.request_id)
            if out.error is not None:  # an internal error failed this request alone
                self._send(pending.identity, ErrorReply(pending.client_id, out.error))
                continue
            if not pending.stream and not out.finished:
                continue
            # stream: only what is new; text that might still turn into a stop string is held back
            end = len(out.text) if out.finished else max(pending.chars_sent, len(out.text) - pending.holdback)
            event = TokenEvent(
                pending.client_id,
                token_ids=out.token_ids[pending.tokens_sent :],
                text=out.text[pending.chars_sent : end],
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_cached_tokens=out.num_cached_tokens,
                prompt_token_ids=out.prompt_token_ids if pending.first else None,
            )
            pending.tokens_sent, pending.chars_sent, pending.first = len(out.token_ids), end, False
            self._send(pending.identity, event)

    def _forget(self, key: str) -> _Pending | None:
        """The client's request ends (finished, aborted, failed): it no longer counts against its limits."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            load = self._load[pending.identity]
            load[0] -= 1
            load[1] -= pending.num_prompt_tokens
            if load[0] == 0:
                del self._load[pending.identity]
        return pending

    def _send(self, identity: bytes, msg: Any) -> None:
        """To one client, in order. A client whose queue is full (it is not reading) has its messages kept
        here until it reads; past ``max_queued_messages`` its requests are aborted (they would only pile up)."""
        outbox = self._outbox.get(identity)
        if outbox is not None:
            outbox.append(msg)
            if len(outbox) > self.limits.max_queued_messages:
                del self._outbox[identity]
                print(f"fs-engine: client {identity.hex()} read none of its last {len(outbox)} messages: "
                      f"aborting its requests (max_queued_messages)", file=sys.stderr, flush=True)
                self._client_gone(identity)
            return
        try:
            self.router.send(identity, msg)
        except PeerBusy:
            self._outbox[identity] = collections.deque([msg])
        except PeerGone:
            self._client_gone(identity)

    def _flush(self) -> None:
        """Send what busy clients have read room for since."""
        for identity in list(self._outbox):
            outbox = self._outbox[identity]
            try:
                while outbox:
                    self.router.send(identity, outbox[0])
                    outbox.popleft()
            except PeerBusy:
                continue
            except PeerGone:
                del self._outbox[identity]
                self._client_gone(identity)
                continue
            del self._outbox[identity]

    def _client_gone(self, identity: bytes) -> None:
        """The client disconnected (or stopped reading): abort its requests so their KV is freed."""
        self._outbox.pop(identity, None)
        for key in [k for k, p in self._pending.items() if p.identity == identity]:
            self._forget(key)
            if key in self.engine.scheduler.requests:
                self.engine.abort(key)

    def _keepalive(self) -> None:
        """Once a second: make sure the engine's processes are alive (an idle server must notice a dead child
        too) and tell each client with requests in flight that we are."""
        now = time.monotonic()
        if now - self._last_keepalive < KEEPALIVE_S:
            return
        self._last_keepalive = now
        self.engine.check_health()
        for identity in {p.identity for p in self._pending.values()}:
            self._send(identity, KeepAlive())

    def _fail_all(self, message: str) -> None:
        for pending in list(self._pending.values()):
            try:
                self.router.send(pending.identity, ErrorReply(pending.client_id, message, fatal=True))
            except (PeerGone, PeerBusy):
                pass
        self._pending.clear()
        self._load.clear()
