"""The scheduler's only view of device KV memory: which blocks each request holds.

``allocate_slots`` grows a request's block table so it can hold a number of tokens and returns ``False``,
changing nothing, when memory is short; the scheduler then preempts or waits. ``free`` returns a request's
blocks. The block allocator behind it is pluggable (issue: block groups) and never seen by the scheduler.
"""

from __future__ import annotations

from fs_engine.kv.block_pool import FreeListAllocator


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.allocator = FreeListAllocator(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.block_ids(request_id)))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make ``request_id`` hold blocks for its first ``num_tokens`` tokens; False if they do not fit."""
        need = self.num_blocks_needed(request_id, num_tokens)
        if need == 0:
            self._tables.setdefault(request_id, [])
            return True
        new = self.allocator.allocate(need)
        if new is None:
            return False
        self._tables.setdefault(request_id, []).extend(new)
        return True

    def free(self, request_id: str) -> None:
        blocks = self._tables.pop(request_id, None)
        if blocks:
            self.allocator.free(blocks)

    def check_invariants(self) -> None:
        self.allocator.check_invariants()
        held = [b for table in self._tables.values() for b in table]
        assert len(held) == len(set(held)), "a block is held by two requests"
        assert len(held) + self.num_free_blocks == self.num_blocks, "blocks leaked or double-counted"
