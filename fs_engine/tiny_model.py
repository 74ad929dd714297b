"""Tiny Hugging Face checkpoints of real architectures, generated offline.

The engine and its tests need real checkpoints (config.json, safetensors,
tokenizer) without network access.  This module builds them from scratch:
a transformers config of a real architecture, random weights drawn from a
seeded generator, and a byte-level BPE tokenizer trained on the embedded
corpus in :mod:`fs_engine.tiny_corpus`.  Output is byte-for-byte
deterministic for a given (arch, seed, preset).

torch / transformers / tokenizers are imported inside functions so that
importing this module (e.g. for :func:`default_model_path` on a warm cache)
stays cheap.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_ARCHS = ("llama", "qwen2", "qwen3")

DEFAULT_MODEL_NAME = "tiny-qwen3-default-v1"

TOKENIZER_VOCAB_SIZE = 1000
# Used for the model's vocab when no tokenizer is requested; equals the padded
# size of the trained tokenizer so both variants share identical weights.
NO_TOKENIZER_VOCAB_SIZE = 1024

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    # Qwen3 gets an explicit head_dim that differs from hidden/heads, so the
    # engine cannot get away with assuming head_dim == hidden_size // heads.
    qwen3_head_dim: int


PRESETS = {
    "test": Preset(64, 128, 2, 4, 2, 2048, qwen3_head_dim=32),
    "default": Preset(256, 512, 4, 8, 2, 4096, qwen3_head_dim=64),
}


def _check_args(arch: str, preset: str, num_shards: int) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")


def _special_tokens(arch: str) -> list[str]:
    specials = [ENDOFTEXT, IM_START, IM_END]
    if arch == "llama":
        specials.append(BEGIN_OF_TEXT)
    return specials


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(arch: str) -> str:
    """Train the BPE tokenizer once per process; training is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from fs_engine.tiny_corpus import TINY_CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=_special_tokens(arch),
        # The full byte alphabet makes every byte sequence encodable, which is
        # what lets arbitrary unicode round-trip through encode/decode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    if arch == "llama":
        bos_id = tok.token_to_id(BEGIN_OF_TEXT)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A",
            pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
            special_tokens=[(BEGIN_OF_TEXT, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def _train_tokenizer(arch: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(arch))


def _save_tokenizer(tok, arch: str, out_dir: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    is_llama = arch == "llama"
    # Passing add_bos_token at all makes transformers replace the backend
    # post-processor with its own template, so only llama (which wants the bos
    # template) passes it; qwen keeps the plain ByteLevel post-processor.
    bos_kwargs = {"add_bos_token": True} if is_llama else {}
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BEGIN_OF_TEXT if is_llama else None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        **bos_kwargs,
        # Cleanup would rewrite spaces around punctuation and break round-trips.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _build_config(arch: str, preset: Preset, vocab_size: int, ids: dict):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6,
        # Large init scale so greedy decoding from random weights is not stuck
        # on one token; also recorded for anyone re-initialising the model.
        initializer_range=0.2,
        dtype="float32",
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Far below max_position_embeddings so the llama3 frequency
            # rescaling actually changes some frequencies.
            "original_max_position_embeddings": 256,
        }
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=rope)
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_parameters=rope)
    return transformers.Qwen3Config(
        **common, head_dim=preset.qwen3_head_dim, tie_word_embeddings=False, rope_parameters=rope
    )


