"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), in front of a running engine.

This process holds no model: it reaches the engine's frontend over the ZeroMQ SDK (``AsyncClient``), as
vLLM's API server reaches its engine core, so HTTP parsing, tokenization and chat templates never run on the
engine loop. Text and chat messages are tokenized here (the model's tokenizer, on a thread); the engine
detokenizes and applies stop strings, and streams tokens back as server-sent events.

Who asks: with an API keys file (``fs_engine.engine.auth``, the ``api_keys`` of each tenant) a request needs
``Authorization: Bearer KEY`` (else 401) and runs as that key's tenant; without one, as its ``user`` field's,
else ``default``. Request ids are made here, so no client can name, abort or reprioritise another's request.
The engine's per-tenant limits answer 429 with ``Retry-After``; a dead engine 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fs_engine import __version__
from fs_engine.client import AsyncClient
from fs_engine.engine.auth import Keys
from fs_engine.http.metrics import Metrics
from fs_engine.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_errors,
)
from ipc.errors import EngineDeadError, RemoteError

STATS_POLL_S = 1.0
RATE_LIMITS = ("max_requests_per_tenant", "max_prompt_tokens_per_tenant", "max_requests_per_client",
               "max_prompt_tokens_per_client")  # the engine's limits that mean "later", not "never"
RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


@dataclass
class ServedModel:
    name: str  # what clients put in "model"
    path: str
    tokenizer: Any  # the model's Hugging Face tokenizer
    max_model_len: int


