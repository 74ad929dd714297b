"""Scheduling policies on their own: ranking keys and VTC's per-tenant accounting."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_engine.config import SchedulerConfig
from fs_engine.request import Request
from fs_engine.sampling_params import SamplingParams
from fs_engine.sched.policies import (
    OUTPUT_TOKEN_COST,
    PROMPT_TOKEN_COST,
    FCFSPolicy,
    PriorityPolicy,
    VTCPolicy,
    make_policy,
)


def req(request_id: str, arrival_seq: int, priority: int = 0, tenant: str = "default") -> Request:
    return Request(request_id, [1, 2, 3], SamplingParams(max_tokens=4), priority=priority, tenant=tenant,
                   arrival_seq=arrival_seq)


def order(policy, requests: list[Request]) -> list[str]:
    return [r.request_id for r in sorted(requests, key=policy.rank)]


def test_token_costs_are_the_papers():
    assert (PROMPT_TOKEN_COST, OUTPUT_TOKEN_COST) == (1.0, 2.0)


def test_fcfs_ranks_by_arrival_only():
    requests = [req("c", 2, priority=-5, tenant="x"), req("a", 0, priority=9), req("b", 1, tenant="y")]
    assert order(FCFSPolicy(), requests) == ["a", "b", "c"]
    requests[1].priority = -100  # priority means nothing to fcfs
    assert order(FCFSPolicy(), list(reversed(requests))) == ["a", "b", "c"]


def test_priority_ranks_by_priority_then_arrival_and_follows_changes():
    a, b, c, d = req("a", 0, priority=2), req("b", 1, priority=1), req("c", 2, priority=1), req("d", 3, priority=0)
    policy = PriorityPolicy()
    assert order(policy, [a, b, c, d]) == ["d", "b", "c", "a"]
    a.priority = -1  # update_priority only writes the field; the next ranking must see it
    assert order(policy, [a, b, c, d]) == ["a", "d", "b", "c"]
    c.priority = 1
    b.priority = 1
    assert order(policy, [c, b]) == ["b", "c"]  # equal priority: earlier arrival first
    d.priority = 5
    assert order(policy, [a, b, c, d]) == ["a", "b", "c", "d"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 1000)), min_size=1, max_size=12, unique_by=lambda t: t[1]))
def test_priority_order_is_a_sort_by_priority_then_arrival(specs):
    requests = [req(f"r{arrival}", arrival, priority=p) for p, arrival in specs]
    expected = [f"r{a}" for p, a in sorted(specs)]
    assert order(PriorityPolicy(), requests) == expected


def test_vtc_counter_grows_by_weighted_cost_over_weight():
    policy = VTCPolicy({"gold": 4.0})
    gold, free = req("g", 0, tenant="gold"), req("f", 1, tenant="free")
    policy.on_served(gold, 10, 0)
    policy.on_served(gold, 0, 3)
    policy.on_served(free, 10, 0)
    policy.on_served(free, 0, 3)
    assert policy.counters["gold"] == pytest.approx((10 * 1 + 3 * 2) / 4)
    assert policy.counters["free"] == pytest.approx(10 * 1 + 3 * 2)  # unlisted tenants weigh 1
    assert policy.served_tokens == {"gold": pytest.approx(16.0), "free": pytest.approx(16.0)}
    assert policy.weight("gold") == 4.0 and policy.weight("nobody") == 1.0
    policy.check_invariants()


def test_vtc_least_served_tenant_ranks_first_ties_by_arrival():
    policy = VTCPolicy()
    a1, b1 = req("a1", 0, tenant="a"), req("b1", 1, tenant="b")
    a2, c1 = req("a2", 2, tenant="a"), req("c1", 3, tenant="c")
    for r in (a1, b1, a2, c1):
        policy.on_arrival(r, [])
    assert order(policy, [c1, a2, b1, a1]) == ["a1", "b1", "a2", "c1"]  # all at 0: arrival order
    policy.on_served(a1, 5, 0)  # a: 5
    assert order(policy, [a1, b1, a2, c1]) == ["b1", "c1", "a1", "a2"]
    policy.on_served(b1, 0, 4)  # b: 8
    policy.on_served(c1, 1, 0)  # c: 1
    assert order(policy, [a1, b1, a2, c1]) == ["c1", "a1", "a2", "b1"]
    # priority means nothing to vtc
    c1.priority = 100
    assert order(policy, [a1, b1, a2, c1])[0] == "c1"


def test_vtc_weights_share_service():
    """Serving whoever ranks first, one token at a time, gives each tenant service in proportion to weight."""
    policy = VTCPolicy({"a": 3.0, "b": 1.0, "c": 2.0})
    backlog = [req(t, i, tenant=t) for i, t in enumerate("abc")]
    for r in backlog:
        policy.on_arrival(r, [])
    for _ in range(6000):
        first = min(backlog, key=policy.rank)
        policy.on_served(first, 0, 1)
    s = policy.served_tokens
    assert s["a"] / s["b"] == pytest.approx(3.0, rel=0.01)
    assert s["c"] / s["b"] == pytest.approx(2.0, rel=0.01)


def test_vtc_returning_tenant_is_lifted_to_the_least_served_active_tenant():
    policy = VTCPolicy()
    old = req("old", 0, tenant="a")
    policy.on_arrival(old, [])
    policy.on_served(old, 10, 0)  # a: 10, then a goes idle
    b, c = req("b", 1, tenant="b"), req("c", 2, tenant="c")
    policy.on_arrival(b, [])
    policy.counters["b"] = 50.0
    policy.counters["c"] = 30.0
    policy.counters["d"] = 0.0  # d is idle: its small counter must not be the floor
    live = [b, c]
    back = req("back", 4, tenant="a")
    policy.on_arrival(back, live)
    assert policy.counters["a"] == 30.0  # min over active tenants b (50) and c (30), not idle d
    # idling banks no credit: the returning tenant does not jump ahead of the active ones
    assert order(policy, [b, c, back]) == ["c", "back", "b"]
    policy.check_invariants()


def test_vtc_lift_never_lowers_a_counter():
    policy = VTCPolicy()
    policy.counters.update({"a": 80.0, "b": 20.0})
    policy.on_arrival(req("a2", 5, tenant="a"), [req("b1", 1, tenant="b")])
    assert policy.counters["a"] == 80.0


def test_vtc_no_lift_while_the_tenant_is_active():
    policy = VTCPolicy()
    policy.counters.update({"a": 5.0, "b": 20.0})
    live = [req("a1", 0, tenant="a"), req("b1", 1, tenant="b")]
    policy.on_arrival(req("a2", 2, tenant="a"), live)
    assert policy.counters["a"] == 5.0  # a had a live request: it is not returning from idle


def test_vtc_with_no_active_tenant_keeps_the_counter():
    policy = VTCPolicy()
    policy.counters.update({"a": 12.5, "b": 40.0})
    policy.on_arrival(req("a1", 0, tenant="a"), [])
    assert policy.counters["a"] == 12.5
    policy.on_arrival(req("new", 1, tenant="new"), [])
    assert policy.counters["new"] == 0.0
    policy.on_arrival(req("new2", 2, tenant="late"), [req("x", 0, tenant="b")])
    assert policy.counters["late"] == 40.0  # a brand-new tenant starts at the active floor, not at 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_vtc_counters_match_a_recount(seed):
    rng = random.Random(seed)
    weights = {"a": rng.choice([0.5, 1.0, 3.0]), "b": rng.choice([1.0, 2.0])}
    policy = VTCPolicy(weights)
    spent = {"a": 0.0, "b": 0.0, "c": 0.0}
    for i in range(50):
        tenant = rng.choice("abc")
        p, o = rng.randint(0, 20), rng.randint(0, 3)
        policy.on_served(req(f"r{i}", i, tenant=tenant), p, o)
        spent[tenant] += p + 2 * o
        policy.check_invariants()
    for t in "abc":
        assert policy.counters.get(t, 0.0) == pytest.approx(spent[t] / weights.get(t, 1.0))
    assert policy.stats() == {f"vtc_service_{t}": round(spent[t], 1) for t in "abc" if t in policy.served_tokens}


def test_vtc_stats_report_unweighted_service_per_tenant():
    policy = VTCPolicy({"a": 3.0})
    policy.on_served(req("x", 0, tenant="b"), 7, 2)
    policy.on_served(req("y", 1, tenant="a"), 4, 1)
    assert policy.stats() == {"vtc_service_a": 6.0, "vtc_service_b": 11.0}
    assert FCFSPolicy().stats() == {} and PriorityPolicy().stats() == {}


def test_make_policy_builds_each_and_rejects_unknown_names():
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    assert isinstance(make_policy("priority"), PriorityPolicy)
    vtc = make_policy("vtc", [("a", 3.0), ("b", 1.0)])
    assert isinstance(vtc, VTCPolicy) and vtc.weight("a") == 3.0 and vtc.weight("zzz") == 1.0
    # the config's parsed weights feed it directly
    config = SchedulerConfig(policy="vtc", tenant_weights="alice=3,bob=1")
    assert make_policy(config.policy, config.tenant_weights).weights == {"alice": 3.0, "bob": 1.0}
    for bad in ("FCFS", "lottery", ""):
        with pytest.raises(ValueError, match="policy"):
            make_policy(bad)
