"""Per-request generation settings, validated where the user hands them in."""

from __future__ import annotations

from dataclasses import dataclass, field

from ipc.messages import SamplingSpec


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
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    def to_spec(self) -> SamplingSpec:
        return SamplingSpec(
            temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k, seed=self.seed
        )
