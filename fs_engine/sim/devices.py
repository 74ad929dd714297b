"""Every constant of the simulated devices, each with where it came from.

A ``DeviceProfile`` is what the cost model (``fs_engine.sim.cost_model``) needs to know of one accelerator and
its host link. Published figures are quoted from ``../shared/calibration`` (vendor datasheets, Vidur's kernel
profiles, PCIe measurements); the few numbers that no source gives are marked *estimate* with the reasoning,
and ``fs-engine bench calibrate`` replaces every one of them by a fit to measurements on a device at hand.

Sources (S1-S7 below are cited next to each constant):

- S1 vendor datasheets, dense fp16/bf16 tensor TFLOP/s and HBM/GDDR bandwidth: A10 24 GB 125 TFLOP/s,
  600 GB/s; A40 150 TFLOP/s, 696 GB/s; A100 80 GB SXM 312 TFLOP/s, 2,039 GB/s; H100 80 GB SXM 989 TFLOP/s,
  3,350 GB/s; H200 141 GB 989 TFLOP/s, 4,800 GB/s (as collected in calibration/pcie.md).
- S2 PCIe arithmetic: 4.0 x16 31.5 GB/s raw per direction, about 25 GB/s achievable; 5.0 x16 63 GB/s raw.
- S3 vLLM blog "Inside vLLM's New KV Offloading Connector" (2026-01-08), H100 PCIe 5.0: about 50 GB/s one
  direction for large copies; DMA efficiency falls for copies below about 0.5 MB; both directions at once
  with 2 MB blocks 83.4 GB/s aggregate (0.834 of two independent directions).
- S4 vLLM PR #29013 (A100): ``cudaMemcpyAsync`` submission about 2 us per call; FlexKV PR #193 (H20): about
  2.3 us per call.
- S5 Vidur's per-operation profiles (``fs_engine/sim/data/vidur_mlp.csv.gz``, MIT), from which
  ``cost_model.gemm_efficiency`` fits each GPU's achieved fraction of S1's peaks (A10: no profile exists;
  it is the same GA102 chip as the A40 with fewer SMs, so it takes the A40's fractions of its own peaks).
- S6 FlashAttention-2 (Dao, 2023): the forward pass reaches 50-73% of the A100's peak FLOP/s.
- S7 NVIDIA's CUDA graphs documentation and vLLM's measurements: a kernel launch costs the host about 4-6 us;
  a whole graph replays for about one launch.
- S8 Vidur's NCCL all-reduce profiles of one machine's GPUs (``fs_engine/sim/data/vidur_allreduce.csv.gz``,
  MIT): A100 and H100 DGX systems (NVSwitch), 2, 4 and 8 GPUs. The H200 takes the H100's (the same NVLink 4
  fabric, *estimate*); the A10 has none (PCIe only, no profile), so it simulates one rank.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
SIM_PREFIX = "sim:"  # device="sim:<name or profile.json>" selects a simulated device
ATTENTION_KERNELS = ("paged", "reference")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int  # device memory, as the worker's mem_get_info total reports it
    peak_flops: float  # dense fp16/bf16 tensor FLOP/s (S1)
    memory_bw: float  # bytes/s of device memory (S1)
    vidur_gpu: str | None  # whose Vidur profiles (S5) give the GEMM efficiencies and, for matching shapes, times
    # ---- host <-> device copies (pinned host memory, DMA engines) ----
    pcie_bw: float  # achievable bytes/s one direction for large copies (S2, S3)
    dma_latency_s: float  # fixed device-side cost of one copy: copies of dma_latency_s * pcie_bw bytes reach
    # half the bandwidth. S3: efficiency falls below ~0.5 MB; 2 us at 25-50 GB/s puts the half-bandwidth size
    # at 50-100 KB, so a 32 KiB block_layer copy reaches a third of the link and a 2 MiB block ~96%
    submit_s: float  # host cost of issuing one copy call (S4)
    duplex_factor: float  # each direction's share of its bandwidth while the other direction copies too (S3)
    # ---- execution ----
    attn_compute_eff: float  # fraction of peak_flops paged prefill attention reaches (S6: 0.5-0.73 for the
    # dense kernel; the low end, for paging and mixed batches)
    attn_memory_eff: float  # fraction of memory_bw decode attention reaches reading the KV. *Estimate*: 0.7, the
    # fraction the GEMMs of S5 reach at batch 1 (0.6-0.8 on every profiled GPU); paged reads are no better
    gemm_compute_eff: float | None = None  # None: fitted from S5 (see cost_model); else this fraction
    gemm_memory_eff: float | None = None
    kernel_launch_s: float = 5e-6  # host cost per kernel launched eagerly (S7)
    kernels_per_layer: int = 14  # eager kernels of one decoder layer: 2 norms, 3-4 GEMMs, rope, KV store,
    # attention, activation, 2 adds (counted in workers/models/llama.py)
    graph_launch_s: float = 20e-6  # one CUDA graph replay (S7: about one launch, plus the input copies)
    step_host_s: float = 1.0e-3  # *estimate*: scheduling, plan, input tensors and the sampler's sync per step,
    # not hidden behind the device (the frontend waits for each result); calibrate measures it
    seq_host_s: float = 10e-6  # *estimate*: per request in the step (table rows, output processing, stream)
    copy_interference: float = 0.03  # *estimate*: a step runs this much slower while copies are in flight (DMA
    # takes PCIe-rate bytes of HBM bandwidth: 25-50 GB/s of 600-4,800 GB/s is 1-8%; 3% for the common case)
    activation_overhead_bytes: int = 1 << 30  # *estimate*: CUDA context, cuBLAS workspaces, graphs' pool
    graphs: bool = True  # decode steps replay CUDA graphs (unless enforce_eager)
    dtype_bytes: int = 2  # weights and KV in fp16/bf16
    # ---- how the device executes (GPUs: the defaults; a CPU calibrated by bench calibrate: the others) ----
    serial: bool = False  # True: an operation's arithmetic and memory traffic add up instead of overlapping,
    # and kernels launch inline (a CPU running the eager model); False: rooflines, launches hidden behind work
    attention_kernel: str = "paged"  # paged: reads each context once, skips masked work (the Triton / flash
    # kernels); reference: the torch backend, which pads decode rows to the longest context, computes masked
    # prefill scores in full and loops over the chunks of any step that prefills
    chunk_loop_s: float = 0.0  # reference kernel: cost per chunk of a step that prefills (its Python loop)
    allreduce_system: str | None = None  # whose all-reduce times (S8) the tensor-parallel ranks of one machine
    # pay; None: this device has no profile, and a sharded model cannot be simulated on it
    async_command_host_s: float = 0.0  # what an unwaited copy command costs the step that issues it on the
    # host: on a CPU its copy thread takes a core and GIL hand-offs from the forward (fitted by calibrate);
    # on a GPU deployment the swap process issues the copies, so nothing

    def with_updates(self, **changes) -> DeviceProfile:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown device profile fields {unknown}; expected {sorted(known)}")
        return cls(**data)

    def __post_init__(self) -> None:
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={self.attention_kernel!r}: choose one of {ATTENTION_KERNELS}")
        for name in ("peak_flops", "memory_bw", "pcie_bw", "duplex_factor", "attn_compute_eff", "attn_memory_eff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"device profile {self.name!r}: {name}={getattr(self, name)!r} must be > 0")


# the datasheet peaks (S1) of the GPUs Vidur profiled: its times as fractions of these carry over to another
# GPU of the family (A10 <- A40, H200 <- H100) as the same fractions of that GPU's own peaks (S5)
VIDUR_PEAKS = {"a40": (150e12, 696 * GB), "a100": (312e12, 2039 * GB), "h100": (989e12, 3350 * GB)}

_PCIE4 = dict(pcie_bw=25 * GB, dma_latency_s=2.5e-6, submit_s=2e-6, duplex_factor=0.834)  # S2, S3, S4
_PCIE5 = dict(pcie_bw=50 * GB, dma_latency_s=2e-6, submit_s=2e-6, duplex_factor=0.834)  # S3, S4

PROFILES: dict[str, DeviceProfile] = {
    "a10": DeviceProfile("a10", 24 * 2**30, 125e12, 600 * GB, "a40", attn_compute_eff=0.5, attn_memory_eff=0.7,
                         **_PCIE4),
    "a100": DeviceProfile("a100", 80 * 2**30, 312e12, 2039 * GB, "a100", attn_compute_eff=0.5,
                          attn_memory_eff=0.7, allreduce_system="a100_dgx", **_PCIE4),
    "h100": DeviceProfile("h100", 80 * 2**30, 989e12, 3350 * GB, "h100", attn_compute_eff=0.5,
                          attn_memory_eff=0.7, allreduce_system="h100_dgx", **_PCIE5),
    "h200": DeviceProfile("h200", 141 * 2**30, 989e12, 4800 * GB, "h100", attn_compute_eff=0.5,
                          attn_memory_eff=0.7, allreduce_system="h100_dgx", **_PCIE5),
}
PROFILES["a100-80gb"] = PROFILES["a100"]
PROFILES["a10-24gb"] = PROFILES["a10"]


def is_simulated(device: str) -> bool:
    return device.startswith(SIM_PREFIX)


def get_profile(name: str) -> DeviceProfile:
    """A named profile (``a10``, ``a100``, ``h100``, ``h200``) or a JSON file written by ``bench calibrate``."""
    key = name.lower()
    if key in PROFILES:
        return PROFILES[key]
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.exists():
        return DeviceProfile.load(path)
    raise ValueError(f"unknown simulated device {name!r}: choose one of {', '.join(sorted(PROFILES))}, "
                     f"or give a profile .json written by 'fs-engine bench calibrate'")
