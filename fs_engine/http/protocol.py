"""The OpenAI API's request bodies, as pydantic models: what fs-engine supports, and a 400 naming the field
for everything it does not (an unknown field, or a value it cannot honour such as ``best_of=2``), never silently
ignored. Sampling ranges are ``SamplingParams``' own: a request is turned into one, so the HTTP API, the SDK
and the offline API check the same rules.

Extensions beyond OpenAI's fields, as vLLM names them: ``top_k``, ``ignore_eos``, ``repetition_penalty``,
``priority``, ``return_token_ids`` (choices carry ``token_ids``, the response ``prompt_token_ids``: what a
benchmark needs to build the next turn exactly), plus ``session_id`` (a conversation id for KV reuse; the
history's tokens are the key without it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from fs_engine.sampling_params import MAX_LOGPROBS, SamplingParams

NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MAX_CHOICES = 16  # n: each choice is a request of its own, counted against the client's limits

_FORBID = pydantic.ConfigDict(extra="forbid")


class StreamOptions(pydantic.BaseModel):
    model_config = _FORBID

    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class _Common(pydantic.BaseModel):
    """Fields completions and chat completions share."""

    model_config = _FORBID

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices: one engine request each (seeds seed, seed + 1, ...)
    # what fs-engine cannot do takes only the value that means "off"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: None = None
    # extensions
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # (vLLM's and transformers')
    priority: int = 0
    return_token_ids: bool = False  # (vLLM's too) each choice also carries its token ids, and the prompt's
    session_id: Annotated[str, Field(min_length=1, max_length=1024)] | None = None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              logprobs=self.num_logprobs, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty)

    @property
    def num_logprobs(self) -> int | None:
        """How many top alternatives each token's logprobs list (None: no logprobs)."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    logprobs: NumLogprobs | None = None  # the legacy API's: this many top alternatives per token (0: none)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatMessage(pydantic.BaseModel):
    model_config = _FORBID

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True  # (vLLM's extension: continue the last assistant message when False)
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None

    @pydantic.model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """(one-line message, the first bad field) of a request body that does not validate."""
    def where(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"] if p != "body") or "body"

    message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors) or "the request body is not valid"
    return message, where(errors[0]) if errors else None
