"""Wire layer shared by the frontend and the worker processes: message types and (later) codecs and channels.

It imports nothing else from this project, so every process can depend on it.
"""

from ipc.messages import (
    PROTOCOL_VERSION,
    NewRequest,
    SamplingSpec,
    ScheduledChunk,
    StepPlan,
    StepResult,
    SwapCommand,
    SwapDone,
    SwapRun,
)

__all__ = [
    "PROTOCOL_VERSION",
    "NewRequest",
    "SamplingSpec",
    "ScheduledChunk",
    "StepPlan",
    "StepResult",
    "SwapCommand",
    "SwapDone",
    "SwapRun",
]
