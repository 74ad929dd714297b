"""Single-block allocator over device KV block ids (vLLM's free-list pattern).

Allocation is all-or-nothing: either every requested block is handed out or none is, so a failed allocation
never leaves a half-grown request behind.
"""

from __future__ import annotations

from collections import deque


class FreeListAllocator:
    """Hands out single block ids from a FIFO free list; freed ids go to the back."""

    name = "block"

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def largest_free_extent(self) -> int:
        """Longest run of consecutive free ids (what one copy could move), computed on demand for stats."""
        best = run = 0
        prev = None
        for b in sorted(self._free):
            run = run + 1 if prev is not None and b == prev + 1 else 1
            best = max(best, run)
            prev = b
        return best

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """``n`` ids from the head of the free list (``after`` is ignored: no placement policy)."""
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Return blocks; all or nothing: a bad id raises before any block is released."""
        for i in block_ids:
            if not 0 <= i < self.num_blocks:
                raise ValueError(f"block id {i} is outside [0, {self.num_blocks})")
            if self._is_free[i]:
                raise RuntimeError(f"block {i} freed twice")
        if len(set(block_ids)) != len(block_ids):
            raise RuntimeError(f"a block appears twice in {sorted(block_ids)}")
        for i in block_ids:
            self._is_free[i] = True
            self._free.append(i)

    def check_invariants(self) -> None:
        assert len(self._free) == sum(self._is_free), "free list and free flags disagree"
        assert len(set(self._free)) == len(self._free), "a block is on the free list twice"
