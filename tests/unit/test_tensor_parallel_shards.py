"""Sharding a model without processes: each rank's slices of a checkpoint, read lazily, and the start-up
checks of a sharding that cannot work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fs_engine.engine.llm_engine import check_tensor_parallel
from fs_engine.model_config import load_model_arch
from workers.checkpoint_slice import CheckpointSlice, materialize
from workers.loader import iter_weights
from workers.models import build_model
from workers.parallel import TPContext


def test_a_checkpoint_slice_reads_only_what_is_narrowed(tiny_model_dirs):
    full = dict(iter_weights(tiny_model_dirs["qwen2"]))
    for name, lazy in iter_weights(tiny_model_dirs["qwen2"], sliced=True):
        assert isinstance(lazy, CheckpointSlice) and lazy.shape == full[name].shape
        for dim in range(len(lazy.shape)):
            n = lazy.shape[dim]
            if n >= 2:
                assert torch.equal(lazy.narrow(dim, n // 2, n - n // 2), full[name].narrow(dim, n // 2, n - n // 2))
        assert torch.equal(materialize(lazy), full[name])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("size", [2, 4])
def test_the_ranks_shards_put_together_are_the_single_rank_weights(tiny_model_dirs, arch, size):
    """Rank r's column-parallel rows and row-parallel columns, stacked in rank order, are the full matrices
    (KV heads, fewer than the ranks at 4, are replicated: each replica equals its head)."""
    model_arch = load_model_arch(tiny_model_dirs[arch])
    full = build_model(model_arch)
    full.load_weights(iter_weights(tiny_model_dirs[arch]))
    ranks = []
    for rank in range(size):
        model = build_model(model_arch, TPContext(rank, size))
        model.load_weights(iter_weights(tiny_model_dirs[arch], sliced=True))
        ranks.append(dict(model.named_parameters()))
    whole = dict(full.named_parameters())
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(torch.cat([r[down] for r in ranks], dim=1), whole[down])
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"
    inter = model_arch.intermediate_size // size
    assert torch.equal(torch.cat([r[gate_up][:inter] for r in ranks]), whole[gate_up][: model_arch.intermediate_size])
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    q_rows = model_arch.num_heads * model_arch.head_dim // size
    assert torch.equal(torch.cat([r[qkv][:q_rows] for r in ranks]), whole[qkv][: size * q_rows])
    kv_rows = max(1, model_arch.num_kv_heads // size) * model_arch.head_dim
    replicas = max(1, size // model_arch.num_kv_heads)
    k_full = whole[qkv][size * q_rows : size * q_rows + model_arch.num_kv_heads * model_arch.head_dim]
    for rank, params in enumerate(ranks):
        head = rank // replicas
        assert torch.equal(params[qkv][q_rows : q_rows + kv_rows], k_full[head * kv_rows : (head + 1) * kv_rows])
    norm = "model.norm.weight"
    assert all(torch.equal(r[norm], whole[norm]) for r in ranks)


@pytest.mark.parametrize("change,tp,match", [
    ({"num_heads": 6}, 4, "num_attention_heads=6"),
    ({"intermediate_size": 130}, 4, "intermediate_size=130"),
    ({"num_kv_heads": 6, "num_heads": 12}, 4, "num_key_value_heads=6"),
    ({"num_kv_heads": 3, "num_heads": 12}, 4, "not a multiple of num_key_value_heads=3"),
])
def test_a_sharding_that_cannot_work_names_what_to_change(tiny_model_dirs, change, tp, match):
    arch = dataclasses.replace(load_model_arch(tiny_model_dirs["qwen3"]), **change)
    with pytest.raises(ValueError, match=match):
        check_tensor_parallel(arch, tp, "cpu")


def test_more_ranks_than_gpus_is_refused(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 ranks on this machine need 4 GPUs, it has 2"):
        check_tensor_parallel(load_model_arch(tiny_model_dirs["qwen3"]), 4, "auto")
