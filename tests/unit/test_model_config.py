"""Reading a checkpoint's architecture from config.json, in both transformers 4 and 5 spellings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fs_engine.model_config import RopeConfig, load_model_arch, parse_model_arch


def llama_raw(**overrides):
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "rope_theta": 10000.0,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None or k in overrides}


LLAMA3_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
}


def test_llama_shape_facts():
    arch = parse_model_arch(llama_raw())
    assert (arch.family, arch.architecture) == ("llama", "LlamaForCausalLM")
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (1000, 256, 512)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (3, 8, 2, 32)
    assert arch.max_context == 4096
    assert arch.eos_token_ids == (2,)
    assert arch.bos_token_id == 1
    assert not arch.attention_bias and not arch.qk_norm
    assert arch.rope == RopeConfig(theta=10000.0, original_max_position_embeddings=4096)
    # K and V, 3 layers, 2 KV heads of 32 dims, 2 bytes each


def test_missing_kv_heads_means_multi_head_attention():
    raw = llama_raw()
    del raw["num_key_value_heads"]
    assert parse_model_arch(raw).num_kv_heads == 8


def test_explicit_head_dim_wins_over_hidden_size_over_heads():
    assert parse_model_arch(llama_raw(head_dim=64)).head_dim == 64
    assert parse_model_arch(llama_raw(head_dim=None)).head_dim == 32


@pytest.mark.parametrize(
    ("v4_scaling", "v5_params"),
    [
        ({"type": "llama3", **LLAMA3_SCALING}, {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}),
        ({"rope_type": "llama3", **LLAMA3_SCALING}, {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}),
        ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}),
        (None, {"rope_type": "default", "rope_theta": 500000.0}),
    ],
)
def test_transformers_4_and_5_rope_spellings_agree(v4_scaling, v5_params):
    v4 = llama_raw(rope_theta=500000.0, rope_scaling=v4_scaling)
    v5 = llama_raw(rope_parameters=v5_params)
    del v5["rope_theta"]
    rope4, rope5 = parse_model_arch(v4).rope, parse_model_arch(v5).rope
    assert rope4 == rope5
    assert rope4.theta == 500000.0
    assert rope4.rope_type == v5_params["rope_type"]


def test_llama3_rope_parameters_are_read():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 1024}
    rope = parse_model_arch(llama_raw(rope_theta=500000.0, rope_scaling=scaling)).rope
    assert rope == RopeConfig(500000.0, "llama3", 32.0, 2.0, 8.0, 1024)


def test_rope_theta_defaults_to_10000():
    raw = llama_raw()
    del raw["rope_theta"]
    assert parse_model_arch(raw).rope.theta == 10000.0


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_is_rejected_by_name(rope_type):
    with pytest.raises(ValueError, match=f"rope type '{rope_type}' is not supported.*llama3"):
        parse_model_arch(llama_raw(rope_scaling={"rope_type": rope_type, "factor": 2.0}))
    with pytest.raises(ValueError, match=rope_type):
        parse_model_arch(llama_raw(rope_parameters={"rope_type": rope_type, "rope_theta": 1.0, "factor": 2.0}))


def test_qwen2_implies_attention_bias():
    arch = parse_model_arch(llama_raw(architectures=["Qwen2ForCausalLM"]))
    assert arch.family == "qwen2"
    assert arch.attention_bias and not arch.qk_norm


def test_llama_attention_bias_follows_config():
    assert parse_model_arch(llama_raw(attention_bias=True)).attention_bias


def test_qwen3_implies_qk_norm_and_keeps_its_head_dim():
    arch = parse_model_arch(llama_raw(architectures=["Qwen3ForCausalLM"], head_dim=128))
    assert arch.family == "qwen3"
    assert arch.qk_norm and not arch.attention_bias
    assert arch.head_dim == 128  # Qwen3 head_dim is not hidden_size // num_heads


def test_first_supported_architecture_is_used():
    arch = parse_model_arch(llama_raw(architectures=["SomethingElse", "MistralForCausalLM"]))
    assert (arch.architecture, arch.family) == ("MistralForCausalLM", "llama")


@pytest.mark.parametrize("archs", [["GPT2LMHeadModel"], [], None])
def test_unsupported_architecture_is_rejected_with_the_supported_list(archs):
    raw = llama_raw(architectures=archs, model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        parse_model_arch(raw)


def test_eos_list_and_dtype_spellings():
    arch = parse_model_arch(llama_raw(eos_token_id=[128001, 128009], torch_dtype="bfloat16"))
    assert arch.eos_token_ids == (128001, 128009)
    assert arch.torch_dtype == "bfloat16"
    assert parse_model_arch(llama_raw(dtype="float16")).torch_dtype == "float16"
    assert parse_model_arch(llama_raw(eos_token_id=None)).eos_token_ids == ()


def test_disabled_sliding_window_is_ignored():
    arch = parse_model_arch(
        llama_raw(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=1024,
                  max_position_embeddings=32768)
    )
    assert arch.sliding_window is None
    assert arch.max_context == 32768


def test_mistral_sliding_window_limits_the_served_context():
    arch = parse_model_arch(
        llama_raw(architectures=["MistralForCausalLM"], sliding_window=4096, max_position_embeddings=32768)
    )
    assert arch.sliding_window == 4096
    assert arch.max_context == 4096


def test_null_sliding_window_means_full_context():
    arch = parse_model_arch(llama_raw(architectures=["MistralForCausalLM"], sliding_window=None))
    assert arch.max_context == 4096


# ---- load_model_arch ---------------------------------------------------------------------------------------


def write_checkpoint(path: Path, raw: dict, generation: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_load_merges_eos_ids_from_generation_config(tmp_path):
    model = write_checkpoint(tmp_path / "m", llama_raw(eos_token_id=7), {"eos_token_id": [5, 7, 9]})
    arch = load_model_arch(model)
    assert arch.eos_token_ids == (7, 5, 9)  # config.json's first, no duplicates
    assert arch.num_layers == 3  # the rest is unchanged


def test_load_without_generation_eos_keeps_config_eos(tmp_path):
    model = write_checkpoint(tmp_path / "m", llama_raw(eos_token_id=7), {"bos_token_id": 1})
    assert load_model_arch(model).eos_token_ids == (7,)


def test_load_takes_eos_from_generation_config_alone(tmp_path):
    model = write_checkpoint(tmp_path / "m", llama_raw(eos_token_id=None), {"eos_token_id": 3})
    assert load_model_arch(model).eos_token_ids == (3,)


def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_model_arch(tmp_path / "nope")


def test_load_directory_without_config_raises(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model_arch(tmp_path)


def test_load_reads_a_generated_tiny_checkpoint(tiny_model_dirs):
    arch = load_model_arch(tiny_model_dirs["qwen3"])
    assert arch.family == "qwen3"
    assert arch.head_dim == 32 and arch.num_heads == 4 and arch.num_kv_heads == 2
    assert arch.sliding_window is None
    llama = load_model_arch(tiny_model_dirs["llama"])
    assert llama.rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 256)
