"""Per-request generation settings: one definition, validated where the user hands them in.

``SamplingParams`` is a pydantic model, so the same field types and ranges check what the offline API, the
client SDK (before anything is sent), the frontend (every client's request) and an HTTP front end receive.
The ranges are what the worker and torch accept: counts, token ids and ``top_k`` travel as int32; floats are
finite; stop rules are bounded because every one of them is matched against the request's text every step.
"""

from __future__ import annotations

import numbers
from typing import Annotated, Any

import pydantic
from pydantic import BeforeValidator, Field, StringConstraints

from ipc.messages import SamplingSpec

INT32_MAX = (1 << 31) - 1  # token ids, counts and top_k travel as int32 to the worker
MAX_TEMPERATURE = 1e4
MAX_STOP_STRINGS = 64  # a server may allow fewer (fs-engine launch --max-stop-strings)
MAX_STOP_LENGTH = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20  # most alternatives a token's logprobs list (as OpenAI's top_logprobs)
MAX_REPETITION_PENALTY = 100.0


def _integer(value: Any) -> Any:
    """Integers of any kind (numpy's too) as int; anything else (bools, floats, text) is left to be refused."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _as_tuple(value: Any) -> Any:
    """A single stop string is one stop string (not its characters); lists become tuples (hashable)."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


StrictInt = Annotated[int, BeforeValidator(_integer), pydantic.Strict()]
Count = Annotated[StrictInt, Field(ge=1, le=INT32_MAX)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Number = Annotated[float, pydantic.Strict(), Field(allow_inf_nan=False)]
StopString = Annotated[str, pydantic.Strict(), StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]


class SamplingParams(pydantic.BaseModel):
    """How one request samples and when it stops.

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` disable those filters. ``seed`` makes
    a sampled request reproducible whatever else is batched with it. Generation stops at the model's eos
    (unless ``ignore_eos``), at any of ``stop_token_ids``, when the text contains one of ``stop`` (the text
    is cut before it), after ``max_tokens`` tokens, or at the engine's context limit. ``logprobs=k`` returns,
for every output token, its log-probability and those of the ``k`` most likely tokens at that step (``0``:
the sampled token's alone), from the model's distribution before penalties, temperature, top-k and top-p.
``presence_penalty`` and ``frequency_penalty`` (OpenAI's, -2 to 2) lower the logits of tokens the request has
generated, once and per occurrence; ``repetition_penalty`` (transformers' and vLLM's, > 1 discourages) divides
the positive and multiplies the negative logits of every token of the prompt and the output. They apply to
greedy decoding too.

    Invalid values raise ``ValueError`` naming the field, in one line.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    max_tokens: Count = 16
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] = 0  # 0 = disabled
    seed: Annotated[StrictInt, Field(ge=0, lt=1 << 63)] | None = None
    stop: Annotated[tuple[StopString, ...], BeforeValidator(_as_tuple), Field(max_length=MAX_STOP_STRINGS)] = ()
    stop_token_ids: Annotated[tuple[TokenId, ...], BeforeValidator(_as_tuple),
                              Field(max_length=MAX_STOP_TOKEN_IDS)] = ()
    ignore_eos: Annotated[bool, pydantic.Strict()] = False
    skip_special_tokens: Annotated[bool, pydantic.Strict()] = True
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except pydantic.ValidationError as e:
            raise ValueError(describe(e)) from None

    def to_spec(self) -> SamplingSpec:
        return SamplingSpec(
            temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k, seed=self.seed,
            logprobs=-1 if self.logprobs is None else self.logprobs,
            presence_penalty=float(self.presence_penalty), frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
        )

    def wire_fields(self) -> dict[str, Any]:
        """The fields a client sends (``GenerateRequest.params``): every one, lists for tuples."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in self}


SAMPLING_FIELDS = frozenset(SamplingParams.model_fields)


def describe(error: pydantic.ValidationError) -> str:
    """A validation error in one line: each bad field, what it must be and what it got."""
    parts = []
    for e in error.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"]) or "sampling parameters"
        got = "" if e["type"] == "missing" else f", got {e['input']!r:.60}"
        parts.append(f"{field}: {e['msg'][0].lower()}{e['msg'][1:]}{got}")
    return "; ".join(parts)
