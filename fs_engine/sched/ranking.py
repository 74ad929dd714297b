"""Live requests in policy rank order, kept up to date as they change instead of sorted every step.

Every policy ranks a request by ``(*policy.group_rank(group), arrival_seq)`` where ``group =
policy.group(request)``: one group for ``fcfs``, a priority level for ``priority``, a tenant for ``vtc``.
Within a group the order never changes (arrival), so each group is a list kept sorted on insertion; the
groups are ordered by their rank, re-sorted only when the policy says group ranks moved (VTC counters), and
groups that tie are merged by arrival. Iterating yields exactly ``sorted(requests, key=policy.rank)``
(ties beyond arrival in insertion order, as a stable sort of the request table would give), lazily: a
step that fills its batch from the top looks at the top of the order only.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Hashable, Iterator

from fs_engine.request import Request
from fs_engine.sched.policies import Policy


class _Group:
    __slots__ = ("key", "keys", "requests")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.keys: list[tuple[int, int]] = []  # (arrival_seq, insertion order), ascending
        self.requests: list[Request] = []


class RankedQueue:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._groups: dict[Hashable, _Group] = {}
        self._order: list[_Group] = []  # by group rank
        self._where: dict[str, tuple[_Group, tuple[int, int]]] = {}  # request id -> its group and key
        self._version = policy.rank_version
        self._seq = itertools.count()  # insertion order: breaks ties of equal arrival_seq

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request: Request) -> bool:
        return request.request_id in self._where

    def add(self, request: Request, key: tuple[int, int] | None = None) -> None:
        assert request.request_id not in self._where, f"{request.request_id} is queued already"
        gkey = self.policy.group(request)
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = _Group(gkey)
            rank = self.policy.group_rank
            i = bisect.bisect_right([rank(g.key) for g in self._order], rank(gkey)) if self._order else 0
            self._order.insert(i, group)
        key = key or (request.arrival_seq, next(self._seq))
        i = bisect.bisect_right(group.keys, key)
        group.keys.insert(i, key)
        group.requests.insert(i, request)
        self._where[request.request_id] = (group, key)

    def remove(self, request: Request) -> tuple[int, int]:
        group, key = self._where.pop(request.request_id)
        i = bisect.bisect_left(group.keys, key)
        del group.keys[i], group.requests[i]
        if not group.keys:
            del self._groups[group.key]
            self._order.remove(group)
        return key

    def regroup(self, request: Request) -> None:
        """The request's group changed (a new priority): move it, keeping its place among equal arrivals."""
        if request.request_id in self._where and self._where[request.request_id][0].key != self.policy.group(request):
            self.add(request, self.remove(request))

    def group_heads(self) -> list[Request]:
        """One request of every group (a tenant's, a priority level's): what is live, per group, in O(groups)."""
        return [group.requests[0] for group in self._order]

    def _runs(self) -> list[list[_Group]]:
        """Groups in rank order, those of equal rank together."""
        rank = self.policy.group_rank
        if self._version != self.policy.rank_version:
            self._order.sort(key=lambda g: rank(g.key))  # nearly sorted already: linear for timsort
            self._version = self.policy.rank_version
        runs: list[list[_Group]] = []
        last = None
        for group in self._order:
            r = rank(group.key)
            if runs and r == last:
                runs[-1].append(group)
            else:
                runs.append([group])
            last = r
        return runs

    def __iter__(self) -> Iterator[Request]:
        if len(self._order) == 1:
            return iter(list(self._order[0].requests))
        return self._iter(reverse=False)

    def reversed(self) -> Iterator[Request]:
        """Lowest rank first."""
        if len(self._order) == 1:
            return iter(self._order[0].requests[::-1])
        return self._iter(reverse=True)

    def _iter(self, reverse: bool) -> Iterator[Request]:
        runs = self._runs()
        for run in reversed(runs) if reverse else runs:
            if len(run) == 1:
                requests = run[0].requests
                yield from (requests[::-1] if reverse else list(requests))
                continue
            streams = [zip(g.keys[::-1], g.requests[::-1]) if reverse else zip(list(g.keys), list(g.requests))
                       for g in run]
            for _, request in heapq.merge(*streams, key=lambda kr: kr[0], reverse=reverse):
                yield request

    def check_invariants(self, live: list[Request]) -> None:
        expected = sorted(live, key=self.policy.rank)
        got = list(self)
        assert [r.request_id for r in got] == [r.request_id for r in expected], "the ranked queue is out of order"
