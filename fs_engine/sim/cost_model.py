"""How long a step, and a KV copy, takes on a simulated device.

A step's time is the host's share plus the device's share, the device's being a sum over the model's
operations:

    step_s = step_host_s + seq_host_s * num_seqs + max(device_s, launch_s)
    device_s = num_layers * (linear_s(T) + attention_s) + emb_s(T) + lm_head_s(num_sampled)

- ``linear_s(T)``: every non-attention operation of one layer over the step's T tokens. Where Vidur profiled
  this exact shape on this GPU, it is the sum of the measured medians, interpolated over T (two residual adds
  per layer); otherwise a roofline per operation, ``max(flops / (peak * ce), bytes / (bw * me))`` with the
  GEMM efficiencies ``ce`` (large T) and ``me`` (T <= 8) fitted from all of that GPU's Vidur profiles, and
  element-wise operations at least the profiles' smallest kernel time.
- ``attention_s``: a roofline over the whole batch, ``max(attn_flops / (peak * attn_compute_eff),
  kv_bytes / (bw * attn_memory_eff))``: prefill is compute-bound (causal: a chunk of q new tokens after p
  cached ones costs 4 * heads * head_dim * q * (p + (q + 1) / 2) FLOPs), decode reads every cached token's K
  and V once.
- ``launch_s``: the host launches the kernels while the device runs them, so only the longer counts; a decode
  step that replays a CUDA graph launches once (its batch padded to the captured size, and the device computes
  the padded rows too), an eager step launches ``kernels_per_layer`` kernels per layer.

A copy command of ``n`` calls of ``b`` bytes each (the copy granularity decides ``n`` and ``b``) keeps its
direction's copy engine busy ``n * (dma_latency_s + b / pcie_bw)``, and cannot finish before the host has
issued it (``n * submit_s``). ``fs_engine.sim.executor`` queues commands per direction and applies the duplex
factor and the interference of copies with the forward pass.
"""

from __future__ import annotations

import csv
import functools
import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fs_engine.model_config import ModelArch
from fs_engine.sim.devices import VIDUR_PEAKS, DeviceProfile

OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
       "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
