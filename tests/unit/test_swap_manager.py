"""The asynchronous swap manager with CPU tensors: what each command moves, how completions are reported, and
that the two directions run at the same time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ipc.messages import SwapCommand
from workers.swap.copier import KVCopier
from workers.swap.swap_manager import SwapManager

NUM_LAYERS = 3
SHAPE = (NUM_LAYERS, 2, 4, 2, 8)  # layers, K/V, block_size, kv heads, head dim


def arenas(num_device: int = 16, num_host: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    device = torch.randn(num_device, *SHAPE, generator=gen)
    host = torch.zeros(num_host, *SHAPE)
    return device, host


@pytest.fixture
def make():
    managers = []

    def build(granularity: str = "group", num_threads: int = 2, **kw):
        device, host = arenas(**kw)
        manager = SwapManager(KVCopier(device, host, granularity), num_threads)
        managers.append(manager)
        return manager, device, host

    yield build
    for manager in managers:
        manager.inject_delay_s = 0.0
        manager.shutdown()


def wait_done(manager: SwapManager, ids: list[int], timeout_s: float = 10.0) -> dict:
    """Poll until every id has completed; returns {swap id: SwapDone} (each reported once)."""
    got: dict = {}
    deadline = time.monotonic() + timeout_s
    while set(got) != set(ids):
        assert time.monotonic() < deadline, f"swaps {set(ids) - set(got)} never completed"
        manager.wait_any(0.5)
        for done in manager.poll():
            assert done.swap_id not in got, f"swap {done.swap_id} reported twice"
            got[done.swap_id] = done
    return got


@pytest.mark.parametrize("granularity, calls_per_block",
                         [("group", None), ("block", 1), ("block_layer", 2 * NUM_LAYERS)])
def test_commands_move_exactly_their_blocks_at_every_granularity(make, granularity, calls_per_block):
    manager, device, host = make(granularity)
    block_bytes = device[0].numel() * device.element_size()
    original = device.clone()
    out = SwapCommand(1, "out", [(0, 3, 2), (5, 0, 1), (9, 10, 3)])
    manager.submit(out)
    (done,) = wait_done(manager, [1]).values()
    assert torch.equal(host[3:5], device[0:2]) and torch.equal(host[0], device[5])
    assert torch.equal(host[10:13], device[9:12])
    untouched = [b for b in range(16) if b not in (0, 3, 4, 10, 11, 12)]
    assert not host[untouched].any()  # nothing else written
    assert done.bytes == 6 * block_bytes and done.seconds >= 0
    assert done.copies == (3 if calls_per_block is None else 6 * calls_per_block)
    # back in, to other device blocks
    manager.submit(SwapCommand(2, "in", [(3, 13, 2), (0, 15, 1)], wait=True))
    (done,) = wait_done(manager, [2]).values()
    assert torch.equal(device[13:15], original[0:2]) and torch.equal(device[15], original[5])
    assert torch.equal(device[:13], original[:13])  # the sources were not modified
    assert done.bytes == 3 * block_bytes


def test_wait_blocks_until_the_command_is_done(make):
    manager, device, host = make()
    manager.inject_delay_s = 0.2
    manager.submit(SwapCommand(1, "out", [(0, 0, 4)], wait=True))
    assert manager.num_in_flight == 1
    waited = manager.wait([1])
    assert waited >= 0.15
    assert torch.equal(host[:4], device[:4])  # the bytes have landed when wait returns
    assert [d.swap_id for d in manager.poll()] == [1]
    assert manager.wait([1]) < 0.05  # already reported: nothing to wait for
    manager.submit(SwapCommand(2, "out", [(4, 4, 1)]))
    with pytest.raises(TimeoutError):
        manager.wait([2], timeout_s=0.01)


def test_poll_reports_each_completion_exactly_once(make):
    manager, _, _ = make(num_threads=4)
    ids = list(range(1, 21))
    for i in ids:
        manager.submit(SwapCommand(i, "out" if i % 2 else "in", [(i % 8, i % 8, 1)]))
    manager.wait(ids)
    reported = [d.swap_id for d in manager.poll()]
    assert sorted(reported) == ids
    assert manager.poll() == [] and manager.num_in_flight == 0
    with pytest.raises(ValueError, match="twice"):
        manager.submit(SwapCommand(21, "out", [(0, 0, 1)]))
        manager.submit(SwapCommand(21, "out", [(0, 0, 1)]))


def test_a_delayed_command_is_not_done_at_once_and_wait_any_returns_when_it_is(make):
    manager, device, host = make()
    manager.inject_delay_s = 0.25
    start = time.perf_counter()
    manager.submit(SwapCommand(1, "out", [(0, 0, 2)]))
    assert manager.poll() == [] and manager.num_in_flight == 1
    assert not host[:2].any()  # nothing moved yet
    waited = manager.wait_any(timeout_s=5.0)
    elapsed = time.perf_counter() - start
    assert 0.2 <= elapsed < 2.0 and waited <= elapsed
    (done,) = manager.poll()
    assert done.swap_id == 1 and torch.equal(host[:2], device[:2])
    assert manager.wait_any(timeout_s=5.0) < 0.05  # nothing in flight: returns at once


def test_wait_any_gives_up_after_its_timeout(make):
    manager, _, _ = make()
    manager.inject_delay_s = 0.3
    manager.submit(SwapCommand(1, "in", [(0, 0, 1)]))
    waited = manager.wait_any(timeout_s=0.05)
    assert 0.04 <= waited < 0.25 and manager.poll() == []
    manager.wait([1])


def test_both_directions_run_at_the_same_time(make):
    manager, device, host = make()
    host[8:10] = 7.0
    delay = 0.3
    manager.inject_delay_s = delay
    start = time.perf_counter()
    manager.submit(SwapCommand(1, "out", [(0, 0, 2)]))
    manager.submit(SwapCommand(2, "in", [(8, 4, 2)]))
    manager.wait([1, 2])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.6 * delay, f"out and in took {elapsed:.2f} s: they ran one after the other"
    assert torch.equal(host[:2], device[:2]) and (device[4:6] == 7.0).all()
    assert {d.swap_id for d in manager.poll()} == {1, 2}


def test_shutdown_stops_the_threads(make):
    manager, _, _ = make(num_threads=4)
    threads = list(manager._threads)
    assert len(threads) == 4 and all(t.is_alive() for t in threads)
    names = sorted(t.name.split("-")[2] for t in threads)
    assert names == ["in", "in", "out", "out"]
    manager.submit(SwapCommand(1, "out", [(0, 0, 1)]))
    manager.wait([1])
    manager.shutdown()
    for t in threads:
        t.join(timeout=2.0)
    assert not any(t.is_alive() for t in threads)
    assert not set(threads) & set(threading.enumerate())


def test_a_failing_copy_does_not_stop_the_direction(make):
    manager, device, host = make()
    manager.submit(SwapCommand(1, "out", [(14, 15, 3)]))  # runs past the end of both arenas
    manager.submit(SwapCommand(2, "out", [(0, 0, 1)]))
    manager.wait([2], timeout_s=0.5)
    assert torch.equal(host[0], device[0])
    done = {d.swap_id: d for d in manager.poll()}
    assert done[1].error and "Error" in done[1].error  # reported, so the frontend can fail loudly
    assert done[2].error is None
