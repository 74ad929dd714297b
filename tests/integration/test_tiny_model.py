"""The generated tiny checkpoints must behave like real HF checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fs_engine.tiny_model import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    TINY_ARCHS,
    default_model_path,
    make_tiny_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
UNICODE_TEXT = "Héllo, wörld! 🚀 你好，世界 — naïve café\ttabs\nnew lines  and  spaces ∑x² ≠ 0"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, seed=0) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def loaded(built):
    models = {}
    for arch, path in built.items():
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        models[arch] = (model.eval(), info)
    return models


@pytest.fixture(scope="module")
def tokenizers_(built):
    return {arch: transformers.AutoTokenizer.from_pretrained(path) for arch, path in built.items()}


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loads_without_missing_or_unexpected_keys(arch, built, loaded):
    model, info = loaded[arch]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.model_type == arch
    assert (built[arch] / "model.safetensors").is_file()


def test_arch_specifics(loaded):
    llama, qwen2, qwen3 = (loaded[a][0] for a in ("llama", "qwen2", "qwen3"))
    for model in (llama, qwen2, qwen3):
        cfg = model.config
        assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
        assert cfg.vocab_size % 64 == 0
        assert model.dtype == torch.float32
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    assert llama.config.rope_parameters["original_max_position_embeddings"] == 256
    assert not llama.config.tie_word_embeddings
    assert qwen2.config.tie_word_embeddings
    assert qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen3.config.head_dim == 32
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (32,)
    assert qwen3.config.rope_parameters["rope_theta"] == 1000000.0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tokenizer_round_trips_unicode_and_bos(arch, tokenizers_):
    tok = tokenizers_[arch]
    ids = tok(UNICODE_TEXT).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == UNICODE_TEXT
    assert len(tok) <= transformers.AutoConfig.from_pretrained(tok.name_or_path).vocab_size
    if arch == "llama":
        assert tok.bos_token == "<|begin_of_text|>"
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None
        assert tok.decode(ids[:1]) == UNICODE_TEXT[:1]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chat_template_is_chatml(arch, tokenizers_):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tokenizers_[arch].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eos_is_im_end_everywhere(arch, built, loaded, tokenizers_):
    tok = tokenizers_[arch]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    model = loaded[arch][0]
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    gen_cfg = json.loads((built[arch] / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == im_end


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generation_is_not_degenerate(arch, loaded, tokenizers_):
    model, tok = loaded[arch][0], tokenizers_[arch]
    prompt = tok("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    new_tokens = out[0, prompt.input_ids.shape[1] :].tolist()
    assert len(set(new_tokens)) > 1, new_tokens


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_gives_identical_bytes(arch, built, tmp_path):
    again = make_tiny_model(arch, tmp_path / arch, seed=0)
    assert _file_bytes(again) == _file_bytes(built[arch])


def test_different_seed_gives_different_weights(built, tmp_path):
    from safetensors.torch import load_file

    other = make_tiny_model("qwen3", tmp_path / "seed1", seed=1, with_tokenizer=False)
    assert (other / "config.json").read_bytes() == (built["qwen3"] / "config.json").read_bytes()
    assert not (other / "tokenizer.json").exists()
    a = load_file(built["qwen3"] / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sharded_checkpoint_matches_single_file(arch, loaded, tmp_path):
    sharded = make_tiny_model(arch, tmp_path / arch, seed=0, num_shards=3)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded[arch][0](ids).logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'"),
        ({"arch": "qwen3", "preset": "huge"}, "unknown preset 'huge'"),
        ({"arch": "qwen3", "num_shards": 0}, "num_shards"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match, tmp_path):
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError, match=match):
        make_tiny_model(arch, tmp_path / "bad", **kwargs)


def test_default_model_path_builds_once_then_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FS_ENGINE_CACHE", str(tmp_path))
    path = default_model_path()
    assert path == tmp_path / "models" / DEFAULT_MODEL_NAME
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["head_dim"]) == ("qwen3", 256, 64)
    assert (path / "tokenizer.json").is_file()
    # Only the final directory (and the lock file) may remain: no temp dirs.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", DEFAULT_MODEL_NAME]
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    start = time.perf_counter()
    assert default_model_path() == path
    assert time.perf_counter() - start < 0.5
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_warm_default_model_path_does_not_import_torch(tmp_path):
    (tmp_path / "models" / DEFAULT_MODEL_NAME).mkdir(parents=True)
    (tmp_path / "models" / DEFAULT_MODEL_NAME / "config.json").write_text("{}")
    # torch may already be imported by the package itself; the call must not add it.
    code = (
        "import sys\n"
        "from fs_engine.tiny_model import default_model_path\n"
        "before = 'torch' in sys.modules\n"
        "print(default_model_path())\n"
        "assert before or 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "FS_ENGINE_CACHE": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "models" / DEFAULT_MODEL_NAME)


def test_cli_writes_model(tmp_path, capsys):
    # Loaded in-process: a subprocess would pay ~10 s of torch/transformers
    # imports on a small CI machine for no extra coverage of the generator.
    script = REPO_ROOT / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out_dir = tmp_path / "cli"
    assert cli.main(["--arch", "qwen2", "--out", str(out_dir), "--shards", "2", "--no-tokenizer"]) == 0
    stdout = capsys.readouterr().out
    assert str(out_dir) in stdout
    assert "params=139,840" in stdout and "vocab=1024" in stdout
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert not (out_dir / "tokenizer.json").exists()
