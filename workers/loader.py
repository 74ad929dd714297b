"""Reading Hugging Face safetensors checkpoints (one file or shards listed in an index json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fs_engine.model_config import ModelArch
from workers.checkpoint_slice import CheckpointSlice
from workers.models import build_model
from workers.parallel import SINGLE, TPContext


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(model_dir)!r} has no *.safetensors weights; only safetensors checkpoints are supported")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint shards listed in the index are missing: {missing}")
    return files


def iter_weights(model_dir: str | Path, sliced: bool = False) -> Iterator[tuple[str, torch.Tensor | CheckpointSlice]]:
    """Yield (name, tensor) one at a time so a large checkpoint is never held in memory twice; ``sliced``
    yields ``CheckpointSlice``s, read only as far as the weight loaders narrow them."""
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, CheckpointSlice(f.get_slice(name)) if sliced else f.get_tensor(name)


DUMMY_STD = 0.02  # the usual initializer_range of real checkpoints: activations stay finite at any depth


def load_model(
    model_dir: str | Path, arch: ModelArch, dtype: torch.dtype, device: torch.device, tp: TPContext = SINGLE,
    load_format: str = "auto", seed: int = 0,
) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(arch, tp)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed + tp.rank)
    else:
        model.load_weights(iter_weights(model_dir, sliced=tp.size > 1))
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights in place, on the parameters' own device (no host round trip for a big model):
    matrices ~ N(0, DUMMY_STD), norm weights 1, biases 0. Speed and memory are those of the real model;
    the tokens are meaningless."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, DUMMY_STD, generator=generator)
        elif "norm" in name:
            param.fill_(1.0)
        else:
            param.zero_()
