"""The scheduler's view of one KV arena (device or host): which blocks each request holds.

``allocate_slots`` grows a request's block table so it can hold a number of tokens and returns ``False``,
changing nothing, when memory is short; the scheduler then preempts or waits. ``free`` returns a request's
blocks. The allocator behind it (``group``: contiguous runs, ``block``: a vLLM-style free list) is
invisible to the scheduler; it only shows in how many contiguous runs a table has.

A finished conversation turn's blocks can stay **resident**: indexed by their tokens (``keep_resident``),
they are handed as a whole to the next turn, whose prompt starts with that history (``adopt``), so it
neither prefills nor swaps in what the device still holds. Once their write-back to host memory has landed
(``settle``) they are a cache: counted as free, and evicted, least recently kept first, the moment an
allocation needs them. Until then the copy still reads them and nothing may take them.
"""

from __future__ import annotations

from fs_engine.kv.block_groups import BlockGroupAllocator, runs_of
from fs_engine.kv.block_pool import FreeListAllocator
from fs_engine.kv.prefix_index import PrefixIndex

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
        self.resident = PrefixIndex(block_size)  # owners of finished turns' blocks -> their tokens
        self._evictable: dict[str, None] = {}  # settled resident owners, least recently kept first
        self._num_evictable_blocks = 0
        self.num_resident_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: free ones, and settled resident ones it would evict."""
        return self.num_unused_blocks + self.num_evictable_blocks

    @property
    def num_unused_blocks(self) -> int:
        return self.allocator.num_free_blocks if self.allocator else 0

    @property
    def num_evictable_blocks(self) -> int:
        return self._num_evictable_blocks

    @property
    def tables(self) -> dict[str, list[int]]:
        """Every owner's block table, to read only (the scheduler's hot loop looks tables up here)."""
        return self._tables

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
        table = self._tables.get(request_id)
        need = blocks_for(num_tokens, self.block_size) - (len(table) if table else 0)
        if need <= 0:
            if table is None:
                self._tables[request_id] = []
            return True
        allocator = self.allocator
        if allocator is None or need > allocator.num_free_blocks + self._num_evictable_blocks:
            return False
        while allocator.num_free_blocks < need:
            self._evict(next(iter(self._evictable)))
        new = allocator.allocate(need, after=table[-1] if table else None)
        if new is None:
            return False
        if table is None:
            self._tables[request_id] = new
        else:
            table += new
        return True

    def free(self, request_id: str) -> list[int]:
        """Release a request's blocks; returns them (the caller may still have a copy reading them)."""
        assert request_id not in self.resident, f"{request_id} is resident: settle it, eviction frees it"
        blocks = self._tables.pop(request_id, [])
        if blocks:
            self.allocator.free(blocks)
        return blocks

    def rename(self, owner: str, new_owner: str) -> None:
        """Hand a request's blocks to another owner key (an in-flight copy outlives the request's id)."""
        if owner in self._tables:
            assert new_owner not in self._tables, f"{new_owner} already holds blocks"
            self._tables[new_owner] = self._tables.pop(owner)

    # ---- finished turns' resident blocks -----------------------------------------------------------------
    def keep_resident(self, owner: str, token_ids: list[int], session_id: str | None) -> None:
        """Keep ``owner``'s blocks holding ``token_ids``' whole blocks for the next turn; the rest are freed.
        Nothing may evict them before ``settle``."""
        table = self._tables[owner]
        num_full = min(len(token_ids) // self.block_size, len(table))
        if num_full < len(table):
            self.allocator.free(table[num_full:])
            del table[num_full:]
        self.resident.add(owner, token_ids[: num_full * self.block_size], session_id)

    def settle(self, owner: str) -> None:
        """The copy that read ``owner``'s resident blocks has landed: they are an evictable cache now."""
        self._evictable[owner] = None
        self._num_evictable_blocks += len(self._tables[owner])

    def match_resident(self, token_ids: list[int], session_id: str | None,
                       hashes: list[int] | None = None) -> tuple[str | None, int, bool]:
        """The resident owner holding the longest prefix of ``token_ids`` (one owner's blocks, whole blocks,
        leaving a token to compute): (owner, tokens, settled); (None, 0, False) if none does."""
        hits = self.resident.match(token_ids, session_id, hashes)
        if not hits:
            return None, 0, False
        owner = hits[0][0]
        num_blocks = next((i for i, (key, _) in enumerate(hits) if key != owner), len(hits))
        return owner, num_blocks * self.block_size, owner in self._evictable

    def adopt(self, owner: str, request_id: str, num_tokens: int) -> None:
        """``request_id`` (holding nothing yet) takes over the first blocks of the settled resident ``owner``,
        enough for ``num_tokens`` tokens; the rest of ``owner``'s blocks are freed."""
        assert owner in self._evictable and not self._tables.get(request_id)
        n = blocks_for(num_tokens, self.block_size)
        self._tables[request_id] = taken = self._tables[owner][:n]
        del self._tables[owner][:n]
        self._num_evictable_blocks -= len(taken)
        self._evict(owner, counted=False)

    def _evict(self, owner: str, counted: bool = True) -> None:
        del self._evictable[owner]
        self.resident.remove(owner)
        blocks = self._tables.pop(owner)
        self._num_evictable_blocks -= len(blocks)
        if blocks:
            self.allocator.free(blocks)
        self.num_resident_evictions += counted

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
        assert len(held) + self.num_unused_blocks == self.num_blocks, "blocks leaked or double-counted"
        self.resident.check_invariants()
        assert all(owner in self.resident for owner in self._evictable), "an evictable owner is not resident"
        assert self._num_evictable_blocks == sum(len(self._tables[o]) for o in self._evictable), "evictable count"
        for owner in self._tables:
            if owner in self.resident:
                assert len(self.resident.tokens(owner)) == len(self._tables[owner]) * self.block_size
