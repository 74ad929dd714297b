"""Dynamic block-group allocator: KV blocks handed out as a few contiguous runs (FastSwitch, section 4.1).

Free memory is a set of maximal free extents ``[start, start + length)``. A request's blocks form a short
list of runs, so a swap moves each run with one copy instead of one copy per block:

    arena:  | A A A A . . . . | B B B . . . . . . | C C . . |
                      ^ A grows in place here      ^ B grows here

Placement policy:
- **grow in place** when the block after the request's last block is free (``allocate(n, after=last)``);
- otherwise a **new run** goes into the largest free extent. If that extent follows someone's run, the new
  run starts in the middle of the gap, leaving the first half for the neighbour's growth and the second
  half for its own; an extent at the arena's start is used from its start.
- if no extent holds the whole request, it takes the largest extents one after another: the allocator
  never refuses what a one-block-at-a-time allocator would grant (``n <= num_free_blocks``).

Freed runs merge with free neighbours, so free memory returns to large extents.
"""

from __future__ import annotations

import bisect
import heapq


class BlockGroupAllocator:
    name = "group"

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._starts: list[int] = [0]  # sorted starts of free extents
        self._length: dict[int, int] = {0: num_blocks}  # start -> length
        self._start_of_end: dict[int, int] = {num_blocks: 0}  # end (exclusive) -> start
        self._num_free = num_blocks
        # (-length, start) of every extent ever added: the largest, leftmost live one is found by popping
        # entries whose extent no longer exists (lazy deletion), so placement never scans all extents
        self._by_length: list[tuple[int, int]] = [(-num_blocks, 0)]

    # ---- queries -----------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def largest_free_extent(self) -> int:
        start = self._largest()
        return 0 if start is None else self._length[start]

    def _largest(self) -> int | None:
        """Start of the largest free extent (leftmost on ties), or None when nothing is free."""
        heap = self._by_length
        while heap:
            neg_length, start = heap[0]
            if self._length.get(start) == -neg_length:
                return start
            heapq.heappop(heap)  # stale: that extent was taken, split or merged since
        return None

    def free_extents(self) -> list[tuple[int, int]]:
        return [(s, self._length[s]) for s in self._starts]

    # ---- extent bookkeeping ------------------------------------------------------------------------------
    def _remove_extent(self, start: int) -> int:
        length = self._length.pop(start)
        del self._start_of_end[start + length]
        del self._starts[bisect.bisect_left(self._starts, start)]
        return length

    def _add_extent(self, start: int, length: int) -> None:
        if length <= 0:
            return
        bisect.insort(self._starts, start)
        self._index_extent(start, length)

    def _take(self, start: int, offset: int, n: int) -> list[int]:
        """Carve blocks ``[start + offset, start + offset + n)`` out of the free extent at ``start``. What is
        left of the extent keeps its place in ``_starts`` (only a split inserts), so growing a run in place
        costs no list shifting."""
        length = self._length.pop(start)
        assert 0 <= offset and offset + n <= length
        del self._start_of_end[start + length]
        i = bisect.bisect_left(self._starts, start)
        head, tail, cut = offset, length - offset - n, start + offset + n
        if head:
            self._index_extent(start, head)
            if tail:
                self._starts.insert(i + 1, cut)
        elif tail:
            self._starts[i] = cut
        else:
            del self._starts[i]
        if tail:
            self._index_extent(cut, tail)
        self._num_free -= n
        return list(range(start + offset, cut))

    def _index_extent(self, start: int, length: int) -> None:
        """Record an extent already placed in ``_starts``."""
        self._length[start] = length
        self._start_of_end[start + length] = start
        heapq.heappush(self._by_length, (-length, start))
        if len(self._by_length) > 2 * len(self._length) + 64:  # mostly stale entries: rebuild
            self._by_length = [(-n, s) for s, n in self._length.items()]
            heapq.heapify(self._by_length)

    # ---- allocation --------------------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """``n`` block ids, contiguous where possible; None (and no change) if fewer than ``n`` are free.

        ``after``: the request's current last block, so that its next blocks can extend that run.
        """
        if n > self._num_free:
            return None
        ids: list[int] = []
        if n and after is not None and (after + 1) in self._length:
            ids += self._take(after + 1, 0, min(n, self._length[after + 1]))
        while len(ids) < n:
            need = n - len(ids)
            start = self._largest()
            length = self._length[start]
            if length >= need:
                offset = 0 if start == 0 else (length - need) // 2
                ids += self._take(start, offset, need)
            else:  # nothing holds the rest in one run: take this whole extent and continue
                ids += self._take(start, 0, length)
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Return blocks; all or nothing: a bad id raises before any block is released."""
        if len(set(block_ids)) != len(block_ids):
            raise RuntimeError(f"a block appears twice in {sorted(block_ids)}")
        runs = runs_of(sorted(block_ids))
        for start, length in runs:
            self._check_allocated(start, start + length)
        for start, length in runs:
            self._free_run(start, length)

    def _check_allocated(self, start: int, end: int) -> None:
        if start < 0 or end > self.num_blocks:
            raise ValueError(f"blocks {start}..{end - 1} are outside [0, {self.num_blocks})")
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._starts[i] + self._length[self._starts[i]] > start:  # overlaps the extent before
            raise RuntimeError(f"blocks {start}..{end - 1} freed twice")
        if i + 1 < len(self._starts) and self._starts[i + 1] < end:  # or the one after
            raise RuntimeError(f"blocks {start}..{end - 1} freed twice")

    def _free_run(self, start: int, length: int) -> None:
        end = start + length
        self._num_free += length
        if start in self._start_of_end:  # merge with the free extent ending right here
            prev = self._start_of_end[start]
            length += self._remove_extent(prev)
            start = prev
        if end in self._length:  # and with the one starting right after
            length += self._remove_extent(end)
        self._add_extent(start, length)

    def check_invariants(self) -> None:
        assert self._starts == sorted(self._length), "extent index out of order"
        total = 0
        prev_end = -1
        for start in self._starts:
            length = self._length[start]
            assert length > 0, f"empty extent at {start}"
            assert start > prev_end, f"extents at {start} touch or overlap: not merged"
            assert self._start_of_end[start + length] == start, "end index disagrees"
            assert start + length <= self.num_blocks, "extent past the arena"
            prev_end = start + length
            total += length
        assert len(self._start_of_end) == len(self._length), "stale end index entries"
        assert total == self._num_free, f"free count {self._num_free} != extents {total}"
        live = {(-n, s) for s, n in self._length.items()}
        assert live <= set(self._by_length), "a free extent is missing from the length heap"


def runs_of(block_ids: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``(start, length)`` of a block table, in table order (not sorted)."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def paired_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Copy runs ``(src_start, dst_start, n)`` moving block ``src[i]`` to ``dst[i]`` for every i: consecutive
    pairs that are contiguous on both sides merge into one run (one copy at ``group`` granularity)."""
    assert len(src) == len(dst), "source and destination block lists differ in length"
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
