"""The worker's persistent tables and vectorised step inputs, against a per-token reference."""

from __future__ import annotations

import random

import pytest
import torch

from ipc.codec import decode, encode
from ipc.messages import PENDING_TOKEN, ScheduledChunk, StepPlan
from workers.input_batch import InputBatch

BS = 4


def reference_inputs(chunks: list[ScheduledChunk], tables: dict[str, list[int]]):
    """What the worker must compute, token by token (the stateless worker's old loop)."""
    tokens, positions, slots, starts, seq_lens, rows = [], [], [], [0], [], []
    for c in chunks:
        table = tables[c.request_id]
        pos = range(c.start_pos, c.start_pos + len(c.token_ids))
        tokens += c.token_ids
        positions += pos
        slots += [table[p // BS] * BS + p % BS for p in pos]
        starts.append(starts[-1] + len(c.token_ids))
        seq_lens.append(c.start_pos + len(c.token_ids))
        if c.sample:
            rows.append(starts[-1] - 1)
    width = -(-max(seq_lens) // BS)
    block_tables = [(tables[c.request_id] + [0] * width)[:width] for c in chunks]
    return tokens, positions, slots, starts, seq_lens, rows, block_tables


def test_random_plans_build_the_reference_inputs_and_keep_exact_tables():
    rng = random.Random(0)
    batch = InputBatch(BS, 64, torch.device("cpu"), num_rows=2)  # grows as requests arrive
    frontend: dict[str, list[int]] = {}  # the tables the frontend holds
    sent: dict[str, int] = {}  # entries the worker has of each
    lengths: dict[str, int] = {}
    next_block = iter(range(10**6))
    for step in range(1, 200):
        chunks = []
        for rid in rng.sample([f"r{i}" for i in range(12)], rng.randint(1, 6)):
            if rid not in frontend or rng.random() < 0.1:  # new, or preempted: a whole new table
                frontend[rid], sent[rid], lengths[rid] = [], 0, 0
            n = rng.choice([1, 1, 1, rng.randint(1, 9)])
            end = lengths[rid] + n
            while len(frontend[rid]) * BS < end:
                frontend[rid].append(next(next_block) % 500)
            keep = sent[rid]
            chunks.append(ScheduledChunk(rid, [rng.randrange(1000) for _ in range(n)], lengths[rid],
                                         frontend[rid][keep:], rng.random() < 0.7, 0, keep))
            sent[rid], lengths[rid] = len(frontend[rid]), end
        finished = [r for r in list(frontend) if r not in {c.request_id for c in chunks} and rng.random() < 0.05]
        for rid in finished:
            del frontend[rid], sent[rid], lengths[rid]
        plan = decode(encode(StepPlan(step, chunks, finished_ids=finished)))  # as a worker process gets it
        inputs = batch.prepare(plan)
        tokens, positions, slots, starts, seq_lens, rows, tables = reference_inputs(chunks, frontend)
        assert inputs.token_ids.tolist() == tokens
        assert inputs.positions.tolist() == positions
        assert inputs.meta.slot_mapping.tolist() == slots
        assert inputs.meta.query_start_loc.tolist() == starts
        assert inputs.meta.seq_lens.tolist() == seq_lens == inputs.meta.seq_lens_host
        assert inputs.sample_rows.tolist() == rows
        assert inputs.meta.block_tables.tolist() == tables
        for rid, table in frontend.items():
            assert batch.table(rid) == table
        assert set(batch.rows) == set(frontend)


def test_a_diff_against_a_table_the_worker_does_not_hold_is_refused():
    batch = InputBatch(BS, 8, torch.device("cpu"))
    batch.prepare(StepPlan(1, [ScheduledChunk("a", [1, 2], 0, [5], True)]))
    with pytest.raises(ValueError, match="does not hold"):
        batch.prepare(StepPlan(2, [ScheduledChunk("a", [3], 2, [6], True, table_start=3)]))
    with pytest.raises(ValueError, match="more than 8 blocks"):
        batch.prepare(StepPlan(3, [ScheduledChunk("b", [1], 0, list(range(9)), True)]))


def test_a_finished_id_frees_its_row_for_a_new_request_of_the_same_id():
    batch = InputBatch(BS, 8, torch.device("cpu"), num_rows=1)
    batch.prepare(StepPlan(1, [ScheduledChunk("a", [1], 0, [3, 4], True)]))
    batch.prepare(StepPlan(2, [ScheduledChunk("a", [9], 0, [7], True)], finished_ids=["a"]))
    assert batch.table("a") == [7] and batch.tables.shape[0] == 1


def test_a_pending_token_is_the_one_the_row_sampled_last():
    """Async scheduling: a plan made before the previous step's result names that step's sampled token as
    PENDING_TOKEN; the worker puts in what it sampled for the request (and refuses a row that sampled none)."""
    batch = InputBatch(BS, 16, torch.device("cpu"), num_rows=2)
    first = StepPlan(1, [ScheduledChunk("a", [5, 6, 7], 0, [3], sample=True, sample_index=0),
                         ScheduledChunk("b", [8, 9], 0, [4], sample=True, sample_index=0)])
    inputs = batch.prepare(first)
    batch.record_sampled(inputs.sampled_table_rows, [41, 42])
    second = StepPlan(2, [ScheduledChunk("b", [PENDING_TOKEN], 2, [], sample=True, sample_index=1, table_start=1),
                          ScheduledChunk("a", [PENDING_TOKEN], 3, [], sample=True, sample_index=1, table_start=1)])
    received = decode(encode(second))  # -1 survives the int32 wire format
    assert batch.prepare(received).token_ids.tolist() == [42, 41]
    batch.forget(["a"])
    third = StepPlan(3, [ScheduledChunk("a", [PENDING_TOKEN], 0, [5], sample=True, sample_index=0)])
    with pytest.raises(ValueError, match="sampled none"):
        batch.prepare(third)