def _reinit_parameters(model, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in a fixed order.

    transformers' own init draws from the global RNG and may change between
    versions; redrawing everything here pins the weights to (seed, shapes).
    named_parameters() skips tied duplicates, so tied lm_heads follow the
    embedding automatically.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def _build_model(arch: str, preset: Preset, vocab_size: int, ids: dict, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _build_config(arch, preset, vocab_size, ids)
    # from_config runs transformers' default init on the global RNG; fork it so
    # callers' torch random state is left untouched.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_parameters(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    return model.eval()


def _shard_cuts(sizes: list[int], num_shards: int) -> list[int]:
    """Indices where each shard after the first starts, balancing bytes.

    Every shard gets at least one tensor, so the result always has exactly
    num_shards shards (unlike a max_shard_size limit, which only bounds size).
    """
    if num_shards > len(sizes):
        raise ValueError(f"cannot split {len(sizes)} tensors into {num_shards} shards")
    offsets = list(itertools.accumulate(sizes, initial=0))
    total, cuts, prev = offsets[-1], [], 0
    for j in range(1, num_shards):
        target = total * j / num_shards
        lo, hi = prev + 1, len(sizes) - (num_shards - j)
        best = min(range(lo, hi + 1), key=lambda i: (abs(offsets[i] - target), i))
        cuts.append(best)
        prev = best
    return cuts


def _reshard(out_dir: Path, key_order: list[str], num_shards: int) -> None:
    """Split the single model.safetensors written by HF into num_shards files."""
    from safetensors.torch import load_file, save_file

    single = out_dir / "model.safetensors"
    tensors = load_file(str(single))
    # Model order keeps each layer's tensors together; anything HF saved that
    # the state dict does not list (none today) goes last rather than missing.
    keys = [k for k in key_order if k in tensors]
    keys += sorted(set(tensors) - set(keys))
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    bounds = [0, *_shard_cuts(sizes, num_shards), len(keys)]
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {k: tensors[k] for k in keys[bounds[i] : bounds[i + 1]]}
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def _remove_stale_weights(out_dir: Path) -> None:
    # A previous run with another shard count would leave a second, mixed
    # checkpoint behind that loaders could pick up instead of ours.
    for path in out_dir.glob("model*.safetensors*"):
        path.unlink()


def make_tiny_model(
    arch: str,
    out_dir,
    *,
    seed: int = 0,
    preset: str = "test",
    num_shards: int = 1,
    with_tokenizer: bool = True,
) -> Path:
    """Write a tiny random-weight HF checkpoint of ``arch`` into ``out_dir``."""
    _check_args(arch, preset, num_shards)
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_weights(out_dir)

    # The tokenizer is trained even when not saved: its special-token ids go
    # into config.json, keeping the weights identical with or without it.
    tok = _train_tokenizer(arch)
    ids = {
        "bos": tok.token_to_id(BEGIN_OF_TEXT) if arch == "llama" else None,
        "eos": tok.token_to_id(IM_END),
        "pad": tok.token_to_id(ENDOFTEXT),
    }
    if with_tokenizer:
        vocab_size = _round_up(tok.get_vocab_size(), 64)
    else:
        vocab_size = NO_TOKENIZER_VOCAB_SIZE

    model = _build_model(arch, spec, vocab_size, ids, seed)
    model.save_pretrained(str(out_dir))
    if num_shards > 1:
        _reshard(out_dir, list(model.state_dict()), num_shards)
    if with_tokenizer:
        _save_tokenizer(tok, arch, out_dir, spec.max_position_embeddings)
    _fix_weight_file_modes(out_dir)
    return out_dir


def _fix_weight_file_modes(out_dir: Path) -> None:
    # safetensors writes its files 0600 regardless of umask; give them the
    # mode config.json got (i.e. honour the umask) so other users and
    # containers sharing the checkpoint can read the weights.
    mode = (out_dir / "config.json").stat().st_mode & 0o777
    for path in out_dir.glob("model*.safetensors"):
        path.chmod(mode)


def cache_root() -> Path:
    if os.environ.get("FS_ENGINE_CACHE"):
        return Path(os.environ["FS_ENGINE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fs_engine"
    return Path.home() / ".cache" / "fs_engine"


def default_model_path() -> Path:
    """Path of the engine's embedded default model, generating it on first use.

    The fast path (already built) only touches the filesystem.  Building
    happens in a temporary sibling directory that is renamed into place, so
    readers never see a half-written model; the flock serialises concurrent
    builders so only one of them does the work.
    """
    models_dir = cache_root() / "models"
    final = models_dir / DEFAULT_MODEL_NAME
    if (final / "config.json").is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "config.json").is_file():
                return final
            _build_default_into(final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _build_default_into(final: Path) -> None:
    if final.exists():
        # Without config.json this cannot be a completed build (those arrive
        # by atomic rename), so it is debris from something else.
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=final.parent))
    try:
        make_tiny_model("qwen3", tmp, seed=0, preset="default")
        # mkdtemp creates 0700; match the umask-derived mode of the models dir
        # so a cache shared between users stays readable.
        tmp.chmod(final.parent.stat().st_mode & 0o777)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
