"""When the worker's device work has completed: the one fact the engine's copy ordering rests on.

On a GPU, kernels run asynchronously on the compute stream; a copy of KV blocks on another stream (a copy
thread here, or the swap process) is safe only once the kernels that wrote or read those blocks are done.
The worker therefore waits for its stream before it returns a step's result (``ModelRunner.execute``), and
the frontend issues copies only after it holds that result. On a CPU every op completes before it returns,
so both calls are free. Tests substitute a recording fake to check the order on machines without a GPU.
"""

from __future__ import annotations

import torch


class DeviceStream:
    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def launched(self, work: object) -> None:
        """Device work (a step's forward) was enqueued; the stream itself keeps track on a GPU."""

    def synchronize(self) -> None:
        """Block until everything enqueued so far has completed."""
        if self._stream is not None:
            self._stream.synchronize()

    def idle(self) -> bool:
        """True if nothing enqueued is still running (a non-blocking query)."""
        return self._stream is None or self._stream.query()
