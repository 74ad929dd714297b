"""A config-only checkpoint with a real model's shapes, for benchmarks with ``load_format=dummy``.

No weights are written (an 8B checkpoint of random numbers is 16 GB of disk for nothing): the engine builds
the model from ``config.json`` and fills it with seeded random weights on the device. Token-id prompts only
(there is no tokenizer).

    python tools/make_shapes_config.py --shape llama3-8b --out /tmp/llama3-8b
    fs-engine bench ablate --model /tmp/llama3-8b --load-format dummy --out bench-out/gpu ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# public hyperparameters of the released models (their config.json files)
SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
        "torch_dtype": "bfloat16",
    },
    # not a released model: Qwen3's layer at GPT-2-small scale (about 100M parameters, embeddings tied), for
    # CPU benchmarks of a model larger than the tiny test ones
    "qwen3-100m": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 768, "head_dim": 64,
        "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
        "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
}


def write_config(shape: str, out: str | Path) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(f"wrote {write_config(args.shape, args.out) / 'config.json'} (use --load-format dummy)")


if __name__ == "__main__":
    main()