LAYER_OPS = {op: (2 if op == "add" else 1) for op in OPS if op != "emb"}  # two residual adds per layer
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
COMPUTE_BOUND_TOKENS = 4096  # GEMMs with at least this many rows are compute-bound on every profiled GPU
MEMORY_BOUND_TOKENS = 8  # ... and with at most this many, weight-read-bound


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the cost model needs, per tensor-parallel rank."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tp: int = 1
    gated: bool = True

    @classmethod
    def from_arch(cls, arch: ModelArch, tp: int = 1) -> ModelShape:
        return cls(arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
                   arch.head_dim, arch.vocab_size, tp)

    @property
    def heads(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.tp)

    def gemms(self) -> dict[str, tuple[int, int]]:
        """(K, N) of each GEMM of one layer on one rank; the step's tokens are M."""
        h, d = self.hidden, self.head_dim
        return {
            "attn_pre_proj": (h, (self.heads + 2 * self.kv_heads) * d),
            "attn_post_proj": (self.heads * d, h),
            "mlp_up_proj": (h, (2 if self.gated else 1) * self.intermediate // self.tp),
            "mlp_down_proj": (self.intermediate // self.tp, h),
        }

    def elementwise_bytes_per_token(self, dtype_bytes: int) -> dict[str, int]:
        """Bytes one token's element-wise operations read and write."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        i = self.intermediate // self.tp
        return {"input_layernorm": 2 * h * dtype_bytes, "post_attention_layernorm": 2 * h * dtype_bytes,
                "attn_rope": 2 * (q + kv) * dtype_bytes, "mlp_act": 3 * i * dtype_bytes, "add": 3 * h * dtype_bytes}

    def num_params(self) -> int:
        """Weights on one rank: layers, embedding and an untied LM head (norms are negligible)."""
        per_layer = sum(k * n for k, n in self.gemms().values())
        return self.num_layers * per_layer + 2 * self.vocab // self.tp * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token across all layers on one rank."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def gemm_time(flops: float, num_bytes: float, profile: DeviceProfile, compute_eff: float, memory_eff: float) -> float:
    compute = flops / (profile.peak_flops * compute_eff)
    memory = num_bytes / (profile.memory_bw * memory_eff)
    return compute + memory if profile.serial else max(compute, memory)


# ---- Vidur's profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VidurProfile:
    """One (gpu, model, tp) profile: each operation's median seconds per layer at each token count."""

    gpu: str
    model: str
    shape: ModelShape
    num_tokens: np.ndarray
    op_s: dict[str, np.ndarray]

    def linear_s(self, tokens: float) -> float:
        return float(sum(count * np.interp(tokens, self.num_tokens, self.op_s[op]) for op, count in LAYER_OPS.items()))

    def emb_s(self, tokens: float) -> float:
        return float(np.interp(tokens, self.num_tokens, self.op_s["emb"]))


@functools.cache
def vidur_profiles() -> tuple[VidurProfile, ...]:
    """Every profile in ``fs_engine/sim/data/vidur_mlp.csv.gz`` (written by ``tools/import_vidur.py``)."""
    rows: dict[tuple, list[dict]] = {}
    with resources.files("fs_engine.sim").joinpath("data/vidur_mlp.csv.gz").open("rb") as raw:
        for row in csv.DictReader(gzip.open(raw, "rt")):
            rows.setdefault((row["gpu"], row["model"], int(row["tp"])), []).append(row)
    profiles = []
    for (gpu, model, tp), group in sorted(rows.items()):
        group.sort(key=lambda r: int(r["num_tokens"]))
        first = group[0]
        heads, kv_heads, hidden = int(first["n_head"]), int(first["n_kv_head"]), int(first["n_embd"])
        shape = ModelShape(0, hidden, int(first["n_expanded_embd"]), heads, kv_heads, hidden // heads,
                           int(first["vocab_size"]), tp, first["use_gated_mlp"] == "True")
        # some token counts were profiled more than once: take their median
        by_tokens: dict[int, list[list[float]]] = {}
        for r in group:
            by_tokens.setdefault(int(r["num_tokens"]), []).append([float(r[f"{op}_ms"]) for op in OPS])
        tokens = np.array(sorted(by_tokens), dtype=float)
        medians = np.array([np.median(by_tokens[int(t)], axis=0) for t in tokens]) / 1000  # [tokens, ops] seconds
        ops = {op: medians[:, i] for i, op in enumerate(OPS)}
        profiles.append(VidurProfile(gpu, model, shape, tokens, ops))
    return tuple(profiles)


@functools.cache
def allreduce_table(system: str, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(sizes in bytes, median seconds) of NCCL all-reduces among ``num_workers`` GPUs of one ``system``
    (``fs_engine/sim/data/vidur_allreduce.csv.gz``, written by ``tools/import_vidur.py``)."""
    points = []
    with resources.files("fs_engine.sim").joinpath("data/vidur_allreduce.csv.gz").open("rb") as raw:
        for row in csv.DictReader(gzip.open(raw, "rt")):
            if row["system"] == system and int(row["num_workers"]) == num_workers:
                points.append((int(row["size_bytes"]), float(row["median_ms"]) / 1000))
    if not points:
        raise ValueError(f"no all-reduce profile of {num_workers} GPUs of {system}: simulated tensor parallelism "
                         f"covers 2, 4 and 8 GPUs of one machine")
    points.sort()
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points])


def find_vidur_profile(gpu: str | None, shape: ModelShape) -> VidurProfile | None:
    """The profile of exactly this layer shape on this GPU, if Vidur measured one."""
    for p in vidur_profiles():
        s = p.shape
        if p.gpu == gpu and (s.hidden, s.intermediate, s.num_heads, s.num_kv_heads, s.tp, s.gated) == (
                shape.hidden, shape.intermediate, shape.num_heads, shape.num_kv_heads, shape.tp, shape.gated):
            return p
    return None


@dataclass(frozen=True)
class Efficiency:
    gemm_compute: float  # achieved / peak FLOP/s of GEMMs with >= COMPUTE_BOUND_TOKENS rows
    gemm_memory: float  # achieved / peak bytes/s of GEMMs with <= MEMORY_BOUND_TOKENS rows
    min_kernel_s: float  # the shortest element-wise kernel (launch-latency bound)


@functools.cache
def fitted_efficiency(gpu: str) -> Efficiency:
    """Medians over every single-rank GEMM Vidur profiled on ``gpu``, as fractions of its datasheet peaks."""
    peak_flops, memory_bw = VIDUR_PEAKS[gpu]
    compute, memory, small = [], [], []
    for p in vidur_profiles():
        if p.gpu != gpu or p.shape.tp != 1:
            continue
        for op, (k, n) in p.shape.gemms().items():
            for m, t in zip(p.num_tokens, p.op_s[op]):
                if m >= COMPUTE_BOUND_TOKENS:
                    compute.append(2 * m * k * n / t / peak_flops)
                elif m <= MEMORY_BOUND_TOKENS:
                    memory.append(2 * (k * n + m * k + m * n) / t / memory_bw)
        small.extend(p.op_s["input_layernorm"][p.num_tokens <= MEMORY_BOUND_TOKENS])
    if not compute or not memory:
        raise ValueError(f"no Vidur GEMM profiles for gpu {gpu!r}")
    return Efficiency(float(np.median(compute)), float(np.median(memory)), float(np.median(small)))


# ---- the cost model --------------------------------------------------------------------------------------
@dataclass
class StepShape:
    """What one step computes: per chunk, the new tokens and the context length after them."""

    query_lens: list[int]
    context_lens: list[int]
    num_sampled: int
    graph_batch: int = 0  # > 0: a decode step replayed as the CUDA graph of this padded batch size
    async_commands: int = 0  # copy commands issued with the step and not waited for

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class CostModel:
    def __init__(self, profile: DeviceProfile, shape: ModelShape, kv_dtype_bytes: int | None = None) -> None:
        self.profile = profile
        self.shape = shape
        self.dtype_bytes = profile.dtype_bytes
        self.kv_dtype_bytes = kv_dtype_bytes or profile.dtype_bytes
        self.vidur = find_vidur_profile(profile.vidur_gpu, shape)
        fitted = fitted_efficiency(profile.vidur_gpu) if profile.vidur_gpu else None
        if fitted is None and None in (profile.gemm_compute_eff, profile.gemm_memory_eff):
            raise ValueError(f"device profile {profile.name!r} names no vidur_gpu to fit GEMM efficiencies from; "
                             f"set gemm_compute_eff and gemm_memory_eff")
        self.eff = Efficiency(
            profile.gemm_compute_eff if profile.gemm_compute_eff is not None else fitted.gemm_compute,
            profile.gemm_memory_eff if profile.gemm_memory_eff is not None else fitted.gemm_memory,
            fitted.min_kernel_s if fitted else 0.0,
        )

    # ---- one layer's terms ----
    def gemm_s(self, m: float, k: int, n: int) -> float:
        b = self.dtype_bytes
        return gemm_time(2 * m * k * n, b * (k * n + m * k + m * n), self.profile, self.eff.gemm_compute,
                         self.eff.gemm_memory)

    def roofline_linear_s(self, tokens: float) -> float:
        """Every non-attention operation of one layer, by roofline."""
        gemms = sum(self.gemm_s(tokens, k, n) for k, n in self.shape.gemms().values())
        bw = self.profile.memory_bw * self.eff.gemm_memory
        elementwise = sum(LAYER_OPS[op] * max(self.eff.min_kernel_s, tokens * b / bw)
                          for op, b in self.shape.elementwise_bytes_per_token(self.dtype_bytes).items())
        return gemms + elementwise

    def linear_s(self, tokens: float) -> float:
        if self.vidur is not None and tokens <= self.vidur.num_tokens[-1]:
            return self.vidur.linear_s(tokens)
        return self.roofline_linear_s(tokens)

    @property
    def _reference(self) -> bool:
        return self.profile.attention_kernel == "reference"

    def attention_flops(self, query_lens: list[int], context_lens: list[int]) -> float:
        """QK^T and PV of one layer, causal within each chunk (the reference kernel computes the masked half too,
        and pads decode rows to the longest context)."""
        s = self.shape
        if self._reference and all(q == 1 for q in query_lens):  # decode rows padded to the longest context
            return 4.0 * s.heads * s.head_dim * len(query_lens) * max(context_lens)
        if self._reference:
            return sum(4.0 * s.heads * s.head_dim * q * c for q, c in zip(query_lens, context_lens))
        return sum(4.0 * s.heads * s.head_dim * q * ((c - q) + (q + 1) / 2) for q, c in zip(query_lens, context_lens))

    def attention_bytes(self, query_lens: list[int], context_lens: list[int]) -> float:
        """One layer reads every context token's K and V, and reads Q and writes O of the new tokens (the
        reference kernel reads every decode row's table up to the longest context)."""
        s = self.shape
        decode_only = all(q == 1 for q in query_lens)
        kv_tokens = len(context_lens) * max(context_lens) if self._reference and decode_only else sum(context_lens)
        kv = kv_tokens * 2 * s.kv_heads * s.head_dim * self.kv_dtype_bytes
        return kv + sum(query_lens) * 2 * s.heads * s.head_dim * self.dtype_bytes

    def attention_s(self, query_lens: list[int], context_lens: list[int]) -> float:
        p = self.profile
        compute = self.attention_flops(query_lens, context_lens) / (p.peak_flops * p.attn_compute_eff)
        memory = self.attention_bytes(query_lens, context_lens) / (p.memory_bw * p.attn_memory_eff)
        return compute + memory if p.serial else max(compute, memory)

    def lm_head_s(self, num_sampled: int) -> float:
        return self.gemm_s(num_sampled, self.shape.hidden, self.shape.vocab // self.shape.tp) if num_sampled else 0.0

    def emb_s(self, tokens: float) -> float:
        if self.vidur is not None and tokens <= self.vidur.num_tokens[-1]:
            return self.vidur.emb_s(tokens)
        bw = self.profile.memory_bw * self.eff.gemm_memory
        return max(self.eff.min_kernel_s, tokens * self.shape.hidden * self.dtype_bytes * 2 / bw)

    def allreduce_s(self, num_bytes: float) -> float:
        """One all-reduce of ``num_bytes`` among the tensor-parallel ranks (S8 of ``devices``), interpolated
        in the profiled sizes; beyond the largest, at its bandwidth."""
        if self.shape.tp == 1 or num_bytes <= 0:
            return 0.0
        if self.profile.allreduce_system is None:
            raise ValueError(f"the simulated {self.profile.name} has no all-reduce profile: simulate "
                             f"tensor_parallel_size={self.shape.tp} on a100, h100 or h200")
        sizes, seconds = allreduce_table(self.profile.allreduce_system, self.shape.tp)
        if num_bytes > sizes[-1]:
            return float(seconds[-1] * num_bytes / sizes[-1])
        return float(np.interp(num_bytes, sizes, seconds))

    def comm_s(self, rows: int, head_rows: int) -> float:
        """A step's collectives: the all-reduce after every layer's attention and MLP (row-parallel outputs)
        and after the vocabulary-parallel embedding, of ``rows`` hidden states each, and the LM head's
        all-gather of the logits (a ring all-gather moves half of what an all-reduce of its output does)."""
        if self.shape.tp == 1:
            return 0.0
        hidden = rows * self.shape.hidden * self.dtype_bytes
        logits = head_rows * self.shape.vocab * self.dtype_bytes
        return (2 * self.shape.num_layers + 1) * self.allreduce_s(hidden) + 0.5 * self.allreduce_s(logits)

    # ---- a step ----
    def device_s(self, step: StepShape) -> float:
        rows = step.graph_batch or step.num_tokens  # a graph computes its padded rows too
        query_lens, context_lens = step.query_lens, step.context_lens
        per_layer = self.linear_s(rows) + self.attention_s(query_lens, context_lens)
        head_rows = step.graph_batch or step.num_sampled
        return (self.shape.num_layers * per_layer + self.emb_s(rows) + self.lm_head_s(head_rows)
                + self.comm_s(rows, head_rows))

    def launch_s(self, step: StepShape) -> float:
        p = self.profile
        if step.graph_batch:
            return p.graph_launch_s
        return p.kernels_per_layer * self.shape.num_layers * p.kernel_launch_s

    def step_s(self, step: StepShape) -> float:
        p = self.profile
        host = p.step_host_s + p.seq_host_s * len(step.query_lens) + p.async_command_host_s * step.async_commands
        if self._reference and any(q > 1 for q in step.query_lens):
            host += p.chunk_loop_s * len(step.query_lens)
        device, launch = self.device_s(step), self.launch_s(step)
        return host + (device + launch if p.serial else max(device, launch))

    def features(self, step: StepShape) -> dict[str, float]:
        """A serial device's step time is linear in these, with one coefficient each (``bench calibrate`` fits
        them): ``step_s == sum(coefficient[k] * features[k])``, see ``serial_profile``."""
        s, rows = self.shape, step.graph_batch or step.num_tokens
        b = self.dtype_bytes
        gemm_flops = s.num_layers * sum(2 * rows * k * n for k, n in s.gemms().values())
        gemm_bytes = s.num_layers * sum(b * (k * n + rows * k + rows * n) for k, n in s.gemms().values())
        elementwise = s.num_layers * sum(LAYER_OPS[op] * rows * per_token
                                         for op, per_token in s.elementwise_bytes_per_token(b).items())
        head = step.graph_batch or step.num_sampled
        head_flops = 2 * head * s.hidden * (s.vocab // s.tp) if head else 0
        head_bytes = b * (s.hidden * (s.vocab // s.tp) + head * s.hidden + head * s.vocab // s.tp) if head else 0
        prefills = any(q > 1 for q in step.query_lens)
        return {
            "step": 1.0,
            "seqs": float(len(step.query_lens)),
            "prefill_chunks": float(len(step.query_lens)) if prefills and self._reference else 0.0,
            "async_commands": float(step.async_commands),
            "gemm_flops": float(gemm_flops + head_flops),
            "bytes": float(gemm_bytes + elementwise + head_bytes + rows * s.hidden * b * 2),
            "attn_flops": s.num_layers * self.attention_flops(step.query_lens, step.context_lens),
            "attn_bytes": s.num_layers * self.attention_bytes(step.query_lens, step.context_lens),
        }

    # ---- copies ----
    def copy_device_s(self, num_calls: int, num_bytes: int) -> float:
        """Copy-engine time of ``num_calls`` copies moving ``num_bytes`` in all."""
        return num_calls * self.profile.dma_latency_s + num_bytes / self.profile.pcie_bw

    def copy_s(self, num_calls: int, num_bytes: int) -> float:
        """One command alone on its copy engine: issuing pipelines with copying, the slower of the two counts."""
        return max(num_calls * self.profile.submit_s, self.copy_device_s(num_calls, num_bytes))


def copy_calls(granularity: str, runs: list[tuple[int, int, int]], num_layers: int) -> int:
    """Copy calls a command's runs cost (``workers.swap.copier.KVCopier`` issues exactly these)."""
    blocks = sum(n for _, _, n in runs)
    if granularity == "group":
        return len(runs)
    if granularity == "block":
        return blocks
    return blocks * num_layers * 2
