"""One machine of a multi-machine engine that is not the frontend's: ``fs-engine launch --nnodes M --node-rank K``.

It starts this machine's ranks (``tensor_parallel_size / nnodes`` worker processes) and a swap process for their
arenas, connected over TCP to the frontend on node 0 (``engine_addresses``), and then only watches them: plans,
swap commands and shutdown come from the frontend. If one of its processes fails, it tells the frontend (whose
pending requests then fail with that reason) and stops the others; it exits once they all have, removing its
run directory; once any of them ends normally (the frontend shut the engine down) it stops the rest, which
may not have been told (a swap process that connected after the frontend gave up). Every machine runs the
same engine arguments (the frontend checks), and the model at the same
path.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time

import zmq

from fs_engine.config import EngineConfig
from fs_engine.engine.mp_executor import engine_addresses, node_processes
from fs_engine.model_config import ModelArch
from ipc.channels import Pusher, instance_dir
from ipc.messages import ProcessFailed

WATCH_S = 0.2


def serve_node(config: EngineConfig, arch: ModelArch, max_model_len: int) -> int:
    parallel = config.parallel
    node = parallel.node_rank
    run_dir = instance_dir()
    _, addresses = engine_addresses(parallel, run_dir)
    workers, swapper = node_processes(config, arch, max_model_len, node, run_dir, addresses)
    procs = [*workers, swapper]
    stop = False

    def request_stop(*_) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    ctx = zmq.Context()
    frontend = Pusher(ctx, addresses["results"])
    failed = None
    try:
        for proc in procs:
            proc.start()
        ranks = [int(w.name.rsplit("-", 1)[1]) for w in workers]
        print(f"fs-engine node {node} of {parallel.nnodes} running ranks {ranks} and a swap process for the "
              f"frontend at {parallel.master_addr}:{parallel.master_port} (pids "
              f"{[p.pid for p in procs]})", flush=True)
        while not stop:
            done = [p for p in procs if not p.is_alive()]
            if done:  # one ended: the engine is shutting down (code 0) or one of ours failed
                failed = next((p for p in done if p.exitcode != 0), None)
                break
            time.sleep(WATCH_S)
        if failed is not None:
            # the process reported its own error if it could; a killed one could not: say which and how
            frontend.send(ProcessFailed(f"node {node}'s {failed.name}", f"exited with code {failed.exitcode}"),
                          timeout_s=1.0)
            print(f"fs-engine node {node}: {failed.name} exited with code {failed.exitcode}; stopping",
                  file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
        for proc in procs:
            if proc.pid is not None:
                proc.join(5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2.0)
        frontend.close()
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed is not None else 0
