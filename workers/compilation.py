"""The model's forward under ``torch.compile`` (Inductor), with attention as one opaque custom op.

What is compiled is everything between the attention calls: embeddings, RMSNorms, rotary embeddings, the
projections, SiLU-and-multiply and the residual adds, which Inductor fuses into a few kernels per layer.
Attention stays ours: the model calls ``fs_engine::attention(q, k, v, layer)``, a ``torch.library`` custom op
with a fake implementation, so Dynamo records it as one node (no graph break per layer) and never traces into
a backend. The op finds its backend (bound to the KV arena) and the step's metadata in the *forward context*
that the runner sets around each forward, as vLLM's attention op does: the metadata's host-side lists and
per-step tensors are then no graph inputs, so they cause neither guards nor recompilations. The op stores the
step's K/V into the arena in place; the arena is not a value in the graph (the schema declares no mutation),
and the ops stay in order because each layer's hidden states depend on the previous layer's attention output.

One compilation serves every step: the token dimension is marked dynamic, sizes are treated "oblivious" of
the 0/1 specialization (``backed_size_oblivious``), and the model avoids views whose strides depend on the
number of tokens (Q/K/V are split by heads from one view of the projection), so a one-token decode step and a
2,048-token prefill run the same compiled code. The runner compiles and warms up at start-up, before the KV arena is sized; Inductor's
FX-graph cache (on by default, in ``TORCHINDUCTOR_CACHE_DIR``) makes the next start fast. ``compilations``
counts Dynamo's calls into Inductor: it must not grow after warm-up.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fs_engine.config import COMPILE_MODES
from workers.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    """What every attention layer needs in one forward pass: the backend (bound to the KV arena) and the
    step's metadata."""

    attn: AttentionBackend
    meta: AttentionMetadata


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(attn: AttentionBackend, meta: AttentionMetadata) -> Iterator[ForwardContext]:
    """Make ``attn`` and ``meta`` the attention of the forward passes run inside (one thread runs the model)."""
    global _current
    previous, _current = _current, ForwardContext(attn, meta)
    try:
        yield _current
    finally:
        _current = previous


def current_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("the model ran outside a forward context: call it inside workers.compilation."
                           "forward_context(attn, meta)")
    return _current


@torch.library.custom_op("fs_engine::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """Store this layer's K/V for the step and attend (the forward context's backend and metadata)."""
    ctx = current_context()
    out = ctx.attn.forward(layer, q, k, v, ctx.meta)
    # a custom op's output may not alias its inputs (no backend returns a view of q today; this keeps it so)
    return out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out


@attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim]. Through the
    custom op while compiling; a direct call when eager (the op's dispatch would cost a few microseconds a layer
    for nothing)."""
    if torch.compiler.is_compiling():
        return torch.ops.fs_engine.attention(q, k, v, layer)
    ctx = current_context()
    return ctx.attn.forward(layer, q, k, v, ctx.meta)


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether ``compile=mode`` compiles on ``device``. ``auto``: on CUDA, where fusing the elementwise work
    between matmuls and attention saves launches and memory round trips; not on a CPU, where the benchmark
    (docs/BENCHMARKS.md, "Compiled forward") shows no gain worth the start-up."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _own_entry(model: torch.nn.Module) -> Callable:
    """``model(token_ids, positions)`` as a function with a code object of its own. Dynamo keeps compiled
    graphs per code object, guarded by the module they were traced for: with one shared entry point, every
    engine of a process (tests, notebooks) would add a guarded graph to one cache until its recompile limit
    failed the next, and the cache would keep every dead engine's model alive. Per engine, the cache is its own
    and goes with it."""

    def forward(token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(token_ids, positions)

    return types.FunctionType(forward.__code__.replace(), forward.__globals__, "forward", None, forward.__closure__)


class CompiledForward:
    """``model(token_ids, positions)`` compiled with Inductor, the token dimension dynamic, no graph breaks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.compilations = 0
        self.compile_s = 0.0  # inside Inductor (a warm cache makes it small)
        self.warm_s = 0.0  # the whole warm-up: tracing, compiling, and the first runs
        self._compiled = torch.compile(_own_entry(model), backend=self._inductor, fullgraph=True, dynamic=False)

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.compilations += 1
        start = time.perf_counter()
        compiled = compile_fx(gm, example_inputs)
        self.compile_s += time.perf_counter() - start
        return compiled

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(token_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return self._compiled(token_ids, positions)