def _engine_error(e: RemoteError) -> APIError:
    message = str(e)
    if any(f"({limit})" in message for limit in RATE_LIMITS):
        return APIError(429, message, "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(400, message)


class OpenAIServer:
    def __init__(self, engine_address: str, model: ServedModel, keys: Keys | None = None,
                 timeout_s: float = 30.0) -> None:
        self.engine_address = engine_address
        self.model = model
        self.keys = keys
        self.timeout_s = timeout_s
        self.metrics = Metrics()
        self.client: AsyncClient | None = None
        self._poller: asyncio.Task | None = None
        self._token_text = functools.lru_cache(maxsize=1 << 16)(self._decode_one)  # logprobs' token texts
        self.app = self._build()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.client = AsyncClient(self.engine_address, timeout_s=self.timeout_s)
        self._poller = asyncio.create_task(self._poll_stats())
        try:
            yield
        finally:
            self._poller.cancel()
            await self.client.close()

    async def _poll_stats(self) -> None:
        """The engine's counters, once a second, for /metrics (a scrape never waits on the engine)."""
        while True:
            with contextlib.suppress(EngineDeadError, RemoteError, RuntimeError):
                self.metrics.engine.update(await self.client.stats())
            await asyncio.sleep(STATS_POLL_S)

    def _build(self) -> FastAPI:
        app = FastAPI(title="fs-engine", version=__version__, lifespan=self._lifespan)

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError) -> JSONResponse:
            self.metrics.http.labels(request.url.path, str(e.status)).inc()
            return JSONResponse(error_body(e.message, e.kind, e.param, e.status), e.status, headers=e.headers)

        @app.exception_handler(RequestValidationError)
        async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
            message, param = validation_errors(e.errors())
            self.metrics.http.labels(request.url.path, "400").inc()
            return JSONResponse(error_body(message, param=param, code=400), 400)

        @app.get("/health")
        async def health() -> Response:
            try:
                await self.client.stats()
            except (EngineDeadError, RuntimeError) as e:
                raise APIError(503, f"the engine is not serving: {e}", "service_unavailable") from e
            return Response(status_code=200)

        @app.get("/version")
        async def version() -> dict:
            return {"version": __version__}

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self._tenant(request, None)
            return {"object": "list", "data": [{"id": self.model.name, "object": "model", "created": 0,
                                                "owned_by": "fs-engine", "root": self.model.path,
                                                "max_model_len": self.model.max_model_len}]}

        @app.get("/metrics")
        async def metrics() -> Response:
            return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            tenant = self._tenant(request, body.user)
            self._check_model(body.model)
            if isinstance(body.prompt, str):
                prompt_ids = await self._tokenize(body.prompt)
            else:
                prompt_ids = list(body.prompt)
            max_tokens = 16 if body.max_tokens is None else body.max_tokens  # (OpenAI's default)
            return await self._generate(request, body, prompt_ids, tenant, max_tokens, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            tenant = self._tenant(request, body.user)
            self._check_model(body.model)
            prompt_ids = await self._chat_tokens(body)
            wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            # OpenAI's default: up to the context limit
            max_tokens = max(1, self.model.max_model_len - len(prompt_ids)) if wanted is None else wanted
            return await self._generate(request, body, prompt_ids, tenant, max_tokens, chat=True)

        return app

    # ---- request checks ------------------------------------------------------------------------------------
    def _tenant(self, request: Request, user: str | None) -> str:
        if self.keys is None:
            return user or "default"
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        tenant = self.keys.by_api_key.get(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        return tenant

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model.name, self.model.path):
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model.name!r}",
                           "not_found_error", "model")

    def _decode_one(self, token_id: int) -> str:
        """One token's text, as the logprobs show it."""
        return self.model.tokenizer.decode([token_id])

    async def _tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(lambda: list(self.model.tokenizer(text).input_ids))

    async def _chat_tokens(self, body: ChatCompletionRequest) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")

        def render() -> list[int]:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=body.add_generation_prompt,
                                                continue_final_message=not body.add_generation_prompt)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

        try:
            return await asyncio.to_thread(render)
        except (ValueError, TypeError) as e:  # a template that refuses these messages (roles out of order)
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from e

    # ---- generation ----------------------------------------------------------------------------------------
    async def _generate(self, request: Request, body: Any, prompt_ids: list[int], tenant: str, max_tokens: int,
                        chat: bool) -> Response:
        try:
            params = body.sampling_params(max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from e
        limit = self.model.max_model_len
        if len(prompt_ids) + max_tokens > limit:
            param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"this model's context is {limit} tokens: the prompt has {len(prompt_ids)} and "
                                f"{param} asks for {max_tokens} more; lower {param} or shorten the prompt",
                           param=param)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # n choices are n engine requests; seeded, choice i samples with seed + i (else they would be equal)
        seeds = [params.seed if params.seed is None else (params.seed + i) % (1 << 63) for i in range(body.n)]
        streams = [self.client.generate(prompt_ids, **{**params.model_dump(), "seed": seed}, priority=body.priority,
                                        tenant=tenant, session_id=body.session_id,
                                        request_id=request_id if body.n == 1 else f"{request_id}-{i}")
                   for i, seed in enumerate(seeds)]
        logprobs = None if params.logprobs is None else functools.partial(_Logprobs, self._token_text, chat,
                                                                           params.logprobs)
        response = _Response(request_id, self.model.name, chat, prompt_ids, time.monotonic(), tenant,
                             self.metrics, body.return_token_ids, body.n, logprobs)
        endpoint = request.url.path
        if body.stream:
            firsts = await self._first_events(streams)  # errors before the first token are HTTP errors
            self.metrics.http.labels(endpoint, "200").inc()
            return StreamingResponse(self._sse(streams, firsts, response, body.include_usage),
                                     media_type="text/event-stream")

        async def consume(index: int, stream: Any) -> None:
            async with stream:  # (leaving it early aborts the request)
                async for event in stream:
                    response.add(index, event)

        tasks = [asyncio.ensure_future(consume(i, stream)) for i, stream in enumerate(streams)]
        every = asyncio.gather(*tasks)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({every, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not every.done():  # nobody will read the answer: free its KV now
                await _cancel(tasks)  # each stream's exit sends its abort
                self.metrics.http.labels(endpoint, "499").inc()
                return Response(status_code=499)
            every.result()
        except RemoteError as e:
            raise _engine_error(e) from e
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not serving: {e}", "service_unavailable") from e
        finally:
            await _cancel(tasks)  # (no-ops once they are done; one choice failing stops the others)
            gone.cancel()
        self.metrics.http.labels(endpoint, "200").inc()
        return JSONResponse(response.whole())

    @staticmethod
    async def _first_events(streams: list[Any]) -> list[Any]:
        """Every choice's first event; if one fails, every stream is closed (its request aborted)."""
        firsts = []
        try:
            for stream in streams:
                firsts.append(await stream.__anext__())
        except BaseException as e:
            await _close_all(streams)
            if isinstance(e, RemoteError):
                raise _engine_error(e) from e
            if isinstance(e, EngineDeadError):
                raise APIError(503, f"the engine is not serving: {e}", "service_unavailable") from e
            raise
        return firsts

    async def _sse(self, streams: list[Any], firsts: list[Any], response: _Response,
                   include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per engine event (each naming its choice), the usage if asked for, then
        ``[DONE]``. A client that goes away cancels this generator, which closes the streams: the engine aborts
        the requests."""
        try:
            async for index, event in _merged(streams, firsts):
                response.add(index, event)
                yield _sse(response.chunk(index, event))
            if include_usage:
                yield _sse(response.usage_chunk())
        except (RemoteError, EngineDeadError) as e:  # mid-stream: the status is sent already
            kind = "service_unavailable" if isinstance(e, EngineDeadError) else "invalid_request_error"
            yield _sse(error_body(str(e), kind))
        finally:
            await _close_all(streams)
        yield "data: [DONE]\n\n"


async def _close_all(streams: list[Any]) -> None:
    """Close every stream (aborting its request if it runs), all at once and shielded: a hung-up client cancels
    the response at every await of its clean-up (anyio's cancel scopes), and one close at a time would stop
    at the first, leaving the other choices running."""
    await asyncio.shield(asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True))


async def _cancel(tasks: list[asyncio.Future]) -> None:
    """Cancel the tasks and wait until they have ended (a stream's abort runs as its consumer unwinds)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _merged(streams: list[Any], firsts: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) of every stream until each has finished, in the order they arrive."""
    if len(streams) == 1:  # the common case, without a task and a queue
        event = firsts[0]
        while True:
            yield 0, event
            if event.finished:
                return
            event = await streams[0].__anext__()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        event = firsts[index]
        try:
            while True:
                await queue.put((index, event))
                if event.finished:
                    return
                event = await streams[index].__anext__()
        except Exception as e:  # noqa: BLE001 - raised where the events are read
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        left = len(streams)
        while left:
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            left -= event.finished
            yield index, event
    finally:
        await _cancel(tasks)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _Logprobs:
    """Tokens' logprobs in OpenAI's two shapes: the chat API's ``content`` list (a token's text, logprob, UTF-8
    bytes and its ``top_logprobs``), and the legacy completions' parallel lists (``tokens``, ``token_logprobs``,
    ``top_logprobs`` as {text: logprob}, ``text_offset`` into the whole text)."""

    def __init__(self, text_of: Callable[[int], str], chat: bool, top: int) -> None:
        self.text_of, self.chat, self.top = text_of, chat, top
        self.offset = 0  # characters of the text before the next token (completions' text_offset)
        self.content: list[dict] = []  # chat
        self.legacy: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        # the entry holds the sampled token and the top ones: when the sampled one is not among them, it is the
        # least likely, so the most likely `top` are the top ones
        return sorted(entry.items(), key=lambda item: -item[1])[: self.top]

    def add(self, token_ids: list[int], entries: list[dict[int, float]]) -> dict:
        """The logprobs of these new tokens (what a stream chunk carries); they are kept for the whole answer."""
        if self.chat:
            new = [{**self._chat_item(token, entry[token]),
                    "top_logprobs": [self._chat_item(t, lp) for t, lp in self._top(entry)]}
                   for token, entry in zip(token_ids, entries)]
            self.content += new
            return {"content": new, "refusal": None}
        new = {key: [] for key in self.legacy}
        for token, entry in zip(token_ids, entries):
            text = self.text_of(token)
            new["tokens"].append(text)
            new["token_logprobs"].append(entry[token])
            new["top_logprobs"].append({self.text_of(t): lp for t, lp in self._top(entry)})
            new["text_offset"].append(self.offset)
            self.offset += len(text)
        for key, values in new.items():
            self.legacy[key] += values
        return new

    def _chat_item(self, token: int, logprob: float) -> dict:
        text = self.text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def whole(self) -> dict:
        return {"content": self.content, "refusal": None} if self.chat else self.legacy


class _Choice:
    """One choice of an answer as it grows (one engine request)."""

    def __init__(self, index: int, start: float, logprobs: _Logprobs | None) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.last = start  # when its last tokens came
        self.role_sent = False
        self.logprobs = logprobs
        self.chunk_logprobs: dict | None = None  # the last event's, for its stream chunk


class _Response:
    """One request's answer as it grows, its ``n`` choices whole or chunk by chunk; their latencies go to the
    metrics."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_ids: list[int], start: float,
                 tenant: str, metrics: Metrics, token_ids: bool, n: int = 1,
                 logprobs: Callable[[], _Logprobs] | None = None) -> None:
        self.request_id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())
        self.prompt_ids, self.num_prompt_tokens = prompt_ids, len(prompt_ids)
        self.with_token_ids = token_ids
        self.start = start
        self.tenant, self.metrics = tenant, metrics
        self.choices = [_Choice(i, start, logprobs() if logprobs is not None else None) for i in range(n)]
        self.head_sent = False

    def add(self, index: int, event: Any) -> None:
        now = time.monotonic()
        choice = self.choices[index]
        if event.token_ids:
            if not choice.token_ids:
                self.metrics.ttft.labels(self.tenant).observe(now - self.start)
            else:
                self.metrics.itl.labels(self.tenant).observe(now - choice.last)
            choice.last = now
        choice.token_ids += event.token_ids
        if choice.logprobs is not None:
            choice.chunk_logprobs = choice.logprobs.add(event.token_ids, event.logprobs or [])
        choice.text.append(event.text)
        if event.finished:
            choice.finish_reason = event.finish_reason
            self.metrics.e2e.labels(self.tenant).observe(now - self.start)

    def _usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion}

    def _head(self, obj: str, first: bool = True) -> dict:
        head = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}
        if self.with_token_ids and first:
            head["prompt_token_ids"] = self.prompt_ids
        return head

    def _ids(self, choice: dict, token_ids: list[int]) -> dict:
        if self.with_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def whole(self) -> dict:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            logprobs = c.logprobs.whole() if c.logprobs is not None else None
            body = ({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            choices.append(self._ids({"index": c.index, **body, "logprobs": logprobs,
                                      "finish_reason": c.finish_reason}, c.token_ids))
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self._usage()}

    def chunk(self, index: int, event: Any) -> dict:
        c = self.choices[index]
        finish = event.finish_reason if event.finished else None
        first, self.head_sent = not self.head_sent, True
        if self.chat:
            delta: dict[str, str] = {"content": event.text}
            if not c.role_sent:
                delta = {"role": "assistant", **delta}
            body, obj = {"delta": delta}, "chat.completion.chunk"
        else:
            body, obj = {"text": event.text}, "text_completion"
        c.role_sent = True
        choice = {"index": c.index, **body, "logprobs": c.chunk_logprobs, "finish_reason": finish}
        return {**self._head(obj, first), "choices": [self._ids(choice, event.token_ids)]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj, first=False), "choices": [], "usage": self._usage()}


async def _client_gone(request: Request) -> None:
    """Returns when the client has hung up. The body is read already, so the server's next ASGI message is the
    disconnect: waiting on it reacts at once (polling ``request.is_disconnected()`` reacted a poll later)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
