"""Safety rule 1 on the device: every copy of KV blocks is ordered after the device work that wrote them.

The racy schedule: a long prompt whose first chunk samples nothing (its step returns no token, so no
``.tolist()`` waits for its kernels), and right after it a higher-priority request takes the only seat, so
the long prompt is swapped out: the copy reads exactly the blocks that chunk wrote. On a CPU every op is
synchronous, so a recording fake stands in for the worker's stream: it holds launched steps as pending
until the worker synchronizes, and every copy records which steps had completed when it was issued.
The same schedule runs on a GPU in ``tests/gpu/test_cuda_engine.py``, checked against transformers.
"""

from __future__ import annotations

import pytest

from fs_engine import LLMEngine, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
ENGINE_ARGS = dict(policy="priority", block_size=4, max_num_seqs=1, max_num_batched_tokens=16,
                   preemption_cooldown_steps=0, swap_mode="async")


def racy_schedule(engine: LLMEngine) -> dict[str, list[int]]:
    """Run the racy schedule; returns each request's greedy tokens."""
    long_prompt, short_prompt = random_prompts(engine.arch.vocab_size, [40, 6], seed=11)
    engine.add_request("long", long_prompt, GREEDY, priority=5)
    outputs: dict[str, list[int]] = {}
    first = engine.step()  # tokens 0..15 of the long prompt: nothing sampled
    assert not first and engine.stats()["num_batched_tokens"] == 16
    engine.add_request("short", short_prompt, GREEDY, priority=0)  # outranks "long": takes its seat
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert engine.stats()["num_swap_outs"] >= 1, "the schedule did not swap the long prompt out"
    return outputs


def reference(model) -> dict[str, list[int]]:
    engine = LLMEngine(model, block_size=4, max_num_seqs=2)  # no preemption at all
    try:
        long_prompt, short_prompt = random_prompts(engine.arch.vocab_size, [40, 6], seed=11)
        engine.add_request("long", long_prompt, GREEDY)
        engine.add_request("short", short_prompt, GREEDY)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        return outputs
    finally:
        engine.shutdown()


class RecordingStream:
    """A device stream that completes work only when synchronized (``honest=False``: never)."""

    def __init__(self, honest: bool = True) -> None:
        self.honest = honest
        self.pending: list[int] = []
        self.completed: list[int] = []

    def launched(self, step_id: int) -> None:
        self.pending.append(step_id)

    def synchronize(self) -> None:
        if self.honest:
            self.completed += self.pending
            self.pending = []

    def idle(self) -> bool:
        return not self.pending


def record_copies(engine: LLMEngine, stream: RecordingStream) -> list[tuple[int, list[int]]]:
    """Install ``stream`` in the worker; every copy command issued records (swap id, steps still running)."""
    engine.executor.worker.runner.stream = stream
    issued: list[tuple[int, list[int]]] = []
    submit = engine.executor.swaps.submit

    def recording_submit(commands):
        issued.extend((c.swap_id, list(stream.pending)) for c in commands)
        submit(commands)

    engine.executor.swaps.submit = recording_submit
    return issued


def test_every_copy_is_issued_after_the_device_work_before_it(tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    engine = LLMEngine(model, **ENGINE_ARGS)
    try:
        stream = RecordingStream()
        issued = record_copies(engine, stream)
        outputs = racy_schedule(engine)
    finally:
        engine.shutdown()
    assert issued and all(not running for _, running in issued), f"copies overtook device work: {issued}"
    assert 1 in stream.completed  # the non-sampling chunk's step was waited for before its result went back
    assert outputs == reference(model)


def test_the_fake_stream_catches_a_worker_that_returns_before_its_kernels(tiny_model_dirs):
    # the check above can fail: without the worker's wait, the swap-out is issued while step 1 still "runs"
    engine = LLMEngine(tiny_model_dirs["llama"], **ENGINE_ARGS)
    try:
        issued = record_copies(engine, RecordingStream(honest=False))
        racy_schedule(engine)
    finally:
        engine.shutdown()
    first_copy_running = issued[0][1]
    assert 1 in first_copy_running


@pytest.mark.parametrize("swap_mode", ["sync", "async"])
def test_the_racy_schedule_is_token_identical_multiprocess(tiny_model_dirs, swap_mode):
    model = tiny_model_dirs["llama"]
    engine = LLMEngine(model, multiprocess=True, **{**ENGINE_ARGS, "swap_mode": swap_mode})
    try:
        outputs = racy_schedule(engine)
    finally:
        engine.shutdown()
    assert outputs == reference(model)
