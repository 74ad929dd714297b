"""Clocks for the engine's drivers: wall time, or the virtual time of a simulated device.

The benchmark driver reads ``now()`` to timestamp tokens and ``sleep(s)`` to wait for the next arrival. On a
real device both are wall time; on a simulated one the executor advances a ``VirtualClock`` by each step's
modelled duration, and sleeping jumps the clock, so a run takes as long as its host work and its figures
depend only on the inputs.
"""

from __future__ import annotations

import time


class WallClock:
    virtual = False

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock:
    virtual = True

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    def advance_to(self, t: float) -> None:
        """Move to ``t`` if it is later (time never runs backwards)."""
        if t > self._now:
            self._now = t
