"""Block-group allocation: few contiguous runs per request, never a refusal a one-block allocator would grant,
free memory merged back into large extents, and swap runs that move every block exactly once.

Every random sequence is checked against a brute-force model (the set of free block ids) after each operation.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_engine.kv.block_groups import BlockGroupAllocator, paired_runs, runs_of
from fs_engine.kv.block_pool import FreeListAllocator
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for

ALLOCATOR_NAMES = ("group", "block")
ALLOCATOR_CLASSES = {"group": BlockGroupAllocator, "block": FreeListAllocator}


def extents_of(free: set[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of a set of free ids, in id order: what a merged free map must hold."""
    return runs_of(sorted(free))


def largest_extent(free: set[int]) -> int:
    return max((n for _, n in extents_of(free)), default=0)


def allocator_state(alloc) -> tuple:
    if isinstance(alloc, BlockGroupAllocator):
        return alloc.num_free_blocks, alloc.free_extents()
    return alloc.num_free_blocks, sorted(alloc._free)


class ModelledAllocator:
    """An allocator driven next to a set of free ids; every call is checked against that model."""

    def __init__(self, name: str, num_blocks: int) -> None:
        self.alloc = ALLOCATOR_CLASSES[name](num_blocks)
        self.num_blocks = num_blocks
        self.free_ids = set(range(num_blocks))

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        before = allocator_state(self.alloc)
        largest_before = largest_extent(self.free_ids)
        grow_in_place = after is not None and (after + 1) in self.free_ids
        ids = self.alloc.allocate(n, after=after)
        if n > len(self.free_ids):
            assert ids is None, f"allocate({n}) with {len(self.free_ids)} free handed out blocks"
            assert allocator_state(self.alloc) == before, "a failed allocate changed the allocator"
        else:
            # never refuses what a one-block-at-a-time allocator would grant, however fragmented
            assert ids is not None, f"allocate({n}) refused with {len(self.free_ids)} blocks free"
            assert len(ids) == n and len(set(ids)) == n
            assert set(ids) <= self.free_ids, "handed out a block that was not free"
            self.free_ids -= set(ids)
            if isinstance(self.alloc, BlockGroupAllocator) and n:
                if grow_in_place:
                    assert ids[0] == after + 1, "the block after the request's last one was free but not used"
                elif n <= largest_before:
                    assert len(runs_of(ids)) == 1, f"{n} blocks fit one free extent but came in runs {runs_of(ids)}"
        self.check()
        return ids

    def free(self, ids: list[int]) -> None:
        self.alloc.free(ids)
        assert not (set(ids) & self.free_ids)
        self.free_ids |= set(ids)
        self.check()

    def check(self) -> None:
        self.alloc.check_invariants()
        assert self.alloc.num_free_blocks == len(self.free_ids)
        assert self.alloc.largest_free_extent == largest_extent(self.free_ids)
        if isinstance(self.alloc, BlockGroupAllocator):
            # free memory is kept as maximal extents: every freed neighbour was merged
            assert self.alloc.free_extents() == extents_of(self.free_ids)


# ---- random sequences against the model ---------------------------------------------------------------------


