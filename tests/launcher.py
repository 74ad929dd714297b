"""A real ``fs-engine launch`` for tests: started as a user would, stopped and checked for leftovers."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fs_engine.client import Client
from ipc.channels import PROCESSES_FILE

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"fs-engine ready at (tcp://\S+) .*frontend pid (\d+), run dir (\S+)\)")
# tight memory and priority scheduling, so the served requests are preempted and swapped through the swap process
ENGINE_FLAGS = {"block_size": 4, "num_gpu_blocks": 48, "policy": "priority", "preemption_cooldown_steps": 1}


class Launched:
    """One ``python -m fs_engine launch`` process; stderr goes to a file so a full pipe never blocks it."""

    def __init__(self, model: str, log: Path, new_session: bool = False, **flags: object) -> None:
        """``new_session``: the launch leads a process group of its own, as a terminal's foreground job does."""
        argv = [sys.executable, "-m", "fs_engine", "launch", "--model", model, "--port", "0"]
        for name, value in {**ENGINE_FLAGS, **flags}.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     start_new_session=new_session)
        line = self._ready_line(timeout_s=180)
        match = READY.search(line)
        assert match, f"unexpected ready line {line!r}"
        self.address = match.group(1)
        assert int(match.group(2)) == self.proc.pid
        self.run_dir = Path(match.group(3))  # this engine's own, whatever else runs on the machine

    def processes(self) -> dict:
        """{"frontend": pid, "workers": [pids], "swap": pid, "children": [pids]} (its run directory's)."""
        return json.loads((self.run_dir / PROCESSES_FILE).read_text())

    def _ready_line(self, timeout_s: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            self.proc.kill()
            pytest.fail(f"no ready line within {timeout_s} s; stderr:\n{self.log.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            pytest.fail(f"launch exited with {self.proc.returncode}; stderr:\n{self.log.read_text()[-3000:]}")
        return line

    def stats(self) -> dict:
        with Client(self.address, timeout_s=30) as client:
            return client.stats()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def run_dirs() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("fs-engine-*")} if shm.is_dir() else set()
