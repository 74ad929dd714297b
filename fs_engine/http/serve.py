"""``fs-engine serve``: the engine in a child process (``fs-engine launch`` on a private ipc:// socket), the
OpenAI HTTP API (uvicorn) in this one. Either going down takes the other with it."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

ENGINE_READY_TIMEOUT_S = 600.0


def serve(args: argparse.Namespace, launch_argv: list[str]) -> int:
    from fs_engine.client import Client
    from fs_engine.engine.auth import Keys
    from fs_engine.engine.llm_engine import resolve_model_path
    from fs_engine.http.api_server import OpenAIServer, ServedModel
    from fs_engine.tokenizer import load_tokenizer

    model_path = resolve_model_path(args.model_dir)
    keys = Keys.load(args.api_keys) if args.api_keys else None
    if keys is not None and not keys.by_api_key:
        raise ValueError(f"the keys file {args.api_keys} lists no api_keys: nobody could use the HTTP API")
    if keys is not None:  # its tenants' weights are the engine's fair-share weights
        weights = keys.merged_weights(getattr(args, "tenant_weights", None))
        launch_argv = [*_without(launch_argv, "--tenant-weights"), "--tenant-weights",
                       ",".join(f"{t}={w:g}" for t, w in sorted(weights.items()))]
    tokenizer = load_tokenizer(model_path)
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer: the HTTP API takes text; use fs-engine launch and the SDK")
    run_dir = Path(tempfile.mkdtemp(prefix="fs-engine-serve-"))  # 0700: only this user reaches the engine
    address = f"ipc://{run_dir / 'engine'}"
    engine = subprocess.Popen([sys.executable, "-m", "fs_engine", "launch", "--address", address,
                               "--model", model_path, *_without(launch_argv, "--model")],
                              stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    try:
        if not _wait_ready(engine):
            return engine.wait() or 1
        with Client(address, timeout_s=60) as client:
            max_model_len = int(client.stats()["max_model_len"])
        name = args.served_model_name or Path(model_path).name
        api = OpenAIServer(address, ServedModel(name, model_path, tokenizer, max_model_len), keys)
        server = _Server(uvicorn.Config(api.app, host=args.host, port=args.port, log_level="warning",
                                        timeout_graceful_shutdown=5), name, engine.pid)
        threading.Thread(target=_exit_with, args=(engine, server), daemon=True).start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a graceful stop, then the engine's (below)
            signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        server.run()
        return 1 if engine.poll() not in (None, 0) else 0
    finally:
        if engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the engine's process, before it runs: the kernel stops it if this process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: serve's own shutdown is all there is
        pass


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _wait_ready(engine: subprocess.Popen) -> bool:
    """The engine's ready line (its errors went to our stderr already); False if it exited first."""
    selector = selectors.DefaultSelector()
    selector.register(engine.stdout, selectors.EVENT_READ)
    if not selector.select(ENGINE_READY_TIMEOUT_S):
        raise ValueError(f"the engine did not start within {ENGINE_READY_TIMEOUT_S:.0f} s")
    line = engine.stdout.readline()
    if not line.startswith("fs-engine ready"):
        return False
    threading.Thread(target=shutil.copyfileobj, args=(engine.stdout, sys.stdout), daemon=True).start()
    return True


def _exit_with(engine: subprocess.Popen, server: uvicorn.Server) -> None:
    engine.wait()
    print(f"fs-engine serve: the engine exited (code {engine.returncode}), stopping", file=sys.stderr, flush=True)
    server.should_exit = True


class _Server(uvicorn.Server):
    """uvicorn, printing one ready line with the port it got (``--port 0``: any free one)."""

    def __init__(self, config: uvicorn.Config, model: str, engine_pid: int) -> None:
        super().__init__(config)
        self.model, self.engine_pid = model, engine_pid

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's own handling re-raises the signal once it has stopped, which would end this process
        before it stops the engine: ``serve`` installs handlers that only ask uvicorn to stop."""
        yield

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"fs-engine serve ready at http://{host}:{port} (model {self.model}, server pid {os.getpid()}, "
                  f"engine pid {self.engine_pid})", flush=True)
