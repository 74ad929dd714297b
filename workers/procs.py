"""Entry points of the engine's child processes: one GPU worker per tensor-parallel rank, and the swap process.

Both connect to sockets the frontend has bound, announce themselves (``WorkerReady`` / ``SwapReady``) and
then execute what they are sent, deciding nothing. On an error they send ``ProcessFailed`` with the
traceback and exit non-zero; when the frontend disappears (its process is gone) they exit on their own and
remove the engine's run directory (sockets, shared-memory arenas), so a killed frontend leaves no orphan
process and nothing in /dev/shm.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import shutil
import signal
import traceback
from typing import Any

from ipc.channels import Puller, Pusher
from ipc.messages import (
    OpenArenas,
    ProcessFailed,
    Shutdown,
    StepPlan,
    SwapBatch,
    SwapDone,
    SwapReady,
    WorkerReady,
)

IDLE_POLL_S = 1.0  # how often an idle child checks that the frontend is still alive
RENDEZVOUS_TIMEOUT_S = 600  # ranks joining the group (and any collective) give up after this long


def _frontend_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def _orphaned(run_dir: str) -> None:
    """The frontend is gone without shutting us down (it was killed): nobody else will clean up. Every child
    removes the run directory; the files' memory is freed once the last process unmaps them."""
    shutil.rmtree(run_dir, ignore_errors=True)


def _leave_interrupts_to_the_frontend() -> None:
    """Ctrl-C at a terminal interrupts the whole process group: the frontend stops the engine in order (its
    children get ``Shutdown``, or notice it is gone), so a child ignores SIGINT rather than die mid-step with
    a traceback of its own. SIGTERM and SIGKILL still stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _send(channel: Pusher, msg: Any, run_dir: str) -> None:
    """Send to the frontend; exit quietly if it is gone (a plain send to a dead peer blocks forever)."""
    while not channel.send(msg, timeout_s=IDLE_POLL_S):
        if not _frontend_alive():
            _orphaned(run_dir)
            os._exit(0)


def config_digest(config: Any) -> str:
    """A digest of the engine arguments, the same on every machine of one engine (``node_rank`` aside)."""
    import dataclasses
    import hashlib

    same = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, node_rank=0))
    return hashlib.sha256(repr(same).encode()).hexdigest()[:16]


def _join_ranks(config: Any, rank: int, init_method: str):
    """This rank's place in the tensor-parallel group (torch.distributed: NCCL on GPU, gloo on CPU)."""
    from workers.parallel import SINGLE, TPContext

    size = config.parallel.tensor_parallel_size
    if size == 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    cuda = config.device.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    return TPContext(rank, size)


def run_worker(config: Any, arch: Any, max_model_len: int, rank: int, run_dir: str, addresses: dict) -> None:
    _leave_interrupts_to_the_frontend()
    import zmq

    ctx = zmq.Context()
    results = Pusher(ctx, addresses["results"])
    try:
        from workers.gpu_worker import Worker

        tp = _join_ranks(config, rank, addresses["dist"])
        worker = Worker(config, arch, max_model_len, tp=tp, shared_dir=run_dir)
        num_blocks, num_host_blocks = worker.init_kv_cache()
        plans = Puller(ctx, addresses[f"plans-{rank}"], bind=False)
        _send(results, WorkerReady(rank, os.getpid(), num_blocks, num_host_blocks, str(worker.device),
                                 worker.dtype_name, worker.layout.block_bytes, worker.arena_spec(),
                                 config_digest(config), worker.runner.forward_summary(),
                                 worker.runner.num_compilations), run_dir)
        while True:
            msg = plans.recv(timeout_s=IDLE_POLL_S)
            if msg is None:
                if not _frontend_alive():
                    return _orphaned(run_dir)
                continue
            if isinstance(msg, Shutdown):
                return
            assert isinstance(msg, StepPlan), f"worker got {type(msg).__name__}"
            result = worker.execute(msg)
            if rank == 0:  # rank 0 returns the sampled tokens for every rank
                _send(results, result, run_dir)
    except Exception:  # noqa: BLE001 - reported, then the process exits non-zero
        results.send(ProcessFailed(f"worker rank {rank}", traceback.format_exc()), timeout_s=IDLE_POLL_S)
        results.close()
        ctx.term()
        os._exit(1)
    finally:
        results.close()


def run_swap_process(run_dir: str, addresses: dict) -> None:
    _leave_interrupts_to_the_frontend()
    import zmq

    ctx = zmq.Context()
    done_out = Pusher(ctx, addresses["swap-done"])
    try:
        import torch

        from workers.kv_arena import open_arena
        from workers.swap.copier import KVCopier
        from workers.swap.swap_manager import SwapManager

        commands = Puller(ctx, addresses["swap-commands"], bind=False)
        setup = None
        while setup is None:
            setup = commands.recv(timeout_s=IDLE_POLL_S)
            if setup is None and not _frontend_alive():
                return _orphaned(run_dir)
            if isinstance(setup, Shutdown):
                return
        assert isinstance(setup, OpenArenas), f"swap process got {type(setup).__name__} before OpenArenas"
        managers = []
        for spec in setup.arenas:  # one host arena per rank: each rank's KV heads are its own
            device_arena = open_arena(spec)
            # same block layout as the device arena; pinned when a GPU copies to it (one DMA per run)
            host = torch.empty((setup.num_host_blocks, *device_arena.shape[1:]), dtype=device_arena.dtype,
                               pin_memory=device_arena.is_cuda)
            managers.append(SwapManager(KVCopier(device_arena, host, setup.granularity), setup.threads))
        _send(done_out, SwapReady(os.getpid(), setup.num_host_blocks), run_dir)
        _serve_swaps(commands, done_out, managers, run_dir)
    except Exception:  # noqa: BLE001
        done_out.send(ProcessFailed("swap process", traceback.format_exc()), timeout_s=IDLE_POLL_S)
        done_out.close()
        ctx.term()
        os._exit(1)
    finally:
        done_out.close()


def _serve_swaps(commands: Puller, done_out: Pusher, managers: list, run_dir: str) -> None:
    pending: dict[int, list[SwapDone]] = {}  # swap id -> completions so far, one per rank
    while True:
        in_flight = any(m.num_in_flight for m in managers)
        msg = commands.recv(timeout_s=0.001 if in_flight else IDLE_POLL_S)
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, SwapBatch):
            for command in msg.commands:
                pending[command.swap_id] = []
                for manager in managers:  # rule 7: every rank applies the same commands
                    manager.submit(command)
        elif msg is None and not in_flight and not _frontend_alive():
            return _orphaned(run_dir)
        for manager in managers:
            for done in manager.poll():
                pending[done.swap_id].append(done)
        for swap_id in [i for i, d in pending.items() if len(d) == len(managers)]:
            parts = pending.pop(swap_id)  # reported once every rank's copy has landed
            error = next((d.error for d in parts if d.error), None)
            _send(done_out, SwapDone(swap_id, sum(d.copies for d in parts), sum(d.bytes for d in parts),
                                   max(d.seconds for d in parts), error), run_dir)
