"""Host KV index (FastSwitch's CPU KV reuse store): what is in host memory, and what is still valid.

Host blocks are reference-counted and belong to *entries* of two kinds:

- a request's **CPU copy** (keyed by an owner name, normally the request id): host blocks holding its first
  ``valid_tokens`` tokens of KV. It is kept after the request is swapped back in, so the next swap-out
  copies only the *dirty tail* (blocks from ``valid_tokens // block_size`` on), never the whole context.
- a finished request's **prefix**: its full blocks, indexed by a chain of hashes over their token ids
  (seeded with the optional ``session_id``), so the next turn of a conversation, whose prompt starts with
  the whole history, swaps that prefix in instead of recomputing it. Every hit is verified against the
  stored token ids.

A prefix hit shares the prefix's blocks with the new request's CPU copy (refcount > 1); shared blocks are
always full and are never rewritten (a dirty block that is shared is replaced, copy-on-write).

An entry is **pinned** while it is the only copy of a swapped request's KV or while a copy reads or writes
its blocks; eviction (LRU, when an allocation needs room) only drops unpinned entries, and a block is
freed when its last reference goes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from fs_engine.kv.block_groups import BlockGroupAllocator
from fs_engine.kv.kv_manager import blocks_for
from fs_engine.kv.prefix_index import PrefixIndex


@dataclass
class _Entry:
    blocks: list[int]
    valid_tokens: int = 0
    pins: int = 0


class CpuKVStore:
    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_reuse = enable_reuse
        self.allocator = BlockGroupAllocator(num_blocks) if num_blocks > 0 else None
        self.refs = [0] * num_blocks
        self.copies: dict[str, _Entry] = {}
        self.prefixes: dict[int, _Entry] = {}
        self.index = PrefixIndex(block_size)  # prefix id -> the tokens its blocks hold
        self._lru: OrderedDict[tuple[str, object], None] = OrderedDict()  # ("copy", owner) | ("prefix", id)
        self._prefix_ids = itertools.count()
        self.num_hits = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks if self.allocator else 0

    def num_cached_blocks(self) -> int:
        """Blocks referenced only by unpinned entries: a cache that eviction may take back at any time."""
        pinned = {b for e in [*self.copies.values(), *self.prefixes.values()] if e.pins for b in e.blocks}
        return sum(1 for b, r in enumerate(self.refs) if r and b not in pinned)

    # ---- block references --------------------------------------------------------------------------------
    def _ref(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def _unref(self, blocks: list[int]) -> None:
        freed = []
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                freed.append(b)
        if freed:
            self.allocator.free(freed)

    def _allocate(self, n: int, keep: str | None) -> list[int] | None:
        """n host blocks, evicting least recently used unpinned entries (never ``keep``'s copy) if needed."""
        if n == 0:
            return []
        if self.allocator is None or n > self.num_blocks:
            return None
        while self.allocator.num_free_blocks < n:
            victim = next((k for k in self._lru if k != ("copy", keep) and self._entry(k).pins == 0), None)
            if victim is None:
                return None
            self._drop(victim)
            self.num_evictions += 1
        return self.allocator.allocate(n)

    def _entry(self, key: tuple[str, object]) -> _Entry:
        kind, name = key
        return self.copies[name] if kind == "copy" else self.prefixes[name]

    def _drop(self, key: tuple[str, object]) -> None:
        kind, name = key
        entry = self.copies.pop(name) if kind == "copy" else self.prefixes.pop(name)
        if kind == "prefix":
            self.index.remove(name)
        del self._lru[key]
        self._unref(entry.blocks)

    def _touch(self, key: tuple[str, object]) -> None:
        self._lru.pop(key, None)
        self._lru[key] = None

    # ---- a request's CPU copy ----------------------------------------------------------------------------
    def copy_of(self, owner: str) -> _Entry | None:
        return self.copies.get(owner)

    def prepare_swap_out(self, owner: str, num_tokens: int) -> tuple[list[tuple[int, int]], int] | None:
        """Make ``owner``'s copy hold its first ``num_tokens`` tokens. Returns the blocks to write,
        ``[(block index in the request's table, host block)]`` (the dirty tail), and how many blocks were
        already valid and need no copy. None (nothing changed) if host memory cannot take the tail.
        The copy is pinned until ``release``; it is valid once the writes complete (``complete_swap_out``).
        Making room may evict unpinned entries even when the answer is None."""
        entry = self.copies.get(owner) or _Entry(blocks=[])
        n = blocks_for(num_tokens, self.block_size)
        keep = min(entry.valid_tokens // self.block_size, len(entry.blocks), n)
        # a dirty block shared with a prefix is never written in place (copy-on-write)
        rewrite = [i for i in range(keep, min(n, len(entry.blocks))) if self.refs[entry.blocks[i]] > 1]
        new = self._allocate(max(0, n - len(entry.blocks)) + len(rewrite), keep=owner)
        if new is None:
            return None
        blocks = list(entry.blocks)
        old_shared = [blocks[i] for i in rewrite]
        for i, b in zip(rewrite, new):
            blocks[i] = b
        blocks += new[len(rewrite) :]
        self._ref(new)
        self._unref(old_shared)
        entry.blocks = blocks
        entry.valid_tokens = min(entry.valid_tokens, keep * self.block_size)  # the tail is invalid until written
        entry.pins += 1
        self.copies[owner] = entry
        self._touch(("copy", owner))
        return [(i, blocks[i]) for i in range(keep, n)], keep

    def complete_swap_out(self, owner: str, num_tokens: int) -> None:
        entry = self.copies[owner]
        entry.valid_tokens = max(entry.valid_tokens, num_tokens)

    def prepare_swap_in(self, owner: str, num_tokens: int) -> list[int]:
        """Host blocks holding ``owner``'s first ``num_tokens`` tokens. The pin taken by ``prepare_swap_out`` (the
        copy is the request's only KV) also covers this read: ``release`` it once the swap-in has landed."""
        entry = self.copies[owner]
        assert entry.valid_tokens >= num_tokens, f"{owner}: swap-in of {num_tokens} tokens, {entry.valid_tokens} valid"
        assert entry.pins > 0, f"{owner}: swap-in from a copy that nothing pins"
        self._touch(("copy", owner))
        return entry.blocks[: blocks_for(num_tokens, self.block_size)]

    def pin(self, owner: str) -> None:
        """Keep ``owner``'s copy from eviction until the matching ``release``."""
        self.copies[owner].pins += 1
        self._touch(("copy", owner))

    def release(self, owner: str, keep: bool | None = None) -> None:
        """Drop one pin of ``owner``'s copy. With reuse (or ``keep``), an unpinned copy stays as an evictable
        cache; without, it is freed as soon as nothing pins it."""
        entry = self.copies.get(owner)
        if entry is None:
            return
        entry.pins -= 1
        assert entry.pins >= 0, f"{owner}: copy released more often than pinned"
        if entry.pins == 0 and not (self.enable_reuse if keep is None else keep):
            self._drop(("copy", owner))

    def discard(self, owner: str) -> None:
        """Forget ``owner``'s copy whatever its pins (the caller knows no copy is in flight)."""
        if owner in self.copies:
            self._drop(("copy", owner))

    def rename(self, owner: str, new_owner: str) -> None:
        """Hand a copy to another owner key (a finished request's write-back outlives its id)."""
        if owner in self.copies:
            self.copies[new_owner] = self.copies.pop(owner)
            self._lru.pop(("copy", owner))
            self._touch(("copy", new_owner))

    # ---- prefixes of finished requests -------------------------------------------------------------------
    def lookup(self, token_ids: list[int], session_id: str | None,
               hashes: list[int] | None = None) -> tuple[list[int], int]:
        """The longest stored prefix of ``token_ids`` in whole blocks, leaving at least one token to compute.
        Returns (host blocks, matched tokens); verified token for token. ``hashes``: see PrefixIndex.match."""
        if not self.enable_reuse:
            return [], 0
        hits = self.index.match(token_ids, session_id, hashes)
        for prefix_id in dict.fromkeys(prefix_id for prefix_id, _ in hits):
            self._touch(("prefix", prefix_id))
        if hits:
            self.num_hits += 1
        return [self.prefixes[prefix_id].blocks[i] for prefix_id, i in hits], len(hits) * self.block_size

    def attach_prefix(self, owner: str, blocks: list[int], num_tokens: int) -> None:
        """Start ``owner``'s copy from a prefix hit (shared blocks); pinned until its swap-in is released."""
        assert owner not in self.copies
        self._ref(blocks)
        self.copies[owner] = _Entry(blocks=list(blocks), valid_tokens=num_tokens, pins=1)
        self._touch(("copy", owner))

    def commit_prefix(self, owner: str, token_ids: list[int], session_id: str | None) -> None:
        """Turn ``owner``'s (written-back, unpinned) copy into a prefix entry of its full valid blocks."""
        entry = self.copies.pop(owner)
        self._lru.pop(("copy", owner))
        num_full = min(entry.valid_tokens, len(token_ids)) // self.block_size
        self._unref(entry.blocks[num_full:])
        if num_full == 0:
            return
        prefix_id = next(self._prefix_ids)
        self.prefixes[prefix_id] = _Entry(blocks=entry.blocks[:num_full], valid_tokens=num_full * self.block_size)
        self.index.add(prefix_id, token_ids[: num_full * self.block_size], session_id)
        self._touch(("prefix", prefix_id))

    # ---- checks ------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        if self.allocator is None:
            assert not self.copies and not self.prefixes
            return
        self.allocator.check_invariants()
        counted = [0] * self.num_blocks
        for entry in [*self.copies.values(), *self.prefixes.values()]:
            assert entry.pins >= 0
            assert entry.valid_tokens <= len(entry.blocks) * self.block_size or not entry.blocks
            for b in entry.blocks:
                counted[b] += 1
        assert counted == self.refs, "block reference counts disagree with the entries"
        held = sum(1 for r in self.refs if r > 0)
        assert held + self.allocator.num_free_blocks == self.num_blocks, "host blocks leaked"
        for key in self._lru:
            self._entry(key)
        assert len(self._lru) == len(self.copies) + len(self.prefixes), "LRU list out of sync"
        self.index.check_invariants()
        assert len(self.index) == len(self.prefixes) and all(p in self.index for p in self.prefixes)
