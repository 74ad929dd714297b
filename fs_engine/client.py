"""Client SDK: talk to a running fs-engine frontend over ZeroMQ.

Two clients speak one protocol (``ipc.messages``, section "client <-> frontend") on one DEALER socket each:

- ``Client``: synchronous. ``generate(..., stream=True)`` returns a ``TokenStream`` (an iterator of
  ``StreamEvent``); ``stream=False`` (or ``complete(...)``) returns a ``CompletionResult``. The request is
  sent when ``generate`` is called, so several streams may be in flight and consumed interleaved from one
  thread. Not thread-safe: use one ``Client`` per thread.
- ``AsyncClient``: asyncio. ``async for ev in client.generate(...)`` streams (the request is sent when
  iteration starts); ``await client.complete(...)`` or ``await client.generate(..., stream=False)`` returns a
  ``CompletionResult``. Any number of tasks may generate at once on one client.

Replies are demultiplexed by request id into one inbox per pending call::

    socket --> _dispatch --+--> TokenEvent            -> inbox of that generate call
                           +--> Ack / StatsReply      -> oldest abort / priority / stats call waiting on that id
                           +--> ErrorReply(id)        -> that control call if one waits, else the generate call
                           +--> ErrorReply("")        -> every pending call (RemoteError: a message was unreadable)
                           +--> ErrorReply(fatal)     -> every pending and later call (EngineDeadError)
                           +--> KeepAlive             -> nothing (it only keeps the server's view of us alive)

Errors: sampling settings are validated here (``ValueError`` before anything is sent); a request the
frontend rejects raises ``RemoteError``; a frontend that says it is going down, or from which nothing at
all arrives for ``timeout_s`` while a call waits, raises ``EngineDeadError`` on every pending call, and the
client stays dead (make a new one). A frame that does not decode, or is no reply a client expects, raises
``ProtocolError`` on every pending call, since it cannot be known whose reply it was.
"""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from ipc.channels import CurveKeys, Dealer, client_socket_options
from ipc.codec import decode, encode
from ipc.errors import EngineDeadError, ProtocolError, RemoteError
from ipc.messages import (
    AbortRequest, Ack, ErrorReply, GenerateRequest, KeepAlive, StatsReply, StatsRequest, TokenEvent, UpdatePriority,
)
from fs_engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class StreamEvent:
    """New output of a streamed request: the token ids and text produced since the previous event."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" on the last event
    num_cached_tokens: int
    prompt_token_ids: list[int] | None  # on the first event only
    # with logprobs=k: per new token, {token id: log-probability} of the sampled token and the k most likely
    logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class CompletionResult:
    request_id: str
    prompt_token_ids: list[int] | None
    token_ids: list[int]  # every generated token
    text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[dict[int, float]] | None = None  # with logprobs=k, per generated token (see StreamEvent)


def _logprobs(ev: TokenEvent) -> list[dict[int, float]] | None:
    if ev.logprob_ids is None or ev.logprob_values is None:
        return None
    return [dict(zip(ids, values)) for ids, values in zip(ev.logprob_ids, ev.logprob_values)]


def _event(ev: TokenEvent) -> StreamEvent:
    return StreamEvent(ev.request_id, list(ev.token_ids), ev.text, ev.finished, ev.finish_reason,
                       ev.num_cached_tokens, ev.prompt_token_ids, _logprobs(ev))


class _Completion:
    """Folds the TokenEvents of one request into a CompletionResult (one event when stream=False, but a
    frontend that streams anyway is read correctly too)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] | None = None
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.num_cached_tokens = 0
        self.logprobs: list[dict[int, float]] | None = None

    def add(self, ev: TokenEvent) -> CompletionResult | None:
        if ev.prompt_token_ids is not None and self.prompt_token_ids is None:
            self.prompt_token_ids = list(ev.prompt_token_ids)
        self.token_ids.extend(ev.token_ids)
        if (logprobs := _logprobs(ev)) is not None:
            self.logprobs = (self.logprobs or []) + logprobs
        self.text.append(ev.text)
        self.num_cached_tokens = max(self.num_cached_tokens, ev.num_cached_tokens)
        if not ev.finished:
            return None
        return CompletionResult(self.request_id, self.prompt_token_ids, self.token_ids, "".join(self.text),
                                ev.finish_reason, self.num_cached_tokens, self.logprobs)


