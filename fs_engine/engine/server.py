"""The frontend server: clients on a ZeroMQ ROUTER socket, one ``LLMEngine`` stepping in this process.

Loop: drain client messages (without waiting while the engine has work, and for at most ``DRAIN_BUDGET_S``)
-> ``engine.begin_step()`` -> while the workers compute it, send each request's new tokens and text of the
previous step to its client and take in new client messages -> ``engine.end_step()``. A client names its
requests itself; ids are kept apart per client (its routing id, see ``ipc.channels``).

What one client may cost the others is bounded (``ClientLimits``, per client and per tenant; over a limit an
immediate error that names it); long text prompts are tokenized on a thread. Bad input gets an
``ErrorReply`` and the server keeps serving the others; an exception while handling one message or request
fails that request only (an error id to the client, the traceback to this process's log). A client that
does not read is backpressure, not a disconnect: its replies wait here in order and its streams' events
merge until it reads. A client that vanished is noticed on the next send to it (streamed tokens, or a
``KeepAlive`` every second) and its requests are aborted, so their KV is freed. With a keys file, only
clients with listed CURVE keys connect, and each runs as its key's tenant (``fs_engine.engine.auth``). If the
engine dies (a worker or the swap process is gone; checked every step and once a second when idle), every
pending request gets a fatal ``ErrorReply`` and ``serve`` returns a non-zero exit code.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import signal
import sys
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from fs_engine.engine.auth import CurveAuthenticator, Keys
from fs_engine.engine.limits import ClientLimits
from fs_engine.engine.llm_engine import LLMEngine
from fs_engine.request import RequestOutput
from fs_engine.sampling_params import SAMPLING_FIELDS, SamplingParams
from ipc.channels import CurveKeys, PeerBusy, PeerGone, Router
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
TOKENIZE_INLINE_CHARS = 16 << 10  # longer text prompts are tokenized off the engine loop
DRAIN_BUDGET_S = 0.005  # client messages handled between two steps, at most (the rest wait for the next)




@dataclasses.dataclass
class _Pending:
    identity: bytes
    client_id: str
    stream: bool
    holdback: int  # trailing characters kept back while they could still start a stop string
    tenant: str
    num_prompt_tokens: int = 0  # (0 while its text is being tokenized)
    unsent: RequestOutput | None = None  # its latest output, while its client is too busy to take it
    tokens_sent: int = 0
    chars_sent: int = 0
    first: bool = True


class FrontendServer:
    """``keys`` (with ``server_key``, the server's CURVE key pair): only clients whose keys it lists connect,
    and each request runs as its key's tenant (``fs_engine.engine.auth``)."""

    def __init__(self, engine: LLMEngine, address: str, limits: ClientLimits | None = None,
                 keys: Keys | None = None, server_key: CurveKeys | None = None) -> None:
        if (keys is None) != (server_key is None):
            raise ValueError("authenticating clients takes both the keys file and the server's key pair")
        self.engine = engine
        self.limits = limits or ClientLimits()
        self.keys = keys
        self.ctx = zmq.Context()
        self._auth = CurveAuthenticator(self.ctx, keys) if keys is not None else None
        try:
            self.router = Router(self.ctx, address, curve=server_key)
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self.ctx.term()
            raise
        self.address = self.router.address
        if hasattr(engine.executor, "on_wait"):
            engine.executor.on_wait = self._keepalive_while_waiting
        self._pending: dict[str, _Pending] = {}
        self._load: dict[bytes, list[int]] = {}  # client -> [requests in flight, their prompt tokens]
        self._tenant_load: dict[str, list[int]] = {}  # tenant -> the same, of all its clients
        self._tokenizing: dict[str, tuple[Future, GenerateRequest, SamplingParams]] = {}  # key -> its prompt's
        self._pool: ThreadPoolExecutor | None = None  # the tokenizing thread, started for the first long prompt
        self._bg_tokenizer: Any = None
        self._outbox: dict[bytes, collections.deque] = {}  # busy clients: the messages they have not taken yet
        self._unsent: dict[bytes, dict[str, _Pending]] = {}  # ... and their streams with output not sent yet
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
                self._drain(timeout_s=0 if busy else 0.01 if self._tokenizing else 0.05)
                if self._tokenizing:
                    self._admit_tokenized()
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
            reason = f"the engine died: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            self._fail_all(reason)
            self._refuse_queued(reason)
            code = 1
        finally:
            if code == 0:
                self._fail_all("the engine is shutting down")
            self.close()
        return code

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        self.router.close()
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    def _drain(self, timeout_s: float) -> None:
        """Handle client messages (waiting up to ``timeout_s`` for the first) for at most ``DRAIN_BUDGET_S``:
        a client that queued thousands of messages must not hold up the steps everyone else's tokens come from
        (libzmq reads the clients' queues in turn, so the others' messages are among the first handled)."""
        deadline = time.perf_counter() + DRAIN_BUDGET_S + timeout_s
        while time.perf_counter() < deadline and (item := self.router.recv(timeout_s=timeout_s)) is not None:
            timeout_s = 0
            identity, msg = item
            try:
                self._handle(identity, msg)
            except EngineDeadError:
                raise
            except Exception:  # noqa: BLE001 - one client's message never takes the engine down
                request_id = getattr(msg, "request_id", "")
                self._internal_error(identity, request_id if isinstance(request_id, str) else "",
                                     f"handling {type(msg).__name__}", isinstance(msg, GenerateRequest))

    # ---- client messages ---------------------------------------------------------------------------------
    def _handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, ProtocolError):
            return self._send(identity, ErrorReply("", f"malformed message: {msg}"))
        if isinstance(msg, GenerateRequest):
            return self._generate(identity, msg)
        if isinstance(msg, AbortRequest):
            key = self._key(identity, msg.request_id)
            try:
                if key not in self._tokenizing:  # (else it never reached the engine)
                    self.engine.abort(key)
            except ValueError as e:
                return self._send(identity, ErrorReply(msg.request_id, str(e)))
            pending = self._forget(key)
            if pending is not None:  # the generate call ends, telling why
                self._send(identity, TokenEvent(msg.request_id, finished=True, finish_reason="abort"))
            return self._send(identity, Ack(msg.request_id))
        if isinstance(msg, UpdatePriority):
            key = self._key(identity, msg.request_id)
            try:
                if key in self._tokenizing:  # it reaches the engine with the new priority
                    self._tokenizing[key][1].priority = msg.priority
                else:
                    self.engine.update_priority(key, msg.priority)
            except ValueError as e:
                return self._send(identity, ErrorReply(msg.request_id, str(e)))
            return self._send(identity, Ack(msg.request_id))
        if isinstance(msg, StatsRequest):
            # the engine's counters only: process ids and paths are in the run directory, for operators
            return self._send(identity, StatsReply(msg.request_id, dict(self.engine.stats())))
        self._send(identity, ErrorReply("", f"unexpected message {type(msg).__name__} from a client"))

    @staticmethod
    def _key(identity: bytes, request_id: str) -> str:
        return f"{identity.hex()}/{request_id}"

    def _generate(self, identity: bytes, msg: GenerateRequest) -> None:
        key = self._key(identity, msg.request_id)
        try:
            params, prompt, tenant = self._check_request(identity, key, msg)
        except (ValueError, TypeError) as e:
            return self._send(identity, ErrorReply(msg.request_id, str(e)))
        holdback = max((len(s) for s in params.stop), default=1) - 1
        pending = self._pending[key] = _Pending(identity, msg.request_id, msg.stream, holdback, tenant)
        self._count(pending, 1, 0)
        if isinstance(prompt, str) and len(prompt) > TOKENIZE_INLINE_CHARS and self.engine.tokenizer is not None:
            # a long text: tokenized on a thread (the tokenizer releases the GIL), admitted when done
            self._tokenizing[key] = (self._tokenize_pool().submit(self._tokenize, prompt), msg, params)
            return
        self._admit(key, pending, prompt, params, msg)

    def _check_request(self, identity: bytes, key: str, msg: GenerateRequest) -> tuple[SamplingParams, Any, str]:
        """(sampling params, prompt, tenant) of a request within every limit, or ValueError naming the one broken."""
        unknown = msg.params.keys() - SAMPLING_FIELDS
        if unknown:
            raise ValueError(f"unknown sampling parameters {sorted(unknown)}; valid: {sorted(SAMPLING_FIELDS)}")
        params = SamplingParams(**msg.params)
        prompt = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
        if prompt is None:
            raise ValueError("give a prompt: text or prompt_token_ids")
        tenant = self._tenant(msg.tenant)
        if key in self._pending:
            raise ValueError(f"request id {msg.request_id!r} is already in use by this client")
        limits = self.limits
        if len(params.stop) > limits.max_stop_strings:
            raise ValueError(f"{len(params.stop)} stop strings are over the limit (max_stop_strings) of "
                             f"{limits.max_stop_strings}")
        if any(len(stop) > limits.max_stop_length for stop in params.stop):
            raise ValueError(f"a stop string of {max(map(len, params.stop))} characters is over the limit "
                             f"(max_stop_length) of {limits.max_stop_length}")
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_bytes // 4:  # (4 bytes a character at most)
            size = len(prompt.encode(errors="replace"))
            if size > limits.max_prompt_bytes:
                raise ValueError(f"a prompt of {size} bytes is over the limit (max_prompt_bytes) of "
                                 f"{limits.max_prompt_bytes}")
        for load, limit, who in ((self._load.get(identity), limits.max_requests_per_client, "client"),
                                 (self._tenant_load.get(tenant), limits.max_requests_per_tenant, "tenant")):
            if load is not None and load[0] >= limit:
                raise ValueError(f"this {who} has {load[0]} requests in flight, the limit (max_requests_per_{who}) "
                                 f"is {limit}: wait for some to finish")
        return params, prompt, tenant

    def _tenant(self, claimed: str) -> str:
        """The tenant a request runs as: the one its CURVE key belongs to when keys are configured (a client may
        not claim another's), else whatever the client names."""
        if self.keys is None:
            return claimed
        bound = self.router.last_user_id  # the tenant of the key the message came with (CurveAuthenticator)
        if bound is None:
            raise ValueError("this message came without an authenticated key")
        if claimed not in (bound, "default"):
            raise ValueError(f"this client's key belongs to tenant {bound!r}: it may not send requests as "
                             f"{claimed[:64]!r}")
        return bound

    def _admit(self, key: str, pending: _Pending, prompt: Any, params: SamplingParams, msg: GenerateRequest) -> None:
        """Hand a checked request to the engine, and count its prompt tokens against the limits."""
        try:
            self.engine.add_request(key, prompt, params, priority=msg.priority, tenant=pending.tenant,
                                    session_id=msg.session_id)
            num_prompt = self.engine.scheduler.requests[key].num_prompt_tokens
            limits = self.limits
            for load, limit, who in ((self._load[pending.identity], limits.max_prompt_tokens_per_client, "client"),
                                     (self._tenant_load[pending.tenant], limits.max_prompt_tokens_per_tenant,
                                      "tenant")):
                if load[1] + num_prompt > limit:
                    self.engine.abort(key)
                    raise ValueError(f"this {who}'s requests in flight would hold {load[1] + num_prompt} prompt "
                                     f"tokens, the limit (max_prompt_tokens_per_{who}) is {limit}")
        except (ValueError, TypeError) as e:
            self._forget(key)
            return self._send(pending.identity, ErrorReply(msg.request_id, str(e)))
        pending.num_prompt_tokens = num_prompt
        self._count(pending, 0, num_prompt)

    def _tokenize_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # its own copy of the tokenizer: one instance is not to be used by two threads at once
            self._bg_tokenizer = copy.deepcopy(self.engine.tokenizer)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-engine-tokenize")
        return self._pool

    def _tokenize(self, text: str) -> list[int]:
        return list(self._bg_tokenizer(text).input_ids)  # as LLMEngine tokenizes text

    def _admit_tokenized(self) -> None:
        """Requests whose prompts the tokenizing thread has finished go to the engine."""
        for key in [k for k, (future, _, _) in self._tokenizing.items() if future.done()]:
            future, msg, params = self._tokenizing.pop(key)
            pending = self._pending[key]
            try:
                token_ids = future.result()
            except Exception as e:  # noqa: BLE001 - a prompt the tokenizer cannot take fails alone
                self._forget(key)
                self._send(pending.identity, ErrorReply(msg.request_id, f"the prompt could not be tokenized: "
                                                                        f"{type(e).__name__}"))
                continue
            self._admit(key, pending, token_ids, params, msg)

    def _count(self, pending: _Pending, requests: int, prompt_tokens: int) -> None:
        """Add to (or, negative, take from) what the request's client and tenant hold in flight."""
        for table, who in ((self._load, pending.identity), (self._tenant_load, pending.tenant)):
            load = table.setdefault(who, [0, 0])
            load[0] += requests
            load[1] += prompt_tokens
            if load[0] == 0:
                del table[who]

    # ---- outputs -----------------------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is None:
                continue
            try:
                self._deliver_one(pending, out)
            except Exception:  # noqa: BLE001 - one request's fault fails that request, not the server
                self._internal_error(pending.identity, pending.client_id, f"streaming request {out.request_id}",
                                     True)

    def _internal_error(self, identity: bytes, request_id: str, doing: str, fails_request: bool) -> None:
        """Something failed while handling one message or request (a bug): the traceback goes to this log with
        an error id, the client gets the id to quote, and (``fails_request``) its request ends, its KV freed."""
        error_id = uuid.uuid4().hex[:12]
        print(f"fs-engine: internal error {error_id} {doing} (client {identity.hex()}):\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        key = self._key(identity, request_id)
        if fails_request:
            self._forget(key)
            if key in self.engine.scheduler.requests:
                self.engine.abort(key)  # nobody would read its tokens
        self._send(identity, ErrorReply(request_id, f"internal error {error_id}: the request failed (the server's "
                                                    f"log has the details); the engine serves on"))

    def _deliver_one(self, pending: _Pending, out: RequestOutput) -> None:
        if out.finished:
            self._forget(out.request_id)
        if out.error is not None:  # an internal error failed this request alone
            self._send(pending.identity, ErrorReply(pending.client_id, out.error))
            return
        if not pending.stream and not out.finished:
            return
        if pending.identity in self._outbox:  # it is not reading: its streams merge until it does
            pending.unsent = out
            self._unsent.setdefault(pending.identity, {})[out.request_id] = pending
            return
        self._stream(pending, out)

    def _stream(self, pending: _Pending, out: RequestOutput) -> bool:
        """Send a request's output since its last event; False if its client is busy (nothing was sent)."""
        # only what is new; text that might still turn into a stop string is held back
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
        if out.logprobs is not None:
            new = out.logprobs[pending.tokens_sent :]
            event.logprob_ids = [list(entry) for entry in new]
            event.logprob_values = [list(entry.values()) for entry in new]
        if not self._try_send(pending.identity, event):
            pending.unsent = out
            self._unsent.setdefault(pending.identity, {})[out.request_id] = pending
            return False
        pending.tokens_sent, pending.chars_sent, pending.first, pending.unsent = len(out.token_ids), end, False, None
        return True

    def _forget(self, key: str) -> _Pending | None:
        """The client's request ends (finished, aborted, failed): it no longer counts against its limits."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._tokenizing.pop(key, None)  # (a prompt still being tokenized is dropped when it is done)
            unsent = self._unsent.get(pending.identity)
            if unsent is not None:
                unsent.pop(key, None)
            self._count(pending, -1, -pending.num_prompt_tokens)
        return pending

    def _send(self, identity: bytes, msg: Any) -> None:
        """To one client, in order. A client whose queue is full (it is not reading) has its messages kept
        here until it reads (its streams' events merge meanwhile, see ``_deliver``); past
        ``max_queued_messages`` of them its requests are aborted."""
        outbox = self._outbox.get(identity)
        if outbox is None:
            if not self._try_send(identity, msg):
                self._outbox.setdefault(identity, collections.deque()).append(msg)
            return
        outbox.append(msg)
        if len(outbox) > self.limits.max_queued_messages:
            print(f"fs-engine: client {identity.hex()} read none of its last {len(outbox)} messages: "
                  f"aborting its requests (max_queued_messages)", file=sys.stderr, flush=True)
            self._client_gone(identity)

    def _try_send(self, identity: bytes, msg: Any) -> bool:
        """Send now; False if the client's queue is full (it is then busy: ``_outbox`` holds what waits)."""
        try:
            self.router.send(identity, msg)
        except PeerBusy:
            self._outbox.setdefault(identity, collections.deque())
            return False
        except PeerGone:
            self._client_gone(identity)
        return True

    def _flush(self) -> None:
        """Send what busy clients have read room for since: their queued messages in order, then one event
        per stream with everything it produced meanwhile."""
        for identity in list(self._outbox):
            outbox = self._outbox[identity]
            while outbox and identity in self._outbox:
                if not self._try_send(identity, outbox[0]):
                    break
                outbox.popleft()
            unsent = self._unsent.get(identity, {})
            while not outbox and unsent and identity in self._outbox:
                key, pending = next(iter(unsent.items()))
                del unsent[key]
                if not self._stream(pending, pending.unsent):
                    break
            if not outbox and not unsent:
                self._outbox.pop(identity, None)
                self._unsent.pop(identity, None)

    def _client_gone(self, identity: bytes) -> None:
        """The client disconnected (or stopped reading): abort its requests so their KV is freed."""
        self._outbox.pop(identity, None)
        self._unsent.pop(identity, None)
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
        for identity in {p.identity for p in self._pending.values()} - self._outbox.keys():  # (busy: connected)
            self._send(identity, KeepAlive())

    def _refuse_queued(self, message: str, budget_s: float = 0.5) -> None:
        """Answer what clients sent that was not read yet (a call waiting on it would otherwise wait out its
        timeout): every message with a request id gets the fatal error."""
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline and (item := self.router.recv(timeout_s=0)) is not None:
            identity, msg = item
            request_id = getattr(msg, "request_id", None)
            if isinstance(request_id, str):
                try:
                    self.router.send(identity, ErrorReply(request_id, message, fatal=True))
                except (PeerGone, PeerBusy):
                    pass

    def _keepalive_while_waiting(self) -> None:
        """The executor waits for a late step (a worker stopped or slow): clients with requests in flight
        still hear from us every second, so they do not take silence for a dead engine. Only sends: the engine
        is in the middle of a step."""
        now = time.monotonic()
        if now - self._last_keepalive < KEEPALIVE_S:
            return
        self._last_keepalive = now
        for identity in {p.identity for p in self._pending.values()} - self._outbox.keys():
            try:
                self.router.send(identity, KeepAlive())
            except (PeerGone, PeerBusy):  # noticed on the next send after the step
                pass

    def _fail_all(self, message: str) -> None:
        for pending in list(self._pending.values()):
            try:
                self.router.send(pending.identity, ErrorReply(pending.client_id, message, fatal=True))
            except (PeerGone, PeerBusy):
                pass
        self._pending.clear()
        self._load.clear()
        self._tenant_load.clear()
        self._tokenizing.clear()
