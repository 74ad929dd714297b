"""Workload traces: seeded, ShareGPT-shaped, within the context cap, and readable back exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fs_engine.bench.workload import (
    Conversation,
    Trace,
    Turn,
    WorkloadConfig,
    generate,
    load_sharegpt,
    parse_tenants,
)

NO_CAP = 10**9


def _history_tokens(conv: Conversation) -> int:
    return sum(len(t.user_token_ids) + t.reply_tokens for t in conv.turns)


def _gaps(trace: Trace) -> np.ndarray:
    return np.diff([c.arrival_s for c in trace.conversations])


def test_same_seed_gives_identical_json_and_another_seed_differs(tmp_path):
    config = WorkloadConfig(num_conversations=20, tenants="a=2,b=1", priority_pattern="markov", think="reading")
    generate(config).save(tmp_path / "a.json")
    generate(config).save(tmp_path / "b.json")
    generate(dataclasses.replace(config, seed=1)).save(tmp_path / "c.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert (tmp_path / "a.json").read_text() != (tmp_path / "c.json").read_text()


def test_save_load_round_trips_exactly_as_valid_json(tmp_path):
    config = WorkloadConfig(num_conversations=12, request_rate=math.inf, tenants="a=3,b=1",
                            priority_pattern="random", think="reading", scale=0.2)
    trace = generate(config)
    trace.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["settings"]["seed"] == 0
    assert Trace.load(tmp_path / "t.json") == trace
    assert trace.settings == dataclasses.asdict(config)


def test_rounds_have_median_3_and_mean_6_to_7_before_the_context_cap():
    # scale shrinks only token lengths, so the rounds are those of full-size conversations
    summary = generate(WorkloadConfig(num_conversations=20_000, max_context=NO_CAP, scale=1e-3)).summary()
    assert summary["rounds_median"] == 3
    assert 6.0 <= summary["rounds_mean"] <= 7.0  # measured 6.51-6.70 over seeds 0-4


def test_user_tokens_follow_the_sharegpt_lognormals():
    trace = generate(WorkloadConfig(num_conversations=3000, max_context=NO_CAP))
    first = np.log([len(c.turns[0].user_token_ids) for c in trace.conversations])
    later = np.log([len(t.user_token_ids) for c in trace.conversations for t in c.turns[1:]])
    assert first.mean() == pytest.approx(3.61, abs=0.1) and first.std() == pytest.approx(1.52, abs=0.1)
    assert later.mean() == pytest.approx(3.13, abs=0.1) and later.std() == pytest.approx(1.34, abs=0.1)
    ids = np.concatenate([t.user_token_ids for t in trace.conversations[0].turns])
    assert ids.min() >= 3 and ids.max() < 1024


def test_reply_tokens_have_median_300_p90_625_and_never_exceed_1024():
    trace = generate(WorkloadConfig(num_conversations=3000, max_context=NO_CAP, vocab_size=4))
    replies = np.array([t.reply_tokens for c in trace.conversations for t in c.turns])
    assert np.median(replies) == pytest.approx(300, rel=0.1)
    assert np.percentile(replies, 90) == pytest.approx(625, rel=0.1)
    assert replies.max() <= 1024 and replies.min() >= 1


def test_every_conversation_fits_the_context_cap():
    trace = generate(WorkloadConfig(num_conversations=5000, vocab_size=4))
    assert all(_history_tokens(c) <= 8192 for c in trace.conversations)
    assert 3 == trace.summary()["rounds_median"]
    assert 5.0 <= trace.summary()["rounds_mean"] <= 5.9  # 5.33-5.48 on 20k, seeds 0-4; FastSwitch: 5.5


def test_a_tiny_context_keeps_one_truncated_turn():
    trace = generate(WorkloadConfig(num_conversations=200, max_context=16))
    for conv in trace.conversations:
        assert len(conv.turns) >= 1 and _history_tokens(conv) <= 16
        assert all(len(t.user_token_ids) >= 1 and t.reply_tokens >= 1 for t in conv.turns)


def test_scale_multiplies_every_length_with_a_floor_of_one_token():
    full = generate(WorkloadConfig(num_conversations=50, max_context=NO_CAP))
    small = generate(WorkloadConfig(num_conversations=50, max_context=NO_CAP, scale=0.1))
    for big_conv, small_conv in zip(full.conversations, small.conversations):
        assert len(big_conv.turns) == len(small_conv.turns)
        for big, little in zip(big_conv.turns, small_conv.turns):
            assert little.reply_tokens == max(1, round(big.reply_tokens * 0.1))
            assert len(little.user_token_ids) == max(1, round(len(big.user_token_ids) * 0.1))


def test_poisson_and_gamma_arrivals_keep_the_mean_rate_and_gamma_is_burstier():
    common = dict(num_conversations=4000, request_rate=4.0, scale=1e-3)
    poisson = _gaps(generate(WorkloadConfig(**common)))
    bursty = _gaps(generate(WorkloadConfig(**common, arrival="gamma", burstiness=0.25)))
    assert poisson.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.mean() == pytest.approx(0.25, rel=0.15)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, abs=0.1)
    assert bursty.std() / bursty.mean() > 1.5  # 1/sqrt(0.25) = 2
    assert generate(WorkloadConfig(**common)).conversations[0].arrival_s == 0.0


def test_infinite_rate_starts_every_conversation_at_zero():
    trace = generate(WorkloadConfig(num_conversations=10, request_rate=math.inf))
    assert [c.arrival_s for c in trace.conversations] == [0.0] * 10


def test_tenants_are_assigned_uniformly_and_keep_their_weights():
    trace = generate(WorkloadConfig(num_conversations=4000, tenants="a=3,b=1", scale=1e-3))
    counts = trace.summary()["conversations_per_tenant"]
    assert trace.tenant_weights == {"a": 3.0, "b": 1.0}
    assert 0.45 <= counts["a"] / 4000 <= 0.55 and counts["a"] + counts["b"] == 4000


@pytest.mark.parametrize("text", ["a", "a=0", "a=-1", "a=x", "a=inf", "a=1,a=2", "=1", "", "a=1,"])
def test_parse_tenants_rejects_malformed_pairs(text):
    with pytest.raises(ValueError, match="name=weight"):
        parse_tenants(text)


def test_think_times_closed_and_reading():
    closed = generate(WorkloadConfig(num_conversations=20, think_time_s=2.5))
    reading = generate(WorkloadConfig(num_conversations=20, think="reading"))
    for conv in closed.conversations:
        assert [t.think_s for t in conv.turns] == [0.0] + [2.5] * (len(conv.turns) - 1)
    for conv in reading.conversations:
        assert conv.turns[0].think_s == 0.0
        for prev, turn in zip(conv.turns, conv.turns[1:]):
            assert turn.think_s == pytest.approx(prev.reply_tokens / 20 + len(turn.user_token_ids) / 5)


def test_random_priorities_cover_every_level_and_none_stays_at_zero():
    trace = generate(WorkloadConfig(num_conversations=20, priority_pattern="random", priority_levels=5))
    assert {p for c in trace.conversations for p in c.priorities} == set(range(5))
    assert all(len(c.priorities) > 30 for c in trace.conversations)  # >= one 30 s turn of ticks at 1 s
    assert all(c.priorities == [0] for c in generate(WorkloadConfig(num_conversations=5)).conversations)


def test_markov_priorities_move_at_most_one_level_and_stay_as_configured():
    trace = generate(WorkloadConfig(num_conversations=20, priority_pattern="markov", priority_levels=4,
                                    markov_stay=0.7, priority_ticks=500))
    steps = np.concatenate([np.diff(c.priorities) for c in trace.conversations])
    levels = {p for c in trace.conversations for p in c.priorities}
    assert all(len(c.priorities) == 500 for c in trace.conversations)
    assert levels == {0, 1, 2, 3} and np.abs(steps).max() == 1
    assert (steps == 0).mean() == pytest.approx(0.7, abs=0.03)


def test_priority_at_reads_the_tick_and_holds_the_last_level():
    conv = Conversation("c0", "a", 0.0, [Turn([5], 1, 0.0)], [3, 1, 2])
    trace = Trace([conv], {"a": 1.0}, 2.0, {})
    assert [trace.priority_at(conv, t) for t in (0.0, 1.99, 2.0, 5.9, 100.0)] == [3, 3, 1, 2, 2]
    assert Trace([conv], {"a": 1.0}, 0.0, {}).priority_at(conv, 50.0) == 3
    assert trace.num_requests == 1


SHAREGPT = [
    {"id": "x1", "conversations": [
        {"from": "human", "value": "hello there, how are you?"},
        {"from": "gpt", "value": "fine " * 2000},
        {"from": "human", "value": "and?"},
        {"from": "gpt", "value": "ok"},
    ]},
    {"id": "x2", "conversations": [{"from": "human", "value": "unanswered"}]},
    {"id": "x3", "conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "user", "value": "hi"},
        {"from": "assistant", "value": "hey"},
    ]},
]


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [3 + ord(ch) % 50 for ch in text]


def test_sharegpt_without_a_tokenizer_counts_four_characters_per_token(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SHAREGPT))
    config = WorkloadConfig(tenants="a=1,b=1", think="reading")
    trace = load_sharegpt(tmp_path / "s.json", config=config)
    assert [len(c.turns) for c in trace.conversations] == [2, 1]  # x2 has no reply
    first, second = trace.conversations[0].turns
    assert len(first.user_token_ids) == round(25 / 4) and first.reply_tokens == 1024  # capped
    assert len(second.user_token_ids) == 1 and second.reply_tokens == 1  # "ok" rounds to 0, floor 1
    assert second.think_s == pytest.approx(1024 / 20 + 1 / 5)
    assert load_sharegpt(tmp_path / "s.json", config=config) == trace
    assert trace.settings["tokenized"] is False


def test_sharegpt_with_a_tokenizer_uses_its_ids(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SHAREGPT))
    trace = load_sharegpt(tmp_path / "s.json", FakeTokenizer(), WorkloadConfig(num_conversations=1))
    turns = trace.conversations[0].turns
    assert len(trace.conversations) == 1
    assert turns[0].user_token_ids == FakeTokenizer().encode("hello there, how are you?", add_special_tokens=False)
    assert turns[1].reply_tokens == 2


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"conversations": []}', "holds a dict"),
    ('[{"id": 1}]', "record 0 is not ShareGPT"),
    ('[{"conversations": [{"from": "human"}]}]', "record 0 is not ShareGPT"),
    ('[{"conversations": [{"from": "gpt", "value": "a"}]}]', "no conversation with a human message"),
])
def test_malformed_sharegpt_files_are_rejected(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_sharegpt(tmp_path / "bad.json")


@pytest.mark.parametrize("content", [
    "not json",
    "[]",
    '{"conversations": [], "tenant_weights": {}, "settings": {}}',
    '{"conversations": [{"turns": [], "conversation_id": "c0"}], "tenant_weights": {}, '
    '"priority_interval_s": 1, "settings": {}}',
])
def test_malformed_trace_files_are_rejected(tmp_path, content):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match="not a trace written by Trace.save"):
        Trace.load(tmp_path / "bad.json")


@pytest.mark.parametrize("field, value", [
    ("num_conversations", 0), ("num_conversations", 2.5), ("request_rate", 0.0), ("request_rate", math.nan),
    ("arrival", "uniform"), ("burstiness", 0.0), ("tenants", "a=0"), ("think", "slow"),
    ("think_time_s", -1.0), ("reading_tokens_per_s", 0.0), ("typing_tokens_per_s", -1.0),
    ("max_context", 1), ("scale", 0.0), ("max_reply_tokens", 0), ("priority_pattern", "sine"),
    ("priority_interval_s", -1.0), ("priority_levels", 0), ("markov_stay", 1.5), ("priority_ticks", -1),
    ("vocab_size", 3), ("first_token_id", -1), ("seed", -1), ("arrival", None),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "tenants" else "tenants="):
        WorkloadConfig(**{field: value})