def _build_request(prompt: str | list[int], *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                   seed: int | None, stop: str | list[str] | None, stop_token_ids: list[int] | None,
                   ignore_eos: bool, skip_special_tokens: bool, priority: int, tenant: str,
                   session_id: str | None, stream: bool, request_id: str | None,
                   logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                   repetition_penalty: float = 1.0) -> GenerateRequest:
    """Validate everything the user passed (ValueError naming the argument) and build the wire request."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop or (), stop_token_ids=stop_token_ids or (), ignore_eos=ignore_eos,
                            skip_special_tokens=skip_special_tokens, logprobs=logprobs,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repetition_penalty=repetition_penalty)
    wire_params = params.wire_fields()
    if isinstance(prompt, str):
        text, token_ids = prompt, None
    else:
        try:
            token_ids = [operator.index(t) for t in prompt] if isinstance(prompt, (list, tuple)) else []
        except TypeError:
            token_ids = []
        if not token_ids or min(token_ids) < 0:
            raise ValueError(f"prompt must be a string or a non-empty list of token ids >= 0, got {prompt!r:.100}")
        text = None
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant must be a non-empty string, got {tenant!r}")
    if session_id is not None and not isinstance(session_id, str):
        raise ValueError(f"session_id must be a string or None, got {session_id!r}")
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string or None, got {request_id!r}")
    return GenerateRequest(request_id, text, token_ids, wire_params, priority, tenant, session_id, bool(stream))


class _Demux:
    """Routing of replies to pending calls, shared by both clients. An inbox receives reply messages and
    exceptions (``put``); the subclass decides what an inbox is (a deque, an asyncio.Queue)."""

    def __init__(self, address: str, timeout_s: float, curve: CurveKeys | None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.address = address
        self._curve = curve
        self.timeout_s = float(timeout_s)
        self._calls: dict[str, Any] = {}  # generate request id -> inbox, until its last event or error
        self._waiters: dict[str, deque] = {}  # request / correlation id -> inboxes of control calls, oldest first
        self._dead: str | None = None
        self._closed = False

    def _new_inbox(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def _put(inbox: Any, item: Any) -> None:
        raise NotImplementedError

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"the client for {self.address} is closed")
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _register_call(self, request_id: str) -> Any:
        if request_id in self._calls:
            raise ValueError(f"request_id {request_id!r} is already in progress on this client; pick another")
        inbox = self._calls[request_id] = self._new_inbox()
        return inbox

    def _register_waiter(self, key: str) -> Any:
        inbox = self._new_inbox()
        self._waiters.setdefault(key, deque()).append(inbox)
        return inbox

    def _forget_waiter(self, key: str, inbox: Any) -> None:
        queue = self._waiters.get(key)
        if queue is not None and inbox in queue:
            queue.remove(inbox)
            if not queue:
                del self._waiters[key]

    def _pop_waiter(self, key: str) -> Any | None:
        queue = self._waiters.get(key)
        if not queue:
            return None
        inbox = queue.popleft()
        if not queue:
            del self._waiters[key]
        return inbox

    def _fail_all(self, make_error: Callable[[], Exception]) -> None:
        for inbox in self._calls.values():
            self._put(inbox, make_error())
        for queue in self._waiters.values():
            for inbox in queue:
                self._put(inbox, make_error())
        self._calls.clear()
        self._waiters.clear()

    def _die(self, message: str) -> None:
        if self._dead is None:
            self._dead = message
        self._fail_all(lambda: EngineDeadError(message))

    def _silence(self) -> str:
        hint = (" (a frontend that authenticates clients never answers one whose key it does not list: check "
                "the keys)" if self._curve is not None else "")
        return f"the engine at {self.address} did not answer within {self.timeout_s:g} s{hint}"

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, TokenEvent):
            inbox = self._calls.get(msg.request_id)
            if inbox is not None:  # else: a stream that was closed early; its late events are dropped
                self._put(inbox, msg)
                if msg.finished:
                    del self._calls[msg.request_id]
        elif isinstance(msg, (Ack, StatsReply)):
            inbox = self._pop_waiter(msg.request_id)
            if inbox is not None:
                self._put(inbox, msg)
        elif isinstance(msg, ErrorReply):
            if msg.fatal:
                self._die(msg.message)
            elif not msg.request_id:
                # the frontend could not read one of our messages and cannot say which: any call may be its victim
                self._fail_all(lambda: RemoteError(f"the frontend could not read a message: {msg.message}"))
            else:
                # an id with both a generate and a control call pending: the control call waits for exactly one
                # reply, so it takes the error; the generate still ends with its own final event or error
                inbox = self._pop_waiter(msg.request_id)
                if inbox is None:
                    inbox = self._calls.pop(msg.request_id, None)
                if inbox is not None:
                    self._put(inbox, RemoteError(msg.message))
        elif not isinstance(msg, KeepAlive):
            self._fail_all(lambda: ProtocolError(f"unexpected {type(msg).__name__} from the frontend"))

    def _decode_failed(self, error: ProtocolError) -> None:
        self._fail_all(lambda: ProtocolError(str(error)))


def _unwrap(item: Any) -> Any:
    if isinstance(item, BaseException):
        raise item
    return item


# ---- synchronous client ---------------------------------------------------------------------------------


class TokenStream:
    """Iterator over one streamed request's events. ``close()`` (or leaving a ``with`` block) before the last
    event aborts the request on the server and drops whatever it still sends. A stream dropped without
    ``close()`` keeps generating on the server; its buffer is released when its last event arrives."""

    def __init__(self, client: Client, request_id: str, inbox: deque) -> None:
        self.request_id = request_id
        self._client = client
        self._inbox = inbox
        self._done = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._done:
            raise StopIteration
        if not self._inbox:
            # an interrupt here leaves the stream open: iterate on, or close() to abort it
            self._client._pump(self._inbox)
        item = self._inbox.popleft()
        if isinstance(item, BaseException) or item.finished:
            self._done = True
        return _event(_unwrap(item))

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        self._client._abandon(self.request_id, self._inbox)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Demux):
    """Synchronous client of one frontend. Not thread-safe: one Client per thread (a client owns one socket,
    and whichever call is waiting reads replies for every request of the client)."""

    def __init__(self, address: str, timeout_s: float = 30.0, curve: CurveKeys | None = None) -> None:
        """``curve``: this client's key pair and the server's public key, for a frontend launched with
        ``--keys`` (``CurveKeys.load(client.key_secret, server.key)``)."""
        super().__init__(address, timeout_s, curve)
        self._ctx = zmq.Context()
        try:
            self._dealer = Dealer(self._ctx, address, curve)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)  # also closes the socket Dealer had opened
            raise ValueError(f"cannot connect to {address!r}: {e} (expected e.g. tcp://127.0.0.1:5555)") from e

    def _new_inbox(self) -> deque:
        return deque()

    @staticmethod
    def _put(inbox: deque, item: Any) -> None:
        inbox.append(item)

    def _pump(self, inbox: deque) -> None:
        """Read and dispatch replies (for any request) until ``inbox`` holds something."""
        last_s = time.monotonic()
        while not inbox:
            self._check_usable()
            remaining_s = last_s + self.timeout_s - time.monotonic()
            if remaining_s <= 0 or not self._dealer.poll(remaining_s):
                self._die(self._silence())
                if not inbox:  # a call that is not registered (cannot happen for ours): still never hang
                    raise EngineDeadError(self._silence())
                break
            last_s = time.monotonic()
            try:
                msg = decode(self._dealer.socket.recv())
            except ProtocolError as e:
                self._decode_failed(e)
                continue
            self._dispatch(msg)

    def _send(self, msg: Any) -> None:
        self._dealer.send(msg)

    def _abandon(self, request_id: str, inbox: deque) -> None:
        if self._calls.get(request_id) is inbox:
            del self._calls[request_id]
            if not self._closed and self._dead is None:
                self._send(AbortRequest(request_id))  # its Ack and final event find no inbox and are dropped

    def generate(self, prompt: str | list[int], *, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, skip_special_tokens: bool = True, priority: int = 0,
                 tenant: str = "default", session_id: str | None = None, stream: bool = True,
                 request_id: str | None = None, logprobs: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> TokenStream | CompletionResult:
        """Send one request. ``prompt`` is text or token ids. stream=True: a ``TokenStream`` (the request is
        already sent); stream=False: waits and returns a ``CompletionResult``. ``logprobs=k`` (0-20): each event
        and result carries every new token's log-probability and the k most likely ones; the penalties are
        ``SamplingParams``'. Raises ValueError for bad
        settings (nothing is sent) and RemoteError when the frontend rejects the request."""
        req = _build_request(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                             skip_special_tokens=skip_special_tokens, priority=priority, tenant=tenant,
                             session_id=session_id, stream=stream, request_id=request_id, logprobs=logprobs,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             repetition_penalty=repetition_penalty)
        self._check_usable()
        inbox = self._register_call(req.request_id)
        try:
            self._send(req)
        except BaseException:
            self._calls.pop(req.request_id, None)
            raise
        if stream:
            return TokenStream(self, req.request_id, inbox)
        completion = _Completion(req.request_id)
        try:
            while True:
                if not inbox:
                    self._pump(inbox)
                result = completion.add(_unwrap(inbox.popleft()))
                if result is not None:
                    return result
        except BaseException:
            self._abandon(req.request_id, inbox)  # interrupted: stop it on the server (no-op once it ended)
            raise

    def complete(self, prompt: str | list[int], **kwargs: Any) -> CompletionResult:
        """``generate(prompt, stream=False, **kwargs)``."""
        return self.generate(prompt, stream=False, **kwargs)  # type: ignore[return-value]

    def _control(self, key: str, msg: Any) -> Any:
        self._check_usable()
        inbox = self._register_waiter(key)
        try:
            self._send(msg)
            self._pump(inbox)
        finally:
            self._forget_waiter(key, inbox)
        return _unwrap(inbox.popleft())

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream then ends with finish_reason "abort". RemoteError if the frontend does
        not know the id (it may already have finished)."""
        self._control(request_id, AbortRequest(request_id))

    def update_priority(self, request_id: str, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        self._control(request_id, UpdatePriority(request_id, priority))

    def stats(self) -> dict:
        corr_id = f"stats-{uuid.uuid4().hex}"
        return self._control(corr_id, StatsRequest(corr_id)).stats

    def close(self) -> None:
        """Fail pending calls with RuntimeError and close the socket; the frontend stops this client's requests
        when it next tries to send to it."""
        if self._closed:
            return
        self._fail_all(lambda: RuntimeError(f"the client for {self.address} was closed"))
        self._closed = True
        self._dealer.close()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- asyncio client -------------------------------------------------------------------------------------


_NOTHING = object()


async def _get_within(inbox: asyncio.Queue, timeout_s: float) -> Any:
    """``inbox.get()`` within ``timeout_s`` (``_NOTHING`` if nothing came). A cancellation is never swallowed
    and loses nothing: Python 3.11's ``asyncio.wait_for`` returns an item that arrives as it is cancelled and
    drops the cancellation, so a stream closed mid-request could keep running to its end; here such an item
    goes back to the head of the inbox and the cancellation goes on."""
    getter = asyncio.ensure_future(inbox.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout_s)
    except BaseException:
        _put_back(inbox, getter)
        raise
    if done:
        return getter.result()
    _put_back(inbox, getter)
    return _NOTHING


def _put_back(inbox: asyncio.Queue, getter: asyncio.Future) -> None:
    """Stop ``getter``; an item it took already goes back first in line (a pending ``Queue.get`` takes
    nothing when cancelled)."""
    if getter.cancel() or getter.cancelled() or getter.exception() is not None:
        return
    rest = [inbox.get_nowait() for _ in range(inbox.qsize())]
    for item in (getter.result(), *rest):
        inbox.put_nowait(item)


class AsyncTokenStream:
    """Async iterator over one streamed request's events; the request is sent when iteration starts.
    ``await stream.aclose()`` (or leaving ``async with``) before the last event aborts the request."""

    def __init__(self, client: AsyncClient, request: GenerateRequest) -> None:
        self.request_id = request.request_id
        self._client = client
        self._request: GenerateRequest | None = request
        self._inbox: asyncio.Queue | None = None
        self._done = False

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        if self._request is not None:
            request, self._request = self._request, None
            try:
                self._inbox = await self._client._start(request)
            except BaseException:
                self._done = True
                raise
        # a cancellation while waiting leaves the stream open: iterate on, or aclose() to abort it
        item = await self._client._next(self._inbox)
        if isinstance(item, BaseException) or item.finished:
            self._done = True
        return _event(_unwrap(item))

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        if self._inbox is not None:
            # shielded: a task cancelled again while it closes its stream (as asyncio.timeout and servers do)
            # must still tell the frontend, or the request runs on, holding its KV, with nobody reading it
            await asyncio.shield(self._client._abandon(self.request_id, self._inbox))

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient(_Demux):
    """asyncio client of one frontend; any number of tasks of one event loop may use it at once. One
    background task reads the socket and files every reply into the inbox (an asyncio.Queue) of its call."""

    def __init__(self, address: str, timeout_s: float = 30.0, curve: CurveKeys | None = None) -> None:
        super().__init__(address, timeout_s, curve)
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            client_socket_options(self._socket, curve)
            self._socket.connect(address)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise ValueError(f"cannot connect to {address!r}: {e} (expected e.g. tcp://127.0.0.1:5555)") from e
        self._reader: asyncio.Task | None = None
        self._last_recv_s = time.monotonic()

    def _new_inbox(self) -> asyncio.Queue:
        return asyncio.Queue()

    @staticmethod
    def _put(inbox: asyncio.Queue, item: Any) -> None:
        inbox.put_nowait(item)

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._socket.recv()
                self._last_recv_s = time.monotonic()
                try:
                    msg = decode(frame)
                except ProtocolError as e:
                    self._decode_failed(e)
                    continue
                self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken socket must fail the calls, not hang them
            self._die(f"reading from the engine at {self.address} failed: {type(e).__name__}: {e}")

    async def _send(self, msg: Any) -> None:
        self._check_usable()
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        await self._socket.send(encode(msg))

    async def _next(self, inbox: asyncio.Queue) -> Any:
        """The next item of ``inbox``; EngineDeadError when nothing at all arrives for timeout_s meanwhile."""
        start_s = time.monotonic()
        while inbox.empty():
            self._check_usable()
            remaining_s = max(self._last_recv_s, start_s) + self.timeout_s - time.monotonic()
            if remaining_s <= 0:
                self._die(self._silence())
                break
            item = await _get_within(inbox, remaining_s)
            if item is not _NOTHING:
                return item
            # (timed out: the reader may have heard from the engine for another call meanwhile)
        if inbox.empty():
            raise EngineDeadError(self._silence())
        return inbox.get_nowait()

    async def _start(self, request: GenerateRequest) -> asyncio.Queue:
        self._check_usable()
        inbox = self._register_call(request.request_id)
        try:
            await self._send(request)
        except BaseException:
            self._calls.pop(request.request_id, None)
            raise
        return inbox

    async def _abandon(self, request_id: str, inbox: asyncio.Queue) -> None:
        if self._calls.get(request_id) is inbox:
            del self._calls[request_id]
            if not self._closed and self._dead is None:
                await self._send(AbortRequest(request_id))

    def generate(self, prompt: str | list[int], *, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, skip_special_tokens: bool = True, priority: int = 0,
                 tenant: str = "default", session_id: str | None = None, stream: bool = True,
                 request_id: str | None = None, logprobs: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> Any:
        """stream=True: an ``AsyncTokenStream`` (``async for ev in client.generate(...)``); stream=False: an
        awaitable of the ``CompletionResult``. Settings are validated here, before anything is awaited."""
        req = _build_request(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                             skip_special_tokens=skip_special_tokens, priority=priority, tenant=tenant,
                             session_id=session_id, stream=stream, request_id=request_id, logprobs=logprobs,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             repetition_penalty=repetition_penalty)
        return AsyncTokenStream(self, req) if stream else self._complete(req)

    async def complete(self, prompt: str | list[int], **kwargs: Any) -> CompletionResult:
        """``await generate(prompt, stream=False, **kwargs)``."""
        return await self.generate(prompt, stream=False, **kwargs)

    async def _complete(self, request: GenerateRequest) -> CompletionResult:
        inbox = await self._start(request)
        completion = _Completion(request.request_id)
        try:
            while True:
                result = completion.add(_unwrap(await self._next(inbox)))
                if result is not None:
                    return result
        except BaseException:
            # cancelled: stop it on the server (no-op once it ended)
            await asyncio.shield(self._abandon(request.request_id, inbox))
            raise

    async def _control(self, key: str, msg: Any) -> Any:
        self._check_usable()
        inbox = self._register_waiter(key)
        try:
            await self._send(msg)
            return _unwrap(await self._next(inbox))
        finally:
            self._forget_waiter(key, inbox)

    async def abort(self, request_id: str) -> None:
        await self._control(request_id, AbortRequest(request_id))

    async def update_priority(self, request_id: str, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        await self._control(request_id, UpdatePriority(request_id, priority))

    async def stats(self) -> dict:
        corr_id = f"stats-{uuid.uuid4().hex}"
        return (await self._control(corr_id, StatsRequest(corr_id))).stats

    async def close(self) -> None:
        if self._closed:
            return
        self._fail_all(lambda: RuntimeError(f"the client for {self.address} was closed"))
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._socket.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncTokenStream", "Client", "CompletionResult", "StreamEvent", "TokenStream"]
