"""Seeded multi-turn workload traces for the serving benchmark.

A trace is decided entirely before a run (arrivals, every turn's user message and reply length, think
times, the priority at every tick), so two engines or two ablation arms see exactly the same work and a
run is reproducible from ``WorkloadConfig`` alone. Lengths follow published ShareGPT statistics, as used
by the FastSwitch paper:

- rounds per conversation: lognormal(mu=ln 3, sigma=1.3) rounded, clipped to [1, MAX_ROUNDS=64]; a
  20,000-conversation sample has median 3 and mean 6.51-6.70 over seeds 0-4 (the raw lognormal needs
  sigma 1.24 for mean 6.5, but the cap at 64 removes some tail, so sigma is raised to 1.3).
- user tokens: lognormal with ln-mean 3.61 and ln-sd 1.52 in the first round, (3.13, 1.34) later; min 1.
- reply tokens: lognormal(ln 300, (ln 625 - ln 300) / 1.2816), so median 300 and p90 625, independent of
  the question, clipped to [1, max_reply_tokens].
- interarrivals: exponential with mean 1/rate (poisson) or gamma(shape=burstiness, scale=1/(rate *
  burstiness)) (same mean, coefficient of variation 1/sqrt(burstiness)); the first conversation arrives at
  t=0 so a run never opens idle; request_rate=inf puts every arrival at 0.

The context cap drops a conversation's turns from the first one whose history (all earlier user messages
and replies) plus its own user message and reply exceeds max_context. With the default 8k cap and full
lengths the mean is 5.33-5.48 rounds (median 3) on 20,000 conversations, seeds 0-4; FastSwitch reports 5.5.
Lengths are scaled (``scale``) before the cap, and think times use the scaled lengths, so a small CPU run
keeps the shape of the workload.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fs_engine.bench.sharegpt import read_sharegpt_records, sharegpt_pairs, sharegpt_path
from fs_engine.config import check_types, check_value

MAX_ROUNDS = 64
ROUNDS_LN = (math.log(3.0), 1.3)
USER_FIRST_LN = (3.61, 1.52)
USER_LATER_LN = (3.13, 1.34)
REPLY_LN = (math.log(300.0), (math.log(625.0) - math.log(300.0)) / 1.2816)
# A generous guess at one turn's queueing plus generation time, used only to size the auto priority
# horizon; priority_at holds the last level past the end, so an underestimate merely freezes priorities.
ESTIMATED_TURN_S = 30.0
MAX_AUTO_TICKS = 10_000
ARRIVALS = ("poisson", "gamma")
THINK_MODES = ("closed", "reading")
PRIORITY_PATTERNS = ("none", "random", "markov")


@dataclass
class Turn:
    user_token_ids: list[int]
    reply_tokens: int  # sent as max_tokens with ignore_eos, so the engine generates exactly this many
    think_s: float  # from the previous reply finishing to this turn being sent; 0.0 for the first turn


@dataclass
class Conversation:
    conversation_id: str
    tenant: str
    arrival_s: float  # first turn sent, seconds from the start of the run
    turns: list[Turn]
    priorities: list[int]  # level at tick k (absolute time k * interval); lower is more urgent


@dataclass
class Trace:
    conversations: list[Conversation]
    tenant_weights: dict[str, float]
    priority_interval_s: float  # 0: priorities never change
    settings: dict[str, Any]  # every generator setting and the seed, for the record

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def priority_at(self, conv: Conversation, t: float) -> int:
        """Priority of ``conv`` at run time ``t``; past the precomputed ticks the last level holds."""
        if self.priority_interval_s <= 0:
            return conv.priorities[0]
        tick = int(max(t, 0.0) // self.priority_interval_s)
        return conv.priorities[min(tick, len(conv.priorities) - 1)]

    def summary(self) -> dict[str, Any]:
        rounds = [len(c.turns) for c in self.conversations]
        users = [len(t.user_token_ids) for c in self.conversations for t in c.turns]
        replies = [t.reply_tokens for c in self.conversations for t in c.turns]
        tenants = [c.tenant for c in self.conversations]
        return {
            "conversations": len(self.conversations),
            "requests": self.num_requests,
            "rounds_mean": float(np.mean(rounds)),
            "rounds_median": float(np.median(rounds)),
            "user_tokens_mean": float(np.mean(users)),
            "user_tokens_median": float(np.median(users)),
            "reply_tokens_mean": float(np.mean(replies)),
            "reply_tokens_median": float(np.median(replies)),
            "reply_tokens_p90": float(np.percentile(replies, 90)),
            "arrival_span_s": max(c.arrival_s for c in self.conversations),
            "conversations_per_tenant": {name: tenants.count(name) for name in self.tenant_weights},
        }

    def save(self, path: str | Path) -> None:
        """Write JSON with one conversation per line: readable and diffable without megabyte-long lines.

        request_rate=inf is written as ``Infinity``, which Python's json (and so ``load``) reads back.
        """
        meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "conversations"}
        head = json.dumps(meta, indent=2)[: -len("\n}")]
        rows = ",\n".join("    " + json.dumps(dataclasses.asdict(c)) for c in self.conversations)
        Path(path).write_text(f'{head},\n  "conversations": [\n{rows}\n  ]\n}}\n')

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                conversations=[_conversation_from_dict(c) for c in data["conversations"]],
                tenant_weights={str(k): float(v) for k, v in data["tenant_weights"].items()},
                priority_interval_s=float(data["priority_interval_s"]),
                settings=dict(data["settings"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path} is not a trace written by Trace.save ({type(exc).__name__}: {exc}); expected a JSON "
                "object with conversations, tenant_weights, priority_interval_s and settings"
            ) from exc


def _conversation_from_dict(data: dict[str, Any]) -> Conversation:
    conv = Conversation(**{**data, "turns": [Turn(**t) for t in data["turns"]]})
    if not conv.turns or not conv.priorities:
        raise ValueError(f"conversation {conv.conversation_id!r} needs at least one turn and one priority")
    return conv


def parse_tenants(text: str) -> dict[str, float]:
    """Parse ``"a=3,b=1"`` into tenant weights; every weight must be a positive number."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not (0 < value < math.inf) or name.strip() in weights:
            raise ValueError(
                f"tenants={text!r} is invalid at {item!r}: write unique name=weight pairs with positive "
                "weights, separated by commas, e.g. 'a=3,b=1'"
            )
        weights[name.strip()] = value
    return weights


