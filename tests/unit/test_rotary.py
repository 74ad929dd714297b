"""Rotary embeddings must match transformers exactly: a frequency off by one ulp shifts every long-context logit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from fs_engine.model_config import parse_model_arch  # noqa: E402
from workers.layers.rotary import RotaryEmbedding, inv_frequencies  # noqa: E402

HEAD_DIM = 64
MAX_POS = 4096

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default_big_theta": {"rope_type": "default", "rope_theta": 1000000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    },
    "llama3_other_band": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
        "high_freq_factor": 8.0, "original_max_position_embeddings": 1024,
    },
}


def hf_config(params: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
        intermediate_size=64, num_hidden_layers=1, vocab_size=32, max_position_embeddings=MAX_POS,
        rope_parameters=dict(params),
    )


def our_rope(config: transformers.LlamaConfig):
    # read the rope settings the way the engine does: from the config.json transformers writes
    return parse_model_arch({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}).rope


def hf_inv_freq(config: transformers.LlamaConfig) -> torch.Tensor:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    return ROPE_INIT_FUNCTIONS[rope_type](config)[0]


@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
def test_inv_frequencies_equal_transformers(name):
    config = hf_config(ROPE_PARAMETERS[name])
    ours = inv_frequencies(HEAD_DIM, our_rope(config))
    theirs = hf_inv_freq(config)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == (HEAD_DIM // 2,)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_llama3_scaling_changes_low_frequencies_only():
    # guards the test above against comparing two unscaled tables: the band matters
    config = hf_config(ROPE_PARAMETERS["llama3"])
    scaled = inv_frequencies(HEAD_DIM, our_rope(config))
    plain = inv_frequencies(HEAD_DIM, our_rope(hf_config({"rope_type": "default", "rope_theta": 500000.0})))
    assert scaled[0] == plain[0]  # the highest frequency is kept
    assert torch.isclose(scaled[-1], plain[-1] / 8.0)  # the lowest is slowed by `factor`
    assert (scaled <= plain).all() and (scaled < plain).any()


@pytest.mark.parametrize("name", ["default", "linear", "llama3"])
def test_rotary_embedding_matches_apply_rotary_pos_emb(name):
    config = hf_config(ROPE_PARAMETERS[name])
    gen = torch.Generator().manual_seed(0)
    num_tokens, heads, kv_heads = 37, 4, 2
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=gen)
    q = torch.randn(num_tokens, heads, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, kv_heads, HEAD_DIM, generator=gen)

    ours_q, ours_k = RotaryEmbedding(HEAD_DIM, MAX_POS, our_rope(config))(positions, q, k)

    hf_rope = LlamaRotaryEmbedding(config)
    cos, sin = hf_rope(q, positions[None, :])  # [1, tokens, head_dim]
    # HF layout: [batch, heads, tokens, head_dim]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(ours_q, ref_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_k, ref_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_position_zero_is_identity_and_rotation_preserves_norm():
    config = hf_config(ROPE_PARAMETERS["llama3"])
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, our_rope(config))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, HEAD_DIM, generator=gen)
    k = torch.randn(3, 2, HEAD_DIM, generator=gen)
    positions = torch.tensor([0, 100, 4000])
    rq, rk = rope(positions, q, k)
    torch.testing.assert_close(rq[0], q[0])
    torch.testing.assert_close(rk[0], k[0])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(rq[2], q[2])


def test_attention_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, our_rope(hf_config(ROPE_PARAMETERS["default"])))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, HEAD_DIM, generator=gen).expand(2, 1, HEAD_DIM)
    k = torch.randn(1, 1, HEAD_DIM, generator=gen).expand(2, 1, HEAD_DIM)
    rq_a, _ = rope(torch.tensor([10, 10]), q, k)
    _, rk_a = rope(torch.tensor([3, 3]), q, k)
    rq_b, _ = rope(torch.tensor([510, 510]), q, k)
    _, rk_b = rope(torch.tensor([503, 503]), q, k)
    score_a = (rq_a[0] * rk_a[0]).sum()
    score_b = (rq_b[0] * rk_b[0]).sum()
    torch.testing.assert_close(score_a, score_b, rtol=1e-4, atol=1e-4)
