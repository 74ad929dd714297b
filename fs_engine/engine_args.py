"""Engine arguments as command-line flags, generated from the config dataclasses (``EngineConfig``): every
engine argument of ``LLM(**kwargs)`` is a flag with the same name in kebab case, and no other. Shared by
``fs-engine`` and ``fs-engine bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fs_engine.config import AREAS


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(annotation: str) -> Any:
    if annotation.startswith("bool"):
        return _parse_bool
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine arguments")
    for cls in AREAS.values():
        for f in dataclasses.fields(cls):
            if f.name == "model":
                continue  # its own flag: --model, default = the embedded tiny model
            flag = "--" + f.name.replace("_", "-")
            group.add_argument(flag, dest=f.name, type=_flag_type(str(f.type)), default=argparse.SUPPRESS,
                               help=f"{f.metadata.get('help', '')} (default: {f.default})")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for cls in AREAS.values() for f in dataclasses.fields(cls)} - {"model"}
    return {k: v for k, v in vars(args).items() if k in names}
