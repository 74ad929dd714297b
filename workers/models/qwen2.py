"""Qwen2 / Qwen2.5: the Llama decoder with biased q/k/v projections (and, in small sizes, tied embeddings).

Both differences are read from the checkpoint's config (``ModelArch.attention_bias``,
``ModelArch.tie_word_embeddings``), so the Llama code serves it unchanged.
"""

from __future__ import annotations

from workers.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
