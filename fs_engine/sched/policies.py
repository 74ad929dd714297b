"""Scheduling policies: how live requests are ranked every step. Smaller ``rank`` runs first.

A policy only orders requests and keeps its own accounting; the scheduler decides what fits and whom to
preempt. Ties always fall back to arrival order, so every ranking is total and deterministic.

Every rank has the shape ``(*group_rank(group(request)), arrival_seq)``: requests fall into groups (one for
fcfs, a priority level, a tenant) whose order inside never changes, so the scheduler keeps them ranked
incrementally (``fs_engine.sched.ranking``); ``rank_version`` changes whenever group ranks move.

- ``fcfs``: arrival order (vLLM's behaviour).
- ``priority``: the client's integer priority, lower first; ``LLMEngine.update_priority`` changes it live.
- ``vtc``: Virtual Token Counter fair share across tenants (Sheng et al., OSDI 2024). Each tenant's counter
  grows by the tokens it is served (prompt tokens x 1, generated tokens x 2, as in the paper) divided by
  its weight; the tenant with the smallest counter goes first. A tenant that had no live request is lifted
  to the smallest counter among active tenants when it returns, so idling banks no credit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable

from fs_engine.request import Request

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0


class Policy(ABC):
    name: str
    rank_version = 0  # bumped whenever a group's rank changes
    accounts_service = False  # on_served does something (the scheduler skips the call otherwise)

    @abstractmethod
    def group(self, request: Request) -> Hashable:
        """The group whose rank the request takes (requests of one group are ordered by arrival)."""

    @abstractmethod
    def group_rank(self, group: Hashable) -> tuple:
        """Sort key of a group: its requests run before those of groups with larger keys."""

    def rank(self, request: Request) -> tuple:
        """Sort key: requests with smaller keys are scheduled first."""
        return (*self.group_rank(self.group(request)), request.arrival_seq)

    def on_arrival(self, request: Request, live: Iterable[Request]) -> None:
        """A request was added; ``live`` are requests already in the engine, at least one of each group
        (the scheduler passes one per group, so an arrival costs O(groups), not O(live requests))."""

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """A step computed ``prompt_tokens`` new prompt tokens and sampled ``output_tokens`` for ``request``."""

    def stats(self) -> dict[str, float]:
        return {}

    def check_invariants(self) -> None:
        pass


class FCFSPolicy(Policy):
    name = "fcfs"

    def group(self, request: Request) -> Hashable:
        return None

    def group_rank(self, group: Hashable) -> tuple:
        return ()


class PriorityPolicy(Policy):
    name = "priority"

    def group(self, request: Request) -> Hashable:
        return request.priority

    def group_rank(self, group: Hashable) -> tuple:
        return (group,)


class VTCPolicy(Policy):
    name = "vtc"
    accounts_service = True

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self.counters: dict[str, float] = {}  # tenant -> weighted service received
        self.served_tokens: dict[str, float] = {}  # tenant -> unweighted service (prompt x1 + output x2)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def group(self, request: Request) -> Hashable:
        return request.tenant

    def group_rank(self, group: Hashable) -> tuple:
        return (self.counters.get(group, 0.0),)

    def on_arrival(self, request: Request, live: Iterable[Request]) -> None:
        tenant = request.tenant
        active = {r.tenant for r in live}
        if tenant in active:
            return
        floor = min((self.counters.get(t, 0.0) for t in active), default=None)
        current = self.counters.get(tenant, 0.0)
        # returning from idle: catch up to the least-served active tenant, never fall behind it
        self.counters[tenant] = current if floor is None else max(current, floor)
        self.rank_version += 1

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        cost = PROMPT_TOKEN_COST * prompt_tokens + OUTPUT_TOKEN_COST * output_tokens
        tenant = request.tenant
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)
        self.rank_version += 1
        self.served_tokens[tenant] = self.served_tokens.get(tenant, 0.0) + cost

    def stats(self) -> dict[str, float]:
        return {f"vtc_service_{t}": round(s, 1) for t, s in sorted(self.served_tokens.items())}

    def check_invariants(self) -> None:
        assert all(c >= 0 for c in self.counters.values()), "a virtual token counter went negative"


def make_policy(name: str, tenant_weights: Iterable[tuple[str, float]] = ()) -> Policy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "vtc":
        return VTCPolicy(dict(tenant_weights))
    raise ValueError(f"policy={name!r} is invalid: choose one of ('fcfs', 'priority', 'vtc')")
