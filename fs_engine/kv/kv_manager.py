"""The scheduler's view of one KV arena (device or host): which blocks each request holds.

``allocate_slots`` grows a request's block table so it can hold a number of tokens and returns ``False``,
changing nothing, when memory is short; the scheduler then preempts or waits. ``free`` returns a request's
blocks. The allocator behind it (``group``: contiguous runs, ``block``: a vLLM-style free list) is
invisible to the scheduler; it only shows in how many contiguous runs a table has.
"""

from __future__ import annotations

from fs_engine.kv.block_groups import BlockGroupAllocator, runs_of
from fs_engine.kv.block_pool import FreeListAllocator

ALLOCATORS = {"group": BlockGroupAllocator, "block": FreeListAllocator}


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, allocator: str = "group") -> None:
        if allocator not in ALLOCATORS:
            raise ValueError(f"block_allocator={allocator!r} is invalid: choose one of {tuple(ALLOCATORS)}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = ALLOCATORS[allocator](num_blocks) if num_blocks > 0 else None
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks if self.allocator else 0

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_ids(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def runs(self, request_id: str) -> list[tuple[int, int]]:
        return runs_of(self.block_ids(request_id))

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.block_ids(request_id)))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make ``request_id`` hold blocks for its first ``num_tokens`` tokens; False (no change) if they do not
        fit. New blocks extend the table's last run in place when the allocator can."""
        need = self.num_blocks_needed(request_id, num_tokens)
        table = self._tables.get(request_id)
        if need == 0:
            self._tables.setdefault(request_id, [])
            return True
        if self.allocator is None:
            return False
        new = self.allocator.allocate(need, after=table[-1] if table else None)
        if new is None:
            return False
        self._tables.setdefault(request_id, []).extend(new)
        return True

    def free(self, request_id: str) -> list[int]:
        """Release a request's blocks; returns them (the caller may still have a copy reading them)."""
        blocks = self._tables.pop(request_id, [])
        if blocks:
            self.allocator.free(blocks)
        return blocks

    def rename(self, owner: str, new_owner: str) -> None:
        """Hand a request's blocks to another owner key (an in-flight copy outlives the request's id)."""
        if owner in self._tables:
            assert new_owner not in self._tables, f"{new_owner} already holds blocks"
            self._tables[new_owner] = self._tables.pop(owner)

    # ---- stats -------------------------------------------------------------------------------------------
    def mean_groups_per_request(self) -> float:
        tables = [t for t in self._tables.values() if t]
        return sum(len(runs_of(t)) for t in tables) / len(tables) if tables else 0.0

    def largest_free_extent(self) -> int:
        return self.allocator.largest_free_extent if self.allocator else 0

    def check_invariants(self) -> None:
        if self.allocator is not None:
            self.allocator.check_invariants()
        held = [b for table in self._tables.values() for b in table]
        assert len(held) == len(set(held)), "a block is held by two requests"
        assert len(held) + self.num_free_blocks == self.num_blocks, "blocks leaked or double-counted"
