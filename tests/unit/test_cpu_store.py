"""The CPU KV reuse store on its own: host block references, per-request copies and their dirty tails, stored
prefixes and their verification, LRU eviction that never touches pinned entries."""

from __future__ import annotations

import random

import pytest

import fs_engine.kv.prefix_index as prefix_index_module
from fs_engine.kv.cpu_store import CpuKVStore
from fs_engine.kv.kv_manager import blocks_for
from fs_engine.kv.prefix_index import chain_hashes

BS = 4


def checked(store: CpuKVStore) -> CpuKVStore:
    store.check_invariants()
    return store


def swap_out(store: CpuKVStore, owner: str, num_tokens: int) -> tuple[list[tuple[int, int]], int]:
    """prepare + complete: the copy now holds ``num_tokens`` tokens (still pinned)."""
    prepared = store.prepare_swap_out(owner, num_tokens)
    assert prepared is not None
    store.complete_swap_out(owner, num_tokens)
    checked(store)
    return prepared


def store_prefix(store: CpuKVStore, owner: str, tokens: list[int], session_id: str | None = None) -> int:
    """A finished request's write-back: its full blocks become a stored prefix. Returns the prefix id."""
    before = set(store.prefixes)
    swap_out(store, owner, len(tokens) // BS * BS)
    store.release(owner, keep=True)
    store.commit_prefix(owner, tokens, session_id)
    checked(store)
    (prefix_id,) = set(store.prefixes) - before
    return prefix_id


def seq(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


# ---- a request's copy ------------------------------------------------------------------------------------------


def test_swap_out_allocates_and_pins_a_copy_that_is_valid_once_complete():
    store = CpuKVStore(8, BS, enable_reuse=False)
    writes, kept = store.prepare_swap_out("a", 10)
    checked(store)
    copy = store.copy_of("a")
    assert kept == 0 and [i for i, _ in writes] == [0, 1, 2] and copy.blocks == [b for _, b in writes]
    assert copy.pins == 1 and copy.valid_tokens == 0  # invalid until the copy lands
    assert store.num_free_blocks == 5 and store.num_cached_blocks() == 0  # pinned: not a cache
    assert all(store.refs[b] == 1 for b in copy.blocks)
    store.complete_swap_out("a", 10)
    assert copy.valid_tokens == 10
    assert store.prepare_swap_in("a", 10) == copy.blocks
    assert store.prepare_swap_in("a", 4) == copy.blocks[:1]
    checked(store)
    store.release("a")  # the swap-in landed: without reuse the copy is freed at once
    assert store.copy_of("a") is None and store.num_free_blocks == 8
    checked(store)


def test_with_reuse_a_released_copy_stays_as_an_evictable_cache():
    store = CpuKVStore(8, BS, enable_reuse=True)
    swap_out(store, "a", 10)
    store.release("a")
    copy = checked(store).copy_of("a")
    assert copy is not None and copy.pins == 0 and copy.valid_tokens == 10
    assert store.num_cached_blocks() == 3 and store.num_free_blocks == 5
    with pytest.raises(AssertionError, match="released more often"):
        store.release("a")


def test_swap_in_of_more_than_the_valid_tokens_or_of_an_unpinned_copy_is_refused():
    store = CpuKVStore(8, BS, enable_reuse=True)
    store.prepare_swap_out("a", 10)  # not complete: nothing valid yet
    with pytest.raises(AssertionError, match="valid"):
        store.prepare_swap_in("a", 10)
    store.complete_swap_out("a", 10)
    store.release("a")
    with pytest.raises(AssertionError, match="pins"):
        store.prepare_swap_in("a", 10)


@pytest.mark.parametrize(
    "valid, num_tokens, kept, dirty",
    [
        (0, 8, 0, [0, 1]),
        (12, 12, 3, []),  # nothing changed: nothing to copy
        (12, 20, 3, [3, 4]),  # only the blocks written since
        (10, 10, 2, [2]),  # a partial last block was written to since: copy it again
        (10, 20, 2, [2, 3, 4]),
        (9, 9, 2, [2]),
        (16, 8, 2, []),  # fewer tokens than the copy holds (recomputed since): its first blocks are still valid
    ],
)
def test_the_second_swap_out_copies_only_the_dirty_tail(valid, num_tokens, kept, dirty):
    store = CpuKVStore(16, BS, enable_reuse=True)
    if valid:
        swap_out(store, "a", valid)
        store.release("a")
    old = list(store.copy_of("a").blocks) if valid else []
    writes, got_kept = store.prepare_swap_out("a", num_tokens)
    checked(store)
    copy = store.copy_of("a")
    assert got_kept == kept and [i for i, _ in writes] == dirty
    assert copy.blocks[:kept] == old[:kept]  # valid blocks stay where they are
    assert [b for _, b in writes] == copy.blocks[kept : blocks_for(num_tokens, BS)]
    assert copy.valid_tokens == min(valid, kept * BS)  # the tail is invalid until its copy lands
    assert copy.pins == 1 and len(copy.blocks) >= blocks_for(num_tokens, BS)
    store.complete_swap_out("a", num_tokens)
    assert copy.valid_tokens == max(min(valid, kept * BS), num_tokens)


def test_swap_out_that_does_not_fit_changes_nothing():
    store = CpuKVStore(4, BS, enable_reuse=True)
    swap_out(store, "pinned", 12)  # 3 blocks, pinned (a swapped request's only copy)
    assert store.prepare_swap_out("b", 8) is None
    assert store.copy_of("b") is None and store.num_free_blocks == 1
    swap_out(store, "a", 4)
    store.release("a")
    assert store.prepare_swap_out("a", 8) is None  # it would have to evict its own valid block
    copy = checked(store).copy_of("a")
    assert copy.blocks and copy.valid_tokens == 4 and copy.pins == 0
    assert CpuKVStore(0, BS).prepare_swap_out("x", 1) is None
    assert CpuKVStore(2, BS).prepare_swap_out("x", 3 * BS) is None


def test_copy_on_write_a_dirty_block_shared_with_a_prefix_is_replaced_not_overwritten():
    store = CpuKVStore(16, BS, enable_reuse=True)
    tokens = seq(100, 16)
    prefix_id = store_prefix(store, "turn1", tokens)
    prefix_blocks = list(store.prefixes[prefix_id].blocks)
    # a copy starting from the prefix whose last shared block is only partly valid for it
    store.attach_prefix("b", prefix_blocks, 14)
    assert all(store.refs[b] == 2 for b in prefix_blocks)
    writes, kept = store.prepare_swap_out("b", 20)
    checked(store)
    copy = store.copy_of("b")
    assert kept == 3 and [i for i, _ in writes] == [3, 4]
    assert copy.blocks[:3] == prefix_blocks[:3]  # clean shared blocks stay shared
    assert copy.blocks[3] != prefix_blocks[3] and copy.blocks[3] not in prefix_blocks
    assert store.refs[prefix_blocks[3]] == 1 and store.prefixes[prefix_id].blocks == prefix_blocks
    assert all(store.refs[b] == 1 for _, b in writes)  # every written block belongs to b alone


def test_rename_and_discard():
    store = CpuKVStore(8, BS, enable_reuse=True)
    swap_out(store, "a", 8)
    store.rename("a", "~swap1")
    assert store.copy_of("a") is None and store.copy_of("~swap1").valid_tokens == 8
    checked(store)
    store.discard("~swap1")  # whatever its pins
    assert not store.copies and store.num_free_blocks == 8
    store.discard("nobody")
    checked(store)


# ---- stored prefixes -------------------------------------------------------------------------------------------


def test_prefix_commit_and_lookup_in_whole_blocks_leaving_one_token_to_compute():
    store = CpuKVStore(16, BS, enable_reuse=True)
    tokens = seq(100, 18)  # 4 full blocks; the partial fifth is not stored
    prefix_id = store_prefix(store, "a", tokens)
    prefix = store.prefixes[prefix_id]
    assert len(prefix.blocks) == 4 and store.index.tokens(prefix_id) == tokens[:16] and prefix.pins == 0
    assert store.copy_of("a") is None and store.num_free_blocks == 12 and store.num_cached_blocks() == 4
    assert store.lookup(tokens[:16] + [1, 2], None) == (prefix.blocks, 16)
    assert store.lookup(tokens[:16], None) == (prefix.blocks[:3], 12)  # the last token must be computed
    assert store.lookup(tokens[:17], None) == (prefix.blocks, 16)
    assert store.lookup(tokens[:6], None) == (prefix.blocks[:1], 4)
    assert store.lookup(tokens[:4], None) == ([], 0)
    assert store.lookup(tokens[:9] + [0] + tokens[10:16] + [1], None) == (prefix.blocks[:2], 8)  # differs in block 2
    assert store.lookup([0] + tokens[1:], None) == ([], 0)
    assert store.num_hits == 5  # lookups that matched at least one block
    checked(store)


def test_lookup_without_reuse_or_prefixes_finds_nothing():
    store = CpuKVStore(16, BS, enable_reuse=False)
    assert store.lookup(seq(0, 20), None) == ([], 0)
    store = CpuKVStore(16, BS, enable_reuse=True)
    assert store.lookup(seq(0, 20), None) == ([], 0) and store.num_hits == 0


def test_a_prefix_hit_shares_the_blocks_and_the_prefix_outlives_nothing_it_should_not():
    store = CpuKVStore(8, BS, enable_reuse=True)
    tokens = seq(100, 8)
    prefix_id = store_prefix(store, "a", tokens)
    blocks, matched = store.lookup(tokens + [7], None)
    store.attach_prefix("b", blocks, matched)
    copy = checked(store).copy_of("b")
    assert copy.blocks == blocks and copy.valid_tokens == 8 and copy.pins == 1
    assert [store.refs[b] for b in blocks] == [2, 2]
    # the prefix is evicted: the blocks live on in b's copy
    store._drop(("prefix", prefix_id))
    checked(store)
    assert [store.refs[b] for b in blocks] == [1, 1] and store.num_free_blocks == 6
    assert store.lookup(tokens + [7], None) == ([], 0)
    store.release("b")
    store.discard("b")
    assert checked(store).num_free_blocks == 8


def test_session_id_separates_prefixes():
    store = CpuKVStore(16, BS, enable_reuse=True)
    tokens = seq(100, 8)
    store_prefix(store, "a", tokens, session_id="alice")
    assert store.lookup(tokens + [1], None) == ([], 0)
    assert store.lookup(tokens + [1], "bob") == ([], 0)
    assert store.lookup(tokens + [1], "alice")[1] == 8
    store_prefix(store, "b", tokens, session_id=None)
    assert store.lookup(tokens + [1], None)[1] == 8
    assert store.lookup(tokens + [1], "alice")[0] != store.lookup(tokens + [1], None)[0]


def test_the_newest_prefix_serves_a_block_and_older_ones_age_out():
    store = CpuKVStore(16, BS, enable_reuse=True)
    tokens = seq(100, 8)
    first = store_prefix(store, "a", tokens)
    second = store_prefix(store, "b", tokens + seq(500, 4))
    blocks, matched = store.lookup(tokens + seq(500, 4) + [1], None)
    assert matched == 12 and blocks == store.prefixes[second].blocks
    store._drop(("prefix", second))  # evicted: the older prefix no longer serves the index
    checked(store)
    assert store.lookup(tokens + [1], None) == ([], 0)
    assert first in store.prefixes


def position_only_hashes(token_ids, block_size, num_blocks, session_id):
    """Every prefix's block i gets the same hash: every lookup collides with whatever is stored."""
    return [hash(("collide", i)) for i in range(num_blocks)]


def block_only_hashes(token_ids, block_size, num_blocks, session_id):
    """A hash of each block's own tokens (no chain): block i of two different prefixes collides when only
    their earlier blocks differ."""
    return [hash(tuple(token_ids[i * block_size : (i + 1) * block_size])) for i in range(num_blocks)]


def test_verification_rejects_a_hash_collision_with_other_tokens(monkeypatch):
    monkeypatch.setattr(prefix_index_module, "chain_hashes", position_only_hashes)
    store = CpuKVStore(16, BS, enable_reuse=True)
    stored = seq(100, 8)
    store_prefix(store, "a", stored)
    other = seq(300, 8) + [1]
    assert store.index._by_hash  # the collision is real: the index answers for other's blocks
    assert store.lookup(other, None) == ([], 0)
    partly = stored[:4] + seq(300, 4) + [1]  # block 0 matches, block 1 collides with other tokens
    assert store.lookup(partly, None) == (store.prefixes[0].blocks[:1], 4)


def test_verification_rejects_a_colliding_block_whose_earlier_tokens_differ(monkeypatch):
    # KV of block i depends on every token before it: a block from a prefix whose earlier blocks differ is
    # wrong even when block i's own tokens match
    monkeypatch.setattr(prefix_index_module, "chain_hashes", block_only_hashes)
    store = CpuKVStore(16, BS, enable_reuse=True)
    a, b, c, d = seq(100, 4), seq(200, 4), seq(300, 4), seq(400, 4)
    store_prefix(store, "x", a + b)
    store_prefix(store, "y", c + d)
    blocks, matched = store.lookup(a + d + [1], None)  # block 0 from x (right); block 1 of y follows c, not a
    assert matched == 4, f"served block 1 of a prefix that starts with other tokens: {blocks}"


def test_chain_hashes_cover_the_session_and_every_earlier_block():
    t = seq(0, 12)
    h = chain_hashes(t, BS, 3, None)
    assert len(h) == 3 and len(set(h)) == 3
    assert chain_hashes(t, BS, 3, "s")[0] != h[0]
    changed = [99] + t[1:]
    assert all(x != y for x, y in zip(chain_hashes(changed, BS, 3, None), h))  # block 0 changes every hash
    assert chain_hashes(t[:8] + [99] * 4, BS, 3, None)[:2] == h[:2]


# ---- eviction --------------------------------------------------------------------------------------------------


def test_eviction_is_least_recently_used_first_and_never_takes_pinned_entries():
    store = CpuKVStore(8, BS, enable_reuse=True)
    p0 = store_prefix(store, "a", seq(100, 8))
    store_prefix(store, "b", seq(200, 8))
    swap_out(store, "swapped", 8)  # pinned: a swapped request's only copy (oldest of all)
    store.prepare_swap_out("cached", 8)
    store.complete_swap_out("cached", 8)
    store.release("cached")  # unpinned cache
    assert store.num_free_blocks == 0 and store.num_cached_blocks() == 6
    store.lookup(seq(100, 8) + [1], None)  # touches p0: now p1 is the least recently used
    swap_out(store, "n1", 8)
    assert set(store.prefixes) == {p0} and store.num_evictions == 1
    swap_out(store, "n2", 4)
    assert store.copy_of("cached") is None and store.num_evictions == 2  # then the next oldest unpinned
    assert store.copy_of("swapped").valid_tokens == 8  # pinned entries stay, whatever their age
    assert store.num_free_blocks == 1
    swap_out(store, "n3", 8)
    assert not store.prefixes and store.num_evictions == 3
    # only pinned entries left: nothing more can be evicted
    assert store.prepare_swap_out("n4", 8) is None and store.num_evictions == 3
    assert store.copy_of("swapped") is not None and store.copy_of("n1") is not None
    checked(store)


def test_a_failed_allocation_may_still_evict_unpinned_entries():
    store = CpuKVStore(4, BS, enable_reuse=True)
    store_prefix(store, "a", seq(100, 4))
    swap_out(store, "pinned", 12)
    assert store.prepare_swap_out("big", 8) is None
    assert not store.prefixes and store.num_free_blocks == 1 and store.copy_of("pinned").pins == 1
    checked(store)


def test_pinned_copies_under_copy_survive_any_pressure():
    store = CpuKVStore(6, BS, enable_reuse=True)
    writes, _ = store.prepare_swap_out("inflight", 12)  # its copy is still being written
    for i in range(10):
        prepared = store.prepare_swap_out(f"o{i}", 4 * (1 + i % 3))
        if prepared is not None:
            assert not {b for _, b in prepared[0]} & {b for _, b in writes}
            store.complete_swap_out(f"o{i}", 4 * (1 + i % 3))
            store.release(f"o{i}")
        checked(store)
        assert store.copy_of("inflight").blocks == [b for _, b in writes]


# ---- a random mix of every operation, with simulated block contents ----------------------------------------


class ShadowDriver:
    """Drives a store like the scheduler does (swap-outs and swap-ins that land later, finishes that write
    back, admissions with prefix hits, aborts) and keeps what every host block holds: (position, token, hash of
    the whole prefix) per slot, written when a copy lands. After every operation the store's invariants hold,
    and every copy and stored prefix holds exactly the KV it claims."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.store = CpuKVStore(self.rng.randint(6, 20), BS, enable_reuse=self.rng.random() < 0.75)
        self.host: dict[int, list] = {}
        self.reqs: dict[str, dict] = {}
        self.next_id = 0
        self.bases = [seq(1000 * k, 40) for k in range(3)]  # few conversations: prefixes repeat

    @staticmethod
    def kv(tokens: list[int]) -> list[tuple[int, int, int]]:
        out, h = [], 0
        for pos, t in enumerate(tokens):
            h = hash((h, t))
            out.append((pos, t, h))
        return out

    def check(self) -> None:
        store = self.store
        store.check_invariants()
        for owner, r in self.reqs.items():
            copy = store.copy_of(owner)
            if copy is None:
                assert r["state"] in ("running", "waiting")
                continue
            if r["state"] in ("swapped", "in", "out"):
                assert copy.pins > 0, f"{owner} ({r['state']}) is not pinned"
            self.expect(copy.blocks, r["tokens"][: copy.valid_tokens], owner)
            for _, b in r.get("writes", []):
                assert store.refs[b] == 1, f"{owner}: block {b} under a copy is shared"
        for pid, p in store.prefixes.items():
            self.expect(p.blocks, store.index.tokens(pid), f"prefix {pid}")

    def expect(self, blocks: list[int], tokens: list[int], what: str) -> None:
        for pos, slot in enumerate(self.kv(tokens)):
            got = self.host.get(blocks[pos // BS], [None] * BS)[pos % BS]
            assert got == slot, f"{what}: host position {pos} holds {got}, expected {slot}"

    def write(self, owner: str, writes: list[tuple[int, int]]) -> None:
        r = self.reqs[owner]
        kv = self.kv(r["tokens"][: r["computed"]])
        for i, b in writes:
            self.host[b] = [kv[p] if p < len(kv) else None for p in range(i * BS, (i + 1) * BS)]

    def op(self) -> None:
        rng, store = self.rng, self.store
        choice = rng.random()
        states = {s: [o for o, r in self.reqs.items() if r["state"] == s] for s in
                  ("running", "waiting", "swapped", "in", "out")}
        if choice < 0.15 or not self.reqs:  # a new request, maybe with a stored prefix
            owner = f"r{self.next_id}"
            self.next_id += 1
            base = rng.choice(self.bases)
            cut = rng.randint(1, 36)
            tokens = base[:cut] + ([rng.randint(0, 5)] if rng.random() < 0.5 else []) + base[cut:]
            session = rng.choice([None, "s"])
            self.reqs[owner] = {"tokens": tokens, "computed": 0, "state": "waiting", "session": session}
            blocks, matched = store.lookup(tokens, session)
            if matched:
                self.expect(blocks, tokens[:matched], f"{owner}'s prefix hit")
                store.attach_prefix(owner, blocks, matched)
                self.reqs[owner].update(state="in", computed=matched)
        elif choice < 0.35 and states["running"] + states["waiting"]:  # compute some tokens
            owner = rng.choice(states["running"] + states["waiting"])
            r = self.reqs[owner]
            r["computed"] = min(len(r["tokens"]), r["computed"] + rng.randint(1, 9))
            r["state"] = "running"
        elif choice < 0.5 and states["running"]:  # preempt: swap out, or recompute when the host is full
            owner = rng.choice(states["running"])
            r = self.reqs[owner]
            prepared = store.prepare_swap_out(owner, r["computed"])
            if prepared is None:
                r.update(computed=0, state="waiting")
            else:
                r.update(state="out", writes=prepared[0])
        elif choice < 0.6 and states["out"]:  # a swap-out lands
            owner = rng.choice(states["out"])
            r = self.reqs[owner]
            self.write(owner, r.pop("writes"))
            store.complete_swap_out(owner, r["computed"])
            r["state"] = "swapped"
        elif choice < 0.7 and states["swapped"]:  # swap in
            owner = rng.choice(states["swapped"])
            r = self.reqs[owner]
            blocks = store.prepare_swap_in(owner, r["computed"])
            self.expect(blocks, r["tokens"][: r["computed"]], f"{owner} swapping in")
            r["state"] = "in"
        elif choice < 0.8 and states["in"]:  # a swap-in lands
            owner = rng.choice(states["in"])
            store.release(owner)
            self.reqs[owner]["state"] = "running"
        elif choice < 0.92 and states["running"]:  # finish, writing the full blocks back
            owner = rng.choice(states["running"])
            r = self.reqs.pop(owner)
            full = r["computed"] // BS * BS
            prepared = store.prepare_swap_out(owner, full) if store.enable_reuse and full else None
            if prepared is None:
                store.discard(owner)
            else:
                self.reqs[owner] = r  # for write()
                self.write(owner, prepared[0])
                del self.reqs[owner]
                store.complete_swap_out(owner, full)
                store.release(owner, keep=True)
                store.commit_prefix(owner, r["tokens"][:full], r["session"])
        elif states["swapped"] + states["running"] + states["waiting"]:  # abort (no copy in flight)
            owner = rng.choice(states["swapped"] + states["running"] + states["waiting"])
            del self.reqs[owner]
            store.discard(owner)
        self.check()


@pytest.mark.parametrize("seed", range(12))
def test_random_operation_sequences_keep_every_invariant_and_every_block_intact(seed):
    driver = ShadowDriver(seed)
    for _ in range(400):
        driver.op()
    # everything ends: all host memory is free or an unpinned cache
    for owner, r in list(driver.reqs.items()):
        if r["state"] == "out":
            driver.write(owner, r.pop("writes"))
            driver.store.complete_swap_out(owner, r["computed"])
        driver.store.discard(owner)
    driver.reqs.clear()
    driver.check()
    store = driver.store
    assert not store.copies
    assert store.num_cached_blocks() == store.num_blocks - store.num_free_blocks
    assert store.num_hits > 0 or not store.enable_reuse
