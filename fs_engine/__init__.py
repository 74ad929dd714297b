"""fs-engine: a fairness-aware LLM serving engine with cheap preemption (FastSwitch design).

The public names load on first use (PEP 562), so importing a submodule (as the worker processes import
``fs_engine.kv.layout``) does not pull in the engine, its executors and ZeroMQ.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "fs_engine.llm",
    "LLMEngine": "fs_engine.engine.llm_engine",
    "RequestOutput": "fs_engine.request",
    "SamplingParams": "fs_engine.sampling_params",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fs_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
