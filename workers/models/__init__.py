"""Model implementations, looked up by the family that ``fs_engine.model_config`` derives from config.json."""

from __future__ import annotations

from torch import nn

from fs_engine.model_config import ModelArch
from workers.compilation import ForwardContext, forward_context
from workers.models.llama import LlamaForCausalLM
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM
from workers.parallel import SINGLE, TPContext

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def build_model(arch: ModelArch, tp: TPContext = SINGLE) -> nn.Module:
    return MODEL_CLASSES[arch.family](arch, tp)


__all__ = ["MODEL_CLASSES", "ForwardContext", "build_model", "forward_context"]
