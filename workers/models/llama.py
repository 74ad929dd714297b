"""Llama-family decoder (Llama 2/3, Mistral) and the shared machinery Qwen2 and Qwen3 build on.

Parameter names follow the Hugging Face checkpoints except that q/k/v and gate/up are stored stacked
(``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fs_engine.model_config import ModelArch
from workers.compilation import attention
from workers.layers.activation import SiluAndMul
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.checkpoint_slice import materialize
from workers.parallel import SINGLE, TPContext


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, tp: TPContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, bias=arch.attention_bias, tp=tp
        )
        self.num_heads = self.qkv_proj.num_heads  # on this rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False, tp=tp)
        self.rotary = rotary

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k  # Qwen3 overrides with per-head RMSNorm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        # split by heads after one view of the contiguous projection: q, k and v are views whose strides do
        # not depend on the number of tokens, so a compiled forward needs no guard on it (one graph serves a
        # one-token decode step and a long prefill alike)
        qkv = qkv.view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary(positions, q, k)
        out = attention(q, k, v, self.layer_idx)  # the forward context's backend; one op when compiled
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [arch.intermediate_size, arch.intermediate_size], tp=tp
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, arch: ModelArch, layer_idx: int, rotary: RotaryEmbedding, tp: TPContext) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(arch, layer_idx, rotary, tp)
        self.mlp = LlamaMLP(arch, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # unfused residual adds, in the reference's order, so float32 output matches it exactly
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, layer_cls: type[LlamaDecoderLayer], tp: TPContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        # one rotary table shared by all layers (it is a buffer, not a weight)
        rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope)
        self.layers = nn.ModuleList(layer_cls(arch, i, rotary, tp) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(token_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


# checkpoint name fragment -> (our stacked parameter fragment, shard id)
STACKED_PARAMS = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, arch: ModelArch, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, self.layer_cls, tp)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every token; attention reads the forward context (``workers.compilation``)."""
        return self.model(token_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into place; raise if the checkpoint misses or adds parameters."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            target, shard = name, None
            for ckpt_part, our_part, shard_id in STACKED_PARAMS:
                if ckpt_part in name:
                    target, shard = name.replace(ckpt_part, our_part), shard_id
                    break
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(materialize(tensor))
            else:
                loader(param, tensor, shard)
            loaded.add(target if shard is None else f"{target}#{shard}")
        self._check_complete(params, loaded, unexpected)

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str], unexpected: list[str]) -> None:
        expected = set()
        for name in params:
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            shards = [s for _, part, s in STACKED_PARAMS if part in name]
            expected.update(f"{name}#{s}" for s in shards) if shards else expected.add(name)
        missing = sorted(expected - loaded)
        if unexpected or missing:
            raise ValueError(
                f"checkpoint does not match {self.arch.architecture}: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