def run_random_allocator_ops(name: str, seed: int, num_ops: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.choice([1, 2, 7, 32, 64])
    m = ModelledAllocator(name, num_blocks)
    tables: list[list[int]] = []
    for _ in range(num_ops):
        op = rng.random()
        if tables and op < 0.35:
            table = tables.pop(rng.randrange(len(tables)))
            m.free(table)
        elif tables and op < 0.75:  # grow a request, usually by one block, in place when possible
            table = rng.choice(tables)
            n = 1 if rng.random() < 0.7 else rng.randint(0, num_blocks // 2 + 1)
            ids = m.allocate(n, after=table[-1] if table else None)
            if ids is not None:
                table.extend(ids)
        else:
            n = rng.randint(0, num_blocks // 3 + 2)
            ids = m.allocate(n)
            if ids is not None:
                tables.append(ids)
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)), "a block is held twice"
        assert all(0 <= b < num_blocks for b in held)
        assert len(held) + m.alloc.num_free_blocks == num_blocks
    for table in tables:
        m.free(table)
    assert m.free_ids == set(range(num_blocks))
    if name == "group":
        assert m.alloc.free_extents() == [(0, num_blocks)]


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_random_allocate_grow_free_matches_a_free_set_model(name, seed):
    run_random_allocator_ops(name, seed, num_ops=800)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(ALLOCATOR_NAMES),
    num_blocks=st.integers(1, 48),
    block_size=st.sampled_from([1, 2, 4, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_kv_manager_random_operations_with_both_allocators(name, num_blocks, block_size, seed):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, allocator=name)
    tokens: dict[str, int] = {}
    for step in range(150):
        if tokens and rng.random() < 0.3:
            rid = rng.choice(sorted(tokens))
            freed = kv.free(rid)
            assert len(freed) == blocks_for(tokens.pop(rid), block_size)
            assert kv.block_ids(rid) == []
        else:
            grow = tokens and rng.random() < 0.7
            rid = rng.choice(sorted(tokens)) if grow else f"r{step}"
            want = tokens.get(rid, 0) + (block_size if rng.random() < 0.6 else rng.randint(0, 4 * block_size))
            table_before = list(kv.block_ids(rid))
            free_before = kv.num_free_blocks
            held_before = {b for r in tokens for b in kv.block_ids(r)}
            need = max(0, blocks_for(want, block_size) - len(table_before))
            ok = kv.allocate_slots(rid, want)
            assert ok == (need <= free_before)
            if ok:
                tokens[rid] = max(want, tokens.get(rid, 0))
                assert kv.block_ids(rid)[: len(table_before)] == table_before
                assert len(kv.block_ids(rid)) == max(len(table_before), blocks_for(want, block_size))
                assert kv.num_free_blocks == free_before - need
                nxt = table_before[-1] + 1 if table_before else None
                if name == "group" and need and nxt is not None and nxt < num_blocks and nxt not in held_before:
                    assert kv.block_ids(rid)[len(table_before)] == nxt, "did not grow in place"
            else:
                assert kv.block_ids(rid) == table_before and kv.num_free_blocks == free_before
        kv.check_invariants()
        for rid, n in tokens.items():
            assert len(kv.block_ids(rid)) >= blocks_for(n, block_size)
        held = [b for r in tokens for b in kv.block_ids(r)]
        assert len(held) == len(set(held)) and len(held) + kv.num_free_blocks == num_blocks
    for rid in list(tokens):
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_free_blocks == num_blocks
    if name == "group":
        assert kv.largest_free_extent() == num_blocks


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
@pytest.mark.parametrize("stride", [2, 3])
def test_heavily_fragmented_memory_still_grants_every_free_block(name, stride):
    num_blocks = 60
    m = ModelledAllocator(name, num_blocks)
    singles = sorted((m.allocate(1) for _ in range(num_blocks)), key=lambda ids: ids[0])
    for ids in singles[::stride]:  # a free block every `stride`: no two free blocks touch
        m.free(ids)
    assert m.alloc.largest_free_extent == (1 if stride > 1 else num_blocks)
    free = m.alloc.num_free_blocks
    assert m.allocate(free + 1) is None  # one too many: nothing handed out
    got = m.allocate(free)
    assert got is not None and len(got) == free
    assert m.alloc.num_free_blocks == 0
    assert m.allocate(1) is None
    assert m.allocate(0) == []


@settings(max_examples=50, deadline=None)
@given(num_blocks=st.integers(2, 64), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_any_request_up_to_the_free_count_is_granted(num_blocks, seed, data):
    rng = random.Random(seed)
    m = ModelledAllocator("group", num_blocks)
    tables = [t for t in (m.allocate(rng.randint(1, 4)) for _ in range(num_blocks)) if t]
    for t in tables:
        if rng.random() < 0.5:
            m.free(t)
    n = data.draw(st.integers(0, num_blocks))
    free = len(m.free_ids)
    ids = m.allocate(n)  # the model also checks that a refusal changed nothing
    assert (ids is not None) == (n <= free)


# ---- placement: growth in place, merging ---------------------------------------------------------------------


def test_a_lone_request_growing_one_block_at_a_time_stays_one_run():
    kv = KVCacheManager(num_blocks=50, block_size=4, allocator="group")
    for tokens in range(1, 50 * 4 + 1):
        assert kv.allocate_slots("a", tokens)
        assert len(kv.runs("a")) == 1
    assert kv.block_ids("a") == list(range(50))
    assert not kv.allocate_slots("a", 50 * 4 + 1)
    kv.free("a")
    assert kv.allocator.free_extents() == [(0, 50)]
    kv.check_invariants()


def test_a_new_run_leaves_the_first_half_of_a_gap_to_its_neighbour():
    alloc = BlockGroupAllocator(100)
    a = alloc.allocate(10)
    assert a == list(range(10))  # an extent at the arena's start is used from its start
    b = alloc.allocate(10)
    assert b == list(range(50, 60))  # middle of the 90-block gap that follows a
    # both can now grow in place, one block at a time, until they meet their neighbours
    for _ in range(40):
        a += alloc.allocate(1, after=a[-1])
        b += alloc.allocate(1, after=b[-1])
        assert len(runs_of(a)) == 1 and len(runs_of(b)) == 1
    assert a == list(range(50)) and b == list(range(50, 100))
    assert alloc.num_free_blocks == 0
    alloc.check_invariants()


def test_growth_jumps_to_a_new_run_only_when_the_next_block_is_taken():
    alloc = BlockGroupAllocator(20)
    a = alloc.allocate(4)  # 0..3
    b = alloc.allocate(1, after=None)  # middle of 4..19
    assert b == [11]
    c = alloc.allocate(4, after=a[-1])  # 4..7 are free: in place
    assert c == [4, 5, 6, 7]
    a += c
    a += alloc.allocate(3, after=a[-1])  # 8, 9, 10 free, then 11 is b's
    assert a == list(range(11))
    more = alloc.allocate(2, after=a[-1])  # 11 is taken: a second run, in the largest extent (12..19)
    assert len(runs_of(more)) == 1 and more[0] >= 12
    a += more
    assert len(runs_of(a)) == 2
    alloc.check_invariants()


def test_freeing_merges_neighbours_back_into_one_extent():
    alloc = BlockGroupAllocator(30)
    tables = [alloc.allocate(3) for _ in range(10)]
    assert alloc.num_free_blocks == 0 and alloc.largest_free_extent == 0
    order = [1, 3, 2, 8, 0, 9, 5, 4, 7, 6]
    for i in order:
        alloc.free(tables[i])
        alloc.check_invariants()
        free = set().union(*(set(tables[j]) for j in order[: order.index(i) + 1]))
        assert alloc.free_extents() == extents_of(free)
        assert alloc.largest_free_extent == largest_extent(free)
    assert alloc.free_extents() == [(0, 30)]
    assert sorted(alloc.allocate(30)) == list(range(30))


def test_largest_free_extent_of_the_free_list_allocator():
    alloc = FreeListAllocator(10)
    ids = alloc.allocate(10)
    assert alloc.largest_free_extent == 0
    alloc.free([ids[7], ids[2], ids[3], ids[5], ids[4]])  # 2..5 and 7 free
    assert alloc.largest_free_extent == 4


# ---- the steady-mix figure ------------------------------------------------------------------------------------


def steady_mix(seed: int, num_blocks: int = 1024, block_size: int = 16, steps: int = 400,
               prompt_blocks: tuple[int, int] = (1, 24), output_blocks: tuple[int, int] = (2, 20),
               low: float = 0.7, high: float = 0.9) -> dict[str, float]:
    """Requests arrive with a prompt, grow one block per step and finish, memory kept ``low``..``high`` used.
    Both allocators see the same operations (their refusals depend only on the free count, which they share).
    Returns each allocator's mean number of runs per live request, averaged over the steps after a warm-up."""
    rng = random.Random(seed)
    kvs = {name: KVCacheManager(num_blocks, block_size, allocator=name) for name in ALLOCATOR_NAMES}
    live: dict[str, list[int]] = {}  # request id -> [tokens held, tokens when it finishes]
    samples: dict[str, list[float]] = {name: [] for name in kvs}
    used = lambda: num_blocks - kvs["group"].num_free_blocks  # noqa: E731

    def apply(op: str, rid: str, tokens: int = 0) -> bool:
        results = {name: kv.free(rid) if op == "free" else kv.allocate_slots(rid, tokens) for name, kv in kvs.items()}
        if op != "free":
            assert len(set(results.values())) == 1, f"allocators disagree on {op} {rid}: {results}"
        return op == "free" or results["group"]

    next_id = 0
    for step in range(steps):
        for rid in sorted(live):
            if live[rid][0] >= live[rid][1]:
                apply("free", rid)
                del live[rid]
        while used() < low * num_blocks:
            rid, next_id = f"r{next_id}", next_id + 1
            prompt = rng.randint(*prompt_blocks) * block_size - rng.randrange(block_size)
            if not apply("alloc", rid, prompt):
                break
            live[rid] = [prompt, prompt + rng.randint(*output_blocks) * block_size]
        for rid in sorted(live):  # decode: one more block's worth of tokens each
            if apply("alloc", rid, live[rid][0] + block_size):
                live[rid][0] += block_size
        while used() > high * num_blocks:
            rid = rng.choice(sorted(live))
            apply("free", rid)
            del live[rid]
        for kv in kvs.values():
            kv.check_invariants()
        if step >= steps // 4:
            for name, kv in kvs.items():
                samples[name].append(kv.mean_groups_per_request())
    assert next_id > 200, "the mix should turn requests over many times"
    return {name: sum(s) / len(s) for name, s in samples.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_steady_mix_keeps_few_groups_per_request(seed):
    figures = steady_mix(seed)
    print(f"\nsteady mix seed={seed}: mean groups per request group={figures['group']:.2f} "
          f"block={figures['block']:.2f}")
    assert figures["group"] < 2.5
    assert figures["block"] > 5 * figures["group"]


# ---- runs_of and paired_runs ---------------------------------------------------------------------------------


def test_runs_of_examples():
    assert runs_of([]) == []
    assert runs_of([7]) == [(7, 1)]
    assert runs_of([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]  # table order, not sorted
    assert runs_of([5, 4, 3]) == [(5, 1), (4, 1), (3, 1)]  # descending ids are separate copies
    assert runs_of([0, 1, 1, 2]) == [(0, 2), (1, 2)]


def test_paired_runs_examples():
    assert paired_runs([], []) == []
    assert paired_runs([4, 5, 6], [0, 1, 2]) == [(4, 0, 3)]
    # the source is one run, but the destination breaks after two blocks: two copies
    assert paired_runs([0, 1, 2, 3], [10, 11, 20, 21]) == [(0, 10, 2), (2, 20, 2)]
    # the destination is one run, the source breaks
    assert paired_runs([0, 1, 5, 6], [10, 11, 12, 13]) == [(0, 10, 2), (5, 12, 2)]
    # both contiguous but shifted against each other at one point
    assert paired_runs([1, 2, 3], [5, 6, 8]) == [(1, 5, 2), (3, 8, 1)]
    assert paired_runs([3, 2], [0, 1]) == [(3, 0, 1), (2, 1, 1)]
    with pytest.raises(AssertionError):
        paired_runs([1, 2], [1])


def expand(runs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(s + i, d + i) for s, d, n in runs for i in range(n)]


def breaks(table: list[int]) -> set[int]:
    return {i for i in range(1, len(table)) if table[i] != table[i - 1] + 1}


@pytest.mark.parametrize("device_alloc", ALLOCATOR_NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_paired_runs_of_real_swap_tables_move_every_block_once(device_alloc, seed):
    rng = random.Random(seed)
    gpu = KVCacheManager(48, 4, allocator=device_alloc)
    cpu = KVCacheManager(64, 4, allocator="group")
    live: list[str] = []
    for step in range(300):  # fragment the device arena with interleaved growth and frees
        if live and rng.random() < 0.3:
            gpu.free(live.pop(rng.randrange(len(live))))
        elif live and rng.random() < 0.6:
            rid = rng.choice(live)
            gpu.allocate_slots(rid, len(gpu.block_ids(rid)) * 4 + rng.randint(1, 8))
        elif gpu.allocate_slots(f"r{step}", rng.randint(1, 12)):
            live.append(f"r{step}")
        if rng.random() < 0.2 and live:  # swap a request out, then (sometimes) back in elsewhere
            rid = rng.choice(live)
            src = gpu.block_ids(rid)
            if not cpu.allocate_slots(rid, len(src) * 4):
                continue
            dst = cpu.block_ids(rid)
            out = paired_runs(src, dst)
            assert expand(out) == list(zip(src, dst))  # every block, in table order, exactly once
            assert len(out) == 1 + len(breaks(src) | breaks(dst))
            assert max(len(runs_of(src)), len(runs_of(dst))) <= len(out) <= len(runs_of(src)) + len(runs_of(dst))
            gpu.free(rid)
            live.remove(rid)
            if gpu.allocate_slots(rid, len(dst) * 4):
                back = paired_runs(dst, gpu.block_ids(rid))
                assert expand(back) == list(zip(dst, gpu.block_ids(rid)))
                assert sorted(d for _, d in expand(back)) == sorted(gpu.block_ids(rid))
                live.append(rid)
            cpu.free(rid)
        gpu.check_invariants()
        cpu.check_invariants()


# ---- misuse ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_double_free_and_never_allocated_free_raise(name):
    alloc = ALLOCATOR_CLASSES[name](16)
    a = alloc.allocate(4)
    b = alloc.allocate(4)
    alloc.free(a)
    state = allocator_state(alloc)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(a)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free([a[2]])
    never = next(i for i in range(16) if i not in a and i not in b)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free([never])
    assert allocator_state(alloc) == state, "a rejected free changed the allocator"
    alloc.check_invariants()
    alloc.free(b)
    assert alloc.num_free_blocks == 16


def test_group_free_of_a_run_overlapping_a_free_extent_raises():
    alloc = BlockGroupAllocator(16)
    ids = alloc.allocate(16)
    alloc.free(ids[6:8])
    state = allocator_state(alloc)
    for bad in (ids[4:7], ids[7:10], ids[5:9], ids[6:7]):  # overlaps 6..7 from either side, covers, inside
        with pytest.raises(RuntimeError, match="freed twice"):
            alloc.free(bad)
        assert allocator_state(alloc) == state
    alloc.check_invariants()


@pytest.mark.parametrize("bad", [-1, 16, 100])
def test_group_free_of_an_id_outside_the_arena_raises(bad):
    alloc = BlockGroupAllocator(16)
    alloc.allocate(16)
    with pytest.raises(ValueError, match="outside"):  # as FreeListAllocator: the ids are not this arena's
        alloc.free([bad])
    assert alloc.num_free_blocks == 0 and alloc.free_extents() == []
    alloc.check_invariants()


def test_group_free_outside_the_arena_does_not_merge_into_free_memory():
    alloc = BlockGroupAllocator(16)  # all free: an id right past the end would touch the last extent
    for bad in ([16], [-1], [15, 16]):
        with pytest.raises(ValueError, match="outside"):
            alloc.free(bad)
        assert alloc.free_extents() == [(0, 16)] and alloc.num_free_blocks == 16
    alloc.check_invariants()


@pytest.mark.parametrize("allocator_cls", [BlockGroupAllocator, FreeListAllocator])
def test_a_rejected_free_releases_nothing(allocator_cls):
    alloc = allocator_cls(8)
    held = alloc.allocate(4)
    # out of range (above and below), repeated, never allocated
    for bad in ([held[0], 99], [-1], [held[0], held[0]], [held[1], 6]):
        with pytest.raises((ValueError, RuntimeError)):
            alloc.free(bad)
        assert alloc.num_free_blocks == 4
        alloc.check_invariants()
    alloc.free(held)
    assert alloc.num_free_blocks == 8
