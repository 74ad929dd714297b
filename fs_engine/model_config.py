"""A checkpoint's architecture, read from its ``config.json`` without transformers or torch.

The frontend needs these facts (layers, KV heads, head size, context length, eos) to size the KV cache and
check prompts; the workers need them to build the model. Both ``rope_theta`` (transformers 4) and
``rope_parameters`` (transformers 5) spellings are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architectures string in config.json -> our model family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    architecture: str  # as in config.json, e.g. "Qwen3ForCausalLM"
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None
    sliding_window: int | None = None  # attention equals full attention only for contexts up to this

    @property
    def max_context(self) -> int:
        """Longest context this implementation serves exactly (full attention, no sliding window)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_model_arch(raw: dict[str, Any]) -> ModelArch:
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    return ModelArch(
        architecture=arch,
        family=family,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        eos_token_ids=_as_tuple(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
    )


def load_model_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir)
    config_path = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory; pass a Hugging Face checkpoint directory")
    if not config_path.is_file():
        raise ValueError(f"{str(path)!r} has no config.json; pass a Hugging Face checkpoint directory")
    raw = json.loads(config_path.read_text())
    arch = parse_model_arch(raw)
    # generation_config.json often lists more stop ids than config.json (e.g. <|im_end|> and <|endoftext|>)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _as_tuple(json.loads(gen_path.read_text()).get("eos_token_id"))
        if gen_eos:
            merged = tuple(dict.fromkeys(arch.eos_token_ids + gen_eos))
            arch = ModelArch(**{**arch.__dict__, "eos_token_ids": merged})
    return arch
