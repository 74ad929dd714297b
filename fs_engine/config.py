"""Engine configuration: frozen dataclasses per area, validated on construction.

``LLMEngine(**kwargs)``, ``LLM(**kwargs)`` and (later) CLI flags all map onto the fields below through
``EngineConfig.from_kwargs``; field names are unique across areas and an unknown key raises. Runtime facts
(the resolved device and dtype, the number of KV blocks, eos ids) are computed by the engine and passed
explicitly; they are never written back into a config.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
BLOCK_ALLOCATORS = ("group", "block")
COMPILE_MODES = ("auto", "off", "on")
COPY_GRANULARITIES = ("group", "block", "block_layer")
POLICIES = ("fcfs", "priority", "vtc")
PREEMPTION_MODES = ("swap", "recompute")
SWAP_MODES = ("async", "sync", "adaptive")
DEVICES = ("auto", "cpu", "cuda")  # or "sim:<gpu>": a simulated device (fs_engine.sim)
SIM_EXECUTE = ("shapes", "model")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def check_value(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_types(cfg: Any) -> None:
    """Reject values of the wrong type (a float block size, a string count) before any range check."""
    for f in dataclasses.fields(cfg):
        value, annotation = getattr(cfg, f.name), str(f.type)
        if value is None and "None" in annotation:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation.startswith("int"):
            check_value(is_number and isinstance(value, int), f.name, value, "must be an integer")
        elif annotation.startswith("float"):
            check_value(is_number, f.name, value, "must be a number")
        elif annotation.startswith("str"):
            check_value(isinstance(value, str), f.name, value, "must be a string")
        elif annotation.startswith("bool"):
            check_value(isinstance(value, bool), f.name, value, "must be True or False")


LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _help("Hugging Face checkpoint directory (config.json + safetensors)", default="")
    tokenizer: str | None = _help("tokenizer directory (default: the model directory)", default=None)
    dtype: str = _help("weights and KV dtype; auto = float32 on CPU, bfloat16 on GPU", default="auto")
    max_model_len: int | None = _help("longest prompt + output in tokens (default: the model's)", default=None)
    seed: int = _help("seed of the engine's sampler for requests without their own seed", default=0)
    load_format: str = _help("auto: read the safetensors weights; dummy: seeded random weights from config.json "
                             "alone (benchmarks of big shapes without a checkpoint)", default="auto")

    def __post_init__(self) -> None:
        check_types(self)
        check_value(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {DTYPES}")
        check_value(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"choose one of {LOAD_FORMATS}")
        check_value(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", self.max_model_len,
               "must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _help("tokens per KV block", default=16)
    num_gpu_blocks: int | None = _help("KV blocks on the device (overrides memory-based sizing)", default=None)
    kv_cache_memory_gb: float | None = _help(
        "memory for the KV arena in GiB (default: 2 GiB on CPU, gpu_memory_utilization on GPU)", default=None
    )
    gpu_memory_utilization: float = _help("fraction of GPU memory the engine may use", default=0.9)
    block_allocator: str = _help("device KV allocation: group (contiguous runs) or block (vLLM free list)",
                                 default="group")
    num_cpu_blocks: int | None = _help("KV blocks in host memory for swapped-out requests (overrides cpu_kv_gb)",
                                       default=None)
    cpu_kv_gb: float = _help("host memory for swapped-out KV in GiB", default=4.0)

    def __post_init__(self) -> None:
        check_types(self)
        check_value(self.block_allocator in BLOCK_ALLOCATORS, "block_allocator", self.block_allocator,
               f"choose one of {BLOCK_ALLOCATORS}")
        check_value(self.num_cpu_blocks is None or self.num_cpu_blocks >= 0, "num_cpu_blocks", self.num_cpu_blocks,
               "must be >= 0 (0 = no swap space: preemption recomputes)")
        check_value(self.cpu_kv_gb >= 0, "cpu_kv_gb", self.cpu_kv_gb, "must be >= 0")
        check_value(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
               self.block_size, "must be a power of two >= 1")
        check_value(self.num_gpu_blocks is None or self.num_gpu_blocks >= 1, "num_gpu_blocks", self.num_gpu_blocks,
               "must be >= 1")
        check_value(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb",
               self.kv_cache_memory_gb, "must be > 0")
        check_value(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
               "must be in (0, 1]")


def parse_tenant_weights(value: Any) -> tuple[tuple[str, float], ...]:
    """'a=3,b=1', a dict or pairs -> sorted ((tenant, weight), ...) with every weight > 0."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            name, sep, weight = item.partition("=")
            check_value(bool(sep and name.strip()), "tenant_weights", value, "write it as 'tenant=weight,...'")
            try:
                pairs.append((name.strip(), float(weight)))
            except ValueError:
                check_value(False, "tenant_weights", value, f"weight {weight!r} of {name!r} is not a number")
    else:
        pairs = list(value.items()) if isinstance(value, dict) else [tuple(p) for p in value]
    for name, weight in pairs:
        check_value(isinstance(weight, (int, float)) and weight > 0, "tenant_weights", value,
               f"the weight of {name!r} must be a number > 0")
    return tuple(sorted((str(n), float(w)) for n, w in pairs))


