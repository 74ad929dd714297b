"""KV block allocation: never hand out a block twice, never lose one, all-or-nothing growth."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_engine.kv.block_pool import FreeListAllocator
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for


def test_allocator_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        FreeListAllocator(0)


def test_allocate_hands_out_distinct_ids_and_fails_whole_when_short():
    alloc = FreeListAllocator(5)
    first = alloc.allocate(3)
    assert sorted(first) == first and len(set(first)) == 3
    assert alloc.allocate(3) is None  # only 2 left: nothing is handed out
    assert alloc.num_free_blocks == 2
    rest = alloc.allocate(2)
    assert set(first) | set(rest) == set(range(5))
    assert alloc.allocate(1) is None
    assert alloc.allocate(0) == []


def test_double_free_raises():
    alloc = FreeListAllocator(4)
    ids = alloc.allocate(2)
    alloc.free(ids)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(ids[:1])
    alloc.check_invariants()
    assert alloc.num_free_blocks == 4


def test_freeing_a_never_allocated_block_raises():
    alloc = FreeListAllocator(4)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free([2])


def test_freed_blocks_are_reused():
    alloc = FreeListAllocator(3)
    a = alloc.allocate(3)
    alloc.free([a[1]])
    assert alloc.allocate(1) == [a[1]]


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_allocator_random_operations_keep_invariants(num_blocks, seed):
    rng = random.Random(seed)
    alloc = FreeListAllocator(num_blocks)
    held: list[list[int]] = []
    for _ in range(100):
        if held and rng.random() < 0.45:
            ids = held.pop(rng.randrange(len(held)))
            alloc.free(ids)
        else:
            n = rng.randint(0, num_blocks)
            free_before = alloc.num_free_blocks
            ids = alloc.allocate(n)
            if n > free_before:
                assert ids is None
                assert alloc.num_free_blocks == free_before
            else:
                assert ids is not None and len(ids) == n
                held.append(ids)
        alloc.check_invariants()
        in_use = [b for ids in held for b in ids]
        assert len(in_use) == len(set(in_use)), "a block was handed out twice"
        assert all(0 <= b < num_blocks for b in in_use)
        assert alloc.num_free_blocks == num_blocks - len(in_use)
    for ids in held:
        alloc.free(ids)
    alloc.check_invariants()
    assert alloc.num_free_blocks == num_blocks
    assert sorted(alloc.allocate(num_blocks)) == list(range(num_blocks))


# ---- KVCacheManager ----------------------------------------------------------------------------------------


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_slots_grows_a_table_block_by_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 3)
    assert len(kv.block_ids("a")) == 1
    assert kv.allocate_slots("a", 4)  # still fits in the first block
    assert len(kv.block_ids("a")) == 1
    first = kv.block_ids("a")[0]
    assert kv.allocate_slots("a", 9)
    table = kv.block_ids("a")
    assert len(table) == 3 and table[0] == first  # growth appends, never moves existing blocks
    assert kv.allocate_slots("a", 2)  # asking for fewer tokens never shrinks
    assert kv.block_ids("a") == table
    assert kv.num_free_blocks == 5
    kv.check_invariants()


def test_failed_allocate_slots_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.allocate_slots("a", 4)
    assert kv.allocate_slots("b", 2)
    table_a, free = list(kv.block_ids("a")), kv.num_free_blocks
    assert not kv.allocate_slots("a", 10)  # needs 3 more blocks, 1 free
    assert kv.block_ids("a") == table_a
    assert kv.num_free_blocks == free
    assert not kv.allocate_slots("c", 5)
    assert kv.block_ids("c") == []
    assert kv.num_free_blocks == free
    kv.check_invariants()


def test_free_returns_all_blocks_and_is_idempotent():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    kv.allocate_slots("a", 10)
    kv.allocate_slots("b", 5)
    kv.free("a")
    assert kv.block_ids("a") == []
    kv.free("a")  # already gone: nothing happens, in particular no block is freed twice
    kv.free("never-seen")
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_blocks == 6
