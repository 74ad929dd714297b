"""Qwen3: the Llama decoder plus a per-head RMSNorm on q and k before the rotary embedding."""

from __future__ import annotations

import torch

from fs_engine.model_config import ModelArch
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from workers.parallel import TPContext


class Qwen3Attention(LlamaAttention):
    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, tp: TPContext) -> None:
        super().__init__(arch, layer_idx, rotary, tp)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
