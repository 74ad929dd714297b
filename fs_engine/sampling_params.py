"""Per-request generation settings, validated where the user hands them in."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from ipc.messages import SamplingSpec


INT32_MAX = (1 << 31) - 1  # token ids, counts and top_k travel as int32 to the worker
MAX_TEMPERATURE = 1e4
MAX_STOP_STRINGS = 64  # each is matched against every request's new text every step (OpenAI allows 4)
MAX_STOP_LENGTH = 1024
MAX_STOP_TOKEN_IDS = 1024


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` disable those filters. ``seed`` makes
    a sampled request reproducible whatever else is batched with it. Generation stops at the model's eos
    (unless ``ignore_eos``), at any of ``stop_token_ids``, when the text contains one of ``stop`` (the text
    is cut before it), after ``max_tokens`` tokens, or at the engine's context limit.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # accept lists and a single string the way users pass them, store tuples (hashable, immutable)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)) or not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop and stop_token_ids must be lists, got {self.stop!r:.80} and "
                             f"{self.stop_token_ids!r:.80}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) if _is_int(t) else t for t in self.stop_token_ids))
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:  # rejects NaN, inf
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k must be an integer in [0, {INT32_MAX}] (0 = disabled), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 1 << 63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if any(not _is_int(t) or not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers in [0, {INT32_MAX}]), "
                             f"got {self.stop_token_ids!r:.80}")
        if len(self.stop) > MAX_STOP_STRINGS or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings and {MAX_STOP_TOKEN_IDS} stop_token_ids, "
                             f"got {len(self.stop)} and {len(self.stop_token_ids)}")
        if any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings of at most {MAX_STOP_LENGTH} characters, "
                             f"got {self.stop!r:.80}")
        if not isinstance(self.ignore_eos, bool) or not isinstance(self.skip_special_tokens, bool):
            raise ValueError("ignore_eos and skip_special_tokens must be true or false")

    def to_spec(self) -> SamplingSpec:
        return SamplingSpec(
            temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k, seed=self.seed
        )