@dataclass(frozen=True)
class SwapConfig:
    copy_granularity: str = _help("copy calls per swap: group (one per contiguous run), block (one per block), "
                                  "block_layer (one per block, layer and K/V, as vLLM v0)", default="group")
    swap_mode: str = _help("async: steps go on while swaps run; sync: every step waits for its swaps; adaptive: "
                           "wait for a swap-in only when the batch would otherwise be small", default="async")
    swap_threads: int = _help("copy threads (each with its own CUDA stream); half copy out, half in", default=2)
    adaptive_min_batch: int = _help("adaptive mode waits for swap-ins while fewer requests than this can run",
                                    default=4)
    enable_kv_reuse: bool = _help("keep KV in host memory after swap-in (next swap-out copies only the dirty "
                                  "tail) and after finish (the next turn swaps its prefix in)", default=True)

    def __post_init__(self) -> None:
        check_types(self)
        check_value(self.swap_mode in SWAP_MODES, "swap_mode", self.swap_mode, f"choose one of {SWAP_MODES}")
        check_value(self.swap_threads >= 2, "swap_threads", self.swap_threads, "must be >= 2 (one per direction)")
        check_value(self.adaptive_min_batch >= 1, "adaptive_min_batch", self.adaptive_min_batch, "must be >= 1")
        check_value(isinstance(self.enable_kv_reuse, bool), "enable_kv_reuse", self.enable_kv_reuse, "must be True or False")
        check_value(self.copy_granularity in COPY_GRANULARITIES, "copy_granularity", self.copy_granularity,
               f"choose one of {COPY_GRANULARITIES}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _help("most requests in one step's batch", default=128)
    max_num_batched_tokens: int = _help("token budget of one step (longer prompts are chunked)", default=2048)
    policy: str = _help("who runs first: fcfs (arrival), priority (lower value first), vtc (fair share "
                        "across tenants)", default="fcfs")
    preemption_mode: str = _help("how a preempted request gives up its KV: swap (to host memory) or "
                                 "recompute (drop it)", default="swap")
    tenant_weights: Any = _help("vtc service weights, e.g. 'alice=3,bob=1' (unlisted tenants weigh 1)",
                                default=None)
    preemption_cooldown_steps: int = _help(
        "steps a request runs after being scheduled in before a higher-ranked one may preempt it "
        "(anti-thrashing; memory growth may still preempt it)", default=4)
    async_scheduling: bool = _help(
        "multi-process engines: schedule step N+1 while step N runs (the workers fill in step N's sampled tokens), "
        "so the frontend's work between steps leaves the critical path; greedy output is unchanged", default=True)

    def __post_init__(self) -> None:
        check_types(self)
        check_value(self.policy in POLICIES, "policy", self.policy, f"choose one of {POLICIES}")
        check_value(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", self.preemption_mode,
               f"choose one of {PREEMPTION_MODES}")
        check_value(self.preemption_cooldown_steps >= 0, "preemption_cooldown_steps", self.preemption_cooldown_steps,
               "must be >= 0")
        object.__setattr__(self, "tenant_weights", parse_tenant_weights(self.tenant_weights))
        check_value(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        check_value(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens,
               "must be >= 1")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = _help("where the model runs: auto = cuda when available, else cpu; sim:<gpu> (a10, a100, h100, "
                        "h200, or a calibrated profile .json) runs the engine in virtual time against that device's "
                        "cost model", default="auto")
    attention_backend: str = _help(
        "attention implementation: auto (on CUDA: flash_attn when installed and block_size is a multiple of 256, "
        "else triton; on CPU: torch), torch (reference, any device), triton, flash_attn", default="auto")
    enforce_eager: bool = _help("CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
                                default=False)
    max_graph_batch_size: int = _help("CUDA: largest decode batch captured as a CUDA graph (larger runs eagerly)",
                                      default=256)
    compile: str = _help("the model's forward under torch.compile (Inductor, attention as a custom op): auto (on "
                         "CUDA; off on CPU, where it does not pay), on (an error if the model cannot be compiled), "
                         "off", default="auto")
    sim_execute: str = _help("simulated devices: shapes (no weights; sampled tokens are a fixed function of the "
                             "context) or model (also run the real model on the CPU for the tokens)", default="shapes")

    def __post_init__(self) -> None:
        check_types(self)
        from fs_engine.sim.devices import SIM_PREFIX, get_profile, is_simulated

        if is_simulated(self.device):
            get_profile(self.device.removeprefix(SIM_PREFIX))  # an unknown device fails here, naming the choices
        else:
            check_value(self.device in DEVICES, "device", self.device,
                        f"choose one of {DEVICES}, or sim:<gpu> for a simulated device")
        check_value(self.sim_execute in SIM_EXECUTE, "sim_execute", self.sim_execute, f"choose one of {SIM_EXECUTE}")
        check_value(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", self.attention_backend,
               f"choose one of {ATTENTION_BACKENDS}")
        check_value(self.max_graph_batch_size >= 1, "max_graph_batch_size", self.max_graph_batch_size, "must be >= 1")
        check_value(self.compile in COMPILE_MODES, "compile", self.compile, f"choose one of {COMPILE_MODES}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = _help(
        "ranks the model is sharded over (one worker process each; heads, MLP and vocabulary split, KV heads "
        "split or replicated); above 1 the engine runs multi-process", default=1)
    master_addr: str = _help("torch.distributed rendezvous host of the ranks (rank 0's machine)",
                             default="127.0.0.1")
    master_port: int = _help("torch.distributed rendezvous port; 0 picks a free one (one machine only); with "
                             "nnodes > 1 the engine's sockets use the next ports too", default=0)
    nnodes: int = _help("machines the ranks span (tensor_parallel_size / nnodes ranks each); run one "
                        "fs-engine launch per machine with the same arguments and its --node-rank", default=1)
    node_rank: int = _help("this machine's place among nnodes: 0 runs the frontend, the others only ranks",
                           default=0)

    def __post_init__(self) -> None:
        check_types(self)
        check_value(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")
        check_value(0 <= self.master_port < 65536, "master_port", self.master_port, "must be in [0, 65535]")
        check_value(self.nnodes >= 1 and self.tensor_parallel_size % self.nnodes == 0, "nnodes", self.nnodes,
                    f"must be >= 1 and divide tensor_parallel_size={self.tensor_parallel_size}")
        check_value(0 <= self.node_rank < self.nnodes, "node_rank", self.node_rank, f"must be in [0, {self.nnodes})")
        check_value(self.nnodes == 1 or self.master_port > 0, "master_port", self.master_port,
                    "give every machine the same port (0 picks a free one, which only one machine can know)")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes


AREAS = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "swap": SwapConfig,
    "device": DeviceConfig,
    "parallel": ParallelConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    swap: SwapConfig = SwapConfig()
    device: DeviceConfig = DeviceConfig()
    parallel: ParallelConfig = ParallelConfig()

    @staticmethod
    def field_names() -> dict[str, str]:
        """Every engine argument name -> the area that owns it."""
        return {f.name: area for area, cls in AREAS.items() for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        owners = cls.field_names()
        unknown = [k for k in kwargs if k not in owners]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, owners, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown engine argument {', '.join(hints)}; valid arguments: {', '.join(sorted(owners))}"
            )
        per_area: dict[str, dict[str, Any]] = {area: {} for area in AREAS}
        for key, value in kwargs.items():
            per_area[owners[key]][key] = value
        return cls(**{area: AREAS[area](**values) for area, values in per_area.items()})