@dataclass(frozen=True)
class WorkloadConfig:
    num_conversations: int = 64
    request_rate: float = 1.0  # conversations started per second; inf = all at t=0
    arrival: str = "poisson"
    burstiness: float = 1.0  # gamma shape k: 1 is Poisson, below 1 burstier
    tenants: str = "default=1"  # fairness weights; conversations are assigned to tenants uniformly
    think: str = "closed"  # closed: think_time_s; reading: read the last reply, then type the new message
    think_time_s: float = 0.0
    reading_tokens_per_s: float = 20.0
    typing_tokens_per_s: float = 5.0
    max_context: int = 8192
    scale: float = 1.0  # multiplies every token length (min 1 token), for small CPU runs
    max_reply_tokens: int = 1024  # applied before scale
    priority_pattern: str = "none"
    priority_interval_s: float = 1.0
    priority_levels: int = 4
    markov_stay: float = 0.8  # otherwise move one level up or down, equally likely, reflecting at the ends
    priority_ticks: int = 0  # 0: cover arrival + think times + ESTIMATED_TURN_S per turn, at most 10,000
    vocab_size: int = 1024
    first_token_id: int = 3  # user ids are drawn from [first_token_id, vocab_size), avoiding special ids
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("num_conversations", "max_reply_tokens", "priority_levels"):
            check_value(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("priority_ticks", "first_token_id", "seed"):
            check_value(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("burstiness", "reading_tokens_per_s", "typing_tokens_per_s", "scale"):
            check_value(0 < getattr(self, name) < math.inf, name, getattr(self, name), "must be a finite number > 0")
        for name in ("think_time_s", "priority_interval_s"):
            check_value(0 <= getattr(self, name) < math.inf, name, getattr(self, name), "must be finite and >= 0")
        for name, allowed in (("arrival", ARRIVALS), ("think", THINK_MODES), ("priority_pattern", PRIORITY_PATTERNS)):
            check_value(getattr(self, name) in allowed, name, getattr(self, name), f"choose one of {allowed}")
        check_value(self.request_rate > 0, "request_rate", self.request_rate, "must be > 0 (inf: all at t=0)")
        check_value(self.max_context >= 2, "max_context", self.max_context, "must be >= 2 (one user + one reply token)")
        check_value(0 <= self.markov_stay <= 1, "markov_stay", self.markov_stay, "must be in [0, 1]")
        check_value(self.vocab_size > self.first_token_id, "vocab_size", self.vocab_size,
               f"must be > first_token_id={self.first_token_id}")
        parse_tenants(self.tenants)


# A raw turn before scale and the context cap: the user message as token ids (from a tokenizer) or as a
# length to fill with pseudo ids, and the reply length.
RawTurn = tuple[list[int] | int, int]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _lognormal_ints(rng: np.random.Generator, ln: tuple[float, float], size: int) -> np.ndarray:
    return np.maximum(np.rint(rng.lognormal(ln[0], ln[1], size)), 1).astype(np.int64)


def _synthetic_turns(config: WorkloadConfig, rng: np.random.Generator) -> list[list[RawTurn]]:
    """Rounds and lengths of every conversation, drawn as whole arrays (per-turn draws cost seconds)."""
    n = config.num_conversations
    rounds = np.minimum(_lognormal_ints(rng, ROUNDS_LN, n), MAX_ROUNDS)
    users = _lognormal_ints(rng, USER_LATER_LN, int(rounds.sum()))
    starts = np.concatenate([[0], np.cumsum(rounds)[:-1]])
    users[starts] = _lognormal_ints(rng, USER_FIRST_LN, n)
    replies = np.minimum(_lognormal_ints(rng, REPLY_LN, int(rounds.sum())), config.max_reply_tokens)
    pairs = list(zip(users.tolist(), replies.tolist()))
    return [pairs[start:start + count] for start, count in zip(starts.tolist(), rounds.tolist())]


def _length(raw: list[int] | int) -> int:
    return raw if isinstance(raw, int) else len(raw)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _fit_context(lengths: list[tuple[int, int]], max_context: int) -> list[tuple[int, int]]:
    """Keep turns while the whole history fits; a first turn that alone does not fit is truncated."""
    kept, used = [], 0
    for user, reply in lengths:
        if used + user + reply > max_context:
            break
        kept.append((user, reply))
        used += user + reply
    if not kept:
        user, reply = lengths[0]
        reply = min(reply, max_context - 1)
        kept = [(min(user, max_context - reply), reply)]
    return kept


def _think_times(config: WorkloadConfig, lengths: list[tuple[int, int]]) -> list[float]:
    if config.think == "closed":
        return [0.0] + [float(config.think_time_s)] * (len(lengths) - 1)
    return [0.0] + [
        prev_reply / config.reading_tokens_per_s + user / config.typing_tokens_per_s
        for (_, prev_reply), (user, _) in zip(lengths, lengths[1:])
    ]


def _priorities(config: WorkloadConfig, rng: np.random.Generator, horizon_s: float) -> list[int]:
    levels = config.priority_levels
    if config.priority_pattern == "none":
        return [0]
    if config.priority_interval_s <= 0:
        return [int(rng.integers(levels))]
    ticks = config.priority_ticks or min(MAX_AUTO_TICKS, math.ceil(horizon_s / config.priority_interval_s) + 1)
    if config.priority_pattern == "random":
        return rng.integers(levels, size=ticks).tolist()
    return _markov_walk(config, rng, ticks)


def _markov_walk(config: WorkloadConfig, rng: np.random.Generator, ticks: int) -> list[int]:
    """Uniform start; each tick stay with probability markov_stay, else step one level, reflecting at the ends."""
    top = config.priority_levels - 1
    moves = rng.random(ticks - 1) >= config.markov_stay
    steps = rng.choice((-1, 1), size=ticks - 1)
    walk = [int(rng.integers(top + 1))]
    for move, step in zip(moves, steps):
        level = walk[-1] + int(step) if move and top > 0 else walk[-1]
        walk.append(1 if level < 0 else top - 1 if level > top else level)
    return walk


def _arrivals(config: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    n, rate = config.num_conversations, config.request_rate
    if math.isinf(rate):
        return np.zeros(n)
    if config.arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    else:
        gaps = rng.gamma(config.burstiness, 1.0 / (rate * config.burstiness), n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _build_trace(config: WorkloadConfig, raw: list[list[RawTurn]], rng: np.random.Generator,
                 settings: dict[str, Any]) -> Trace:
    """Apply arrivals, tenants, scale, the context cap, think times and priorities to raw turns."""
    weights = parse_tenants(config.tenants)
    names = list(weights)
    arrivals = _arrivals(config, rng)[: len(raw)].tolist()
    tenant_index = rng.integers(len(names), size=len(raw)).tolist()
    lengths = [_fit_context([(_scaled(_length(u), config.scale), _scaled(r, config.scale)) for u, r in turns],
                            config.max_context) for turns in raw]
    # one draw for every pseudo id of the trace: a numpy call per turn would dominate the run time
    wanted = sum(n for turns, kept in zip(raw, lengths) for (u, _), (n, _) in zip(turns, kept) if isinstance(u, int))
    pseudo = iter(rng.integers(config.first_token_id, config.vocab_size, size=wanted).tolist())
    conversations = []
    for i, (raw_turns, kept, arrival, tenant) in enumerate(zip(raw, lengths, arrivals, tenant_index)):
        thinks = _think_times(config, kept)
        turns = [Turn(ids, reply, think) for ids, (_, reply), think
                 in zip(_user_ids(raw_turns, kept, pseudo), kept, thinks)]
        horizon_s = arrival + sum(thinks) + ESTIMATED_TURN_S * len(turns)
        conversations.append(Conversation(f"c{i}", names[tenant], arrival, turns,
                                          _priorities(config, rng, horizon_s)))
    return Trace(conversations, weights, float(config.priority_interval_s), settings)


def _user_ids(raw_turns: list[RawTurn], lengths: list[tuple[int, int]], pseudo: Iterator[int]) -> list[list[int]]:
    """Each kept turn's ids: the tokenizer's, cut or repeated to the scaled length, or the next pseudo ids."""
    return [(raw * -(-n // len(raw)))[:n] if isinstance(raw, list) else list(islice(pseudo, n))
            for (raw, _), (n, _) in zip(raw_turns, lengths)]


def generate(config: WorkloadConfig) -> Trace:
    """Draw a synthetic trace; the same config (seed included) always gives the identical trace."""
    rng = np.random.default_rng(config.seed)
    return _build_trace(config, _synthetic_turns(config, rng), rng, dataclasses.asdict(config))


def load_sharegpt(path: str | Path, tokenizer: Tokenizer | None = None,
                  config: WorkloadConfig = WorkloadConfig()) -> Trace:
    """Turn the first ``num_conversations`` usable ShareGPT conversations into a trace.

    ``path`` is a ShareGPT JSON file, or "auto" for the packaged ShareGPT V3 (see bench.sharegpt). A file
    cut off mid-record keeps its complete records; those cut off or not ShareGPT format are counted in
    ``settings["skipped_records"]``. Without a tokenizer a message of n characters becomes max(1, round(n /
    4)) seeded pseudo ids (about 4 characters per token for English). Everything but the lengths comes from
    ``config`` as in generate().
    """
    source = sharegpt_path(path)
    records, skipped = read_sharegpt_records(source)
    rng = np.random.default_rng(config.seed)

    def tokens(text: str) -> list[int] | int:
        if tokenizer is None:
            return max(1, round(len(text) / 4))
        return list(tokenizer.encode(text, add_special_tokens=False)) or [config.first_token_id]

    raw: list[list[RawTurn]] = []
    for index, record in enumerate(records):
        pairs = sharegpt_pairs(record, index, source)
        if pairs and len(raw) < config.num_conversations:
            raw.append([(tokens(user), min(_length(tokens(reply)), config.max_reply_tokens)) for user, reply in pairs])
    if not raw:
        raise ValueError(f"{source} has no conversation with a human message followed by a gpt reply "
                         f"({len(records)} ShareGPT records, {skipped} skipped as cut off or not ShareGPT format)")
    settings = {**dataclasses.asdict(config), "source": str(source), "tokenized": tokenizer is not None,
                "parsed_records": len(records), "skipped_records": skipped}
    return _build_trace(config, raw, rng, settings)
