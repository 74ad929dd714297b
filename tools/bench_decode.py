"""Decode throughput of a resident batch: fs-engine eager, compiled (``compile=on``), with CUDA graphs, compiled with
CUDA graphs, and transformers ``generate``.

For each batch size in ``--batches``, that many requests (random prompts of exactly ``--prompt-len`` tokens, greedy,
exactly ``--new-tokens`` new tokens each, eos ignored) run through each of the three on the same checkpoint, dtype
and device. Reported: decode-only tokens/s (prefill excluded) and ms per decode step, and the ratios.

How decode-only time is measured:

- fs-engine (``LLM(..., enforce_eager=False)`` and ``enforce_eager=True``): the whole batch is added at once and
  prefilled in one step (the step's token budget is raised to hold it); the clock starts when the step that gave
  every request its first token returns and stops when the step that gave the last request its last token
  returns, so ``batch * (new_tokens - 1)`` tokens over that time, scheduling, sampling and the step loop included.
- transformers ``generate``: the same clock, read by a streamer, which ``generate`` hands the prompt and then every
  step's new tokens (copied to the host, so each arrival is a completed step): from the arrival of the first new
  tokens to the arrival of the last. One batch with no padding (every prompt has the same length), its default KV
  cache and attention implementation.

They run one after another, each model freed before the next is built, so that an 8B (or TP-free 32B) model
fits; each measurement is the median of ``--repeats``. On CPU there are no CUDA graphs, so ``graphs`` and
``compiled+graphs`` are left out there. A compiled configuration also reports its start-up: the engine's
construction with Inductor's cache empty (a fresh ``TORCHINDUCTOR_CACHE_DIR`` for this run, unless
``--inductor-cache`` names one) and again with it warm, as a second start would find it, and the largest
difference between its greedy tokens and the eager ones (none expected). A checkpoint without safetensors (``tools/make_shapes_config.py``) runs the
engine with ``load_format=dummy`` and transformers from its config with random initialisation in the same dtype:
decode speed does not depend on the weights' values, only their shapes.

    python tools/bench_decode.py                                    # tiny qwen3, CPU: eager, compiled, transformers
    python tools/make_shapes_config.py --shape qwen3-100m --out /tmp/q100m    # about 100M parameters
    python tools/bench_decode.py --model /tmp/q100m --batches 1,8,32 --skip transformers
    python tools/make_shapes_config.py --shape llama3-8b --out /tmp/llama3-8b
    python tools/bench_decode.py --model /tmp/llama3-8b --batches 1,8,32,64 --json decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fs_engine import LLM, SamplingParams  # noqa: E402
from fs_engine.kv.kv_manager import blocks_for  # noqa: E402
from fs_engine.model_config import load_model_arch  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402

CONFIGS = ("eager", "compiled", "graphs", "compiled+graphs", "transformers")
ENGINE_CONFIGS = {  # name -> (compile, enforce_eager)
    "eager": ("off", True), "compiled": ("on", True), "graphs": ("off", False), "compiled+graphs": ("on", False),
}
GPU_ONLY = ("graphs", "compiled+graphs")


def make_prompts(vocab_size: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(n)]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- fs-engine -----------------------------------------------------------------------------------------------
def engine_args(args, load_format: str, config: str) -> dict:
    max_batch = max(args.batches)
    compile_mode, eager = ENGINE_CONFIGS[config]
    kwargs = {
        "dtype": args.dtype, "device": args.device, "attention_backend": args.attention_backend,
        "enforce_eager": eager, "compile": compile_mode, "load_format": load_format, "block_size": args.block_size, "max_num_seqs": max_batch,
        "max_graph_batch_size": max_batch,
        "max_num_batched_tokens": max(2048, max_batch * args.prompt_len),  # the whole batch prefills in one step
        # a resident batch: KV for every request at full length, no swap space, no host copies of finished KV
        "num_gpu_blocks": max_batch * blocks_for(args.prompt_len + args.new_tokens, args.block_size) + 1,
        "num_cpu_blocks": 0, "enable_kv_reuse": False,
    }
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    return kwargs


def engine_decode(llm: LLM, prompts: list[list[int]], new_tokens: int, tag: str) -> dict:
    """One batch to completion; the clock runs from the step that completes the batch's first tokens to the step
    that completes its last."""
    engine = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    started: set[str] = set()
    done: dict[str, list[int]] = {}
    first = last = None
    steps = 0  # counted here: engine.stats() inside the timed loop would add its own cost to every step
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            started.add(out.request_id)
            if out.finished:
                done[out.request_id] = out.token_ids
        if first is None and len(started) == len(ids):
            first = (now, steps)
        if last is None and len(done) == len(ids):
            last = (now, steps)
    seconds, decode_steps = last[0] - first[0], last[1] - first[1]
    return {"seconds": seconds, "steps": decode_steps, "tokens": [done[i] for i in ids]}


def what_ran(llm: LLM) -> dict:
    """Whether decode graphs were captured and which attention backend runs (in-process engine internals)."""
    worker = getattr(llm.engine.executor, "worker", None)
    runner = getattr(worker, "runner", None)
    return {"cuda_graphs": getattr(runner, "graphs", None) is not None,
            "attention_backend": getattr(getattr(runner, "attn", None), "name", "unknown"),
            "dtype": getattr(worker, "dtype_name", "unknown"),
            "forward": runner.forward_summary() if runner is not None else "unknown"}


def run_engine(args, model_dir: str, load_format: str, config: str, prompt_sets: dict[int, list]) -> tuple[dict, dict]:
    """Median decode time per batch size, and what actually ran (graphs captured or not, the attention backend,
    compiled or not, and how long the engine took to start)."""
    start = time.perf_counter()
    llm = LLM(model_dir, **engine_args(args, load_format, config))
    start_s = time.perf_counter() - start
    try:
        ran = {**what_ran(llm), "start_s": round(start_s, 2)}
        engine_decode(llm, prompt_sets[min(args.batches)][:2], 4, "warm")  # first-call allocations, autotuning
        results = {}
        for batch, prompts in prompt_sets.items():
            runs = [engine_decode(llm, prompts, args.new_tokens, f"b{batch}-r{r}") for r in range(args.repeats)]
            results[batch] = {"seconds": statistics.median(r["seconds"] for r in runs), "steps": runs[0]["steps"],
                              "tokens": runs[0]["tokens"]}
    finally:
        llm.engine.shutdown()
        del llm
        free_memory(torch.device(args.resolved_device))
    if ENGINE_CONFIGS[config][0] == "on":  # a second start finds Inductor's cache warm
        start = time.perf_counter()
        again = LLM(model_dir, **engine_args(args, load_format, config))
        ran["warm_start_s"] = round(time.perf_counter() - start, 2)
        again.engine.shutdown()
        del again
        free_memory(torch.device(args.resolved_device))
    return results, ran


# ---- transformers --------------------------------------------------------------------------------------------
def load_hf(model_dir: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(Path(model_dir).glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        return model.eval(), "the checkpoint's weights"
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):  # initialise on the device: an 8B model initialised on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), "random init from config.json (no safetensors; speed does not depend on weight values)"


class StepClock:
    """A ``generate`` streamer that notes when each batch of new tokens arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode(model, ids: torch.Tensor, new_tokens: int) -> dict:
    clock = StepClock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
    arrivals = clock.puts[1:]
    if len(arrivals) != new_tokens:
        raise RuntimeError(f"transformers streamed {len(arrivals)} steps for {new_tokens} new tokens; this "
                           f"transformers version streams differently, so its decode time cannot be read")
    return {"seconds": arrivals[-1] - arrivals[0], "steps": new_tokens - 1}


def run_hf(args, model_dir: str, prompt_sets: dict[int, list]) -> tuple[dict, dict]:
    device = torch.device(args.resolved_device)
    model, weights = load_hf(model_dir, getattr(torch, args.resolved_dtype), device)
    try:
        hf_decode(model, torch.tensor(prompt_sets[min(args.batches)][:2], device=device), 4)  # warm-up
        results = {}
        for batch, prompts in prompt_sets.items():
            ids = torch.tensor(prompts, device=device)
            runs = [hf_decode(model, ids, args.new_tokens) for _ in range(args.repeats)]
            results[batch] = {"seconds": statistics.median(r["seconds"] for r in runs), "steps": runs[0]["steps"]}
        ran = {"weights": weights, "attention": getattr(model.config, "_attn_implementation", "default")}
    finally:
        del model
        free_memory(device)
    return results, ran


# ---- report --------------------------------------------------------------------------------------------------
def summarize(measured: dict, batch: int, new_tokens: int) -> dict:
    seconds = measured["seconds"]
    return {"decode_tokens_per_s": round(batch * (new_tokens - 1) / seconds, 1),
            "ms_per_step": round(1e3 * seconds / measured["steps"], 3)}


def ratio(a: dict, b: dict) -> float | None:
    return round(a["decode_tokens_per_s"] / b["decode_tokens_per_s"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a freshly made tiny model)")
    ap.add_argument("--arch", default="qwen3", choices=("llama", "qwen2", "qwen3"))
    ap.add_argument("--preset", default="default", choices=("test", "default"))
    ap.add_argument("--load-format", default=None, choices=("auto", "dummy"),
                    help="default: auto when the checkpoint has safetensors, else dummy (seeded random weights)")
    ap.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="auto: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--attention-backend", default="auto", help="fs-engine attention: auto, torch, triton, flash_attn")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default 16; 256 for flash_attn)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="engine max_model_len (default: the model's); CUDA graphs are captured for this length")
    ap.add_argument("--skip", default="", help="comma-separated configurations to leave out: eager, compiled, "
                                               "graphs, compiled+graphs, transformers (on CPU the graph ones always)")
    ap.add_argument("--inductor-cache", help="Inductor's cache directory (default: a fresh one, so the first "
                                             "compiled start is a cold one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2: decode time is measured from the first token to the last")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu or auto")
    args.resolved_device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    args.resolved_dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if args.resolved_device == "cuda" else "float32")
    args.dtype = args.resolved_dtype
    args.block_size = args.block_size or (256 if args.attention_backend == "flash_attn" else 16)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(CONFIGS)
    if unknown:
        raise SystemExit(f"--skip {','.join(sorted(unknown))}: choose among {', '.join(CONFIGS)}")
    on_gpu = args.resolved_device == "cuda"
    if not on_gpu:
        skip.update(GPU_ONLY)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or str(Path(tmp) / "inductor")
        model_dir = args.model or str(make_tiny_model(args.arch, Path(tmp) / "model", preset=args.preset))
        has_weights = any(Path(model_dir).glob("*.safetensors"))
        load_format = args.load_format or ("auto" if has_weights else "dummy")
        vocab = load_model_arch(model_dir).vocab_size
        prompt_sets = {b: make_prompts(vocab, b, args.prompt_len, args.seed + b) for b in args.batches}
        measured, ran = {}, {}
        for name in CONFIGS:
            if name in skip:
                continue
            if name == "transformers":
                measured[name], ran[name] = run_hf(args, model_dir, prompt_sets)
            else:
                measured[name], ran[name] = run_engine(args, model_dir, load_format, name, prompt_sets)

    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for batch in args.batches:
        row = {"batch": batch, **{name: summarize(m[batch], batch, args.new_tokens) for name, m in measured.items()}}
        for name in ("compiled", "graphs", "compiled+graphs"):
            if name in row and "eager" in row:
                row[f"{name}_vs_eager"] = ratio(row[name], row["eager"])
                row[f"{name}_identical_to_eager"] = measured[name][batch]["tokens"] == measured["eager"][batch]["tokens"]
        for name in ENGINE_CONFIGS:
            if name in row and "transformers" in row:
                row[f"{name}_vs_transformers"] = ratio(row[name], row["transformers"])
        rows.append(row)
    result = {"model": args.model or f"tiny-{args.arch}-{args.preset}", "device": device, "dtype": args.dtype,
              "load_format": load_format, "block_size": args.block_size, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "ran": ran, "rows": rows,
              "measurement": "decode-only: from the step that returns every request's first new token to the step "
                             "that returns the last (transformers: read by a generate streamer)"}

    print(f"{result['model']} on {device}, {args.dtype}: prompts of {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens each, decode-only tokens/s, median of {args.repeats}")
    for name in ENGINE_CONFIGS:
        if name in ran:
            r = ran[name]
            warm = f", warm start {r['warm_start_s']:.1f} s" if "warm_start_s" in r else ""
            print(f"  fs-engine {name:<15}: attention {r['attention_backend']}, CUDA graphs "
                  f"{'captured' if r['cuda_graphs'] else 'off'}, {r['forward']}; start {r['start_s']:.1f} s{warm}; "
                  f"block_size {args.block_size}, load_format {load_format}")
    if not on_gpu:
        print("  (CPU: no CUDA graphs, so 'graphs' and 'compiled+graphs' are left out)")
    elif "graphs" in ran and not ran["graphs"]["cuda_graphs"]:
        print(f"  (the {ran['graphs']['attention_backend']} backend does not support CUDA graphs: "
              f"'graphs' ran eagerly)")
    if "transformers" in ran:
        print(f"  transformers: {ran['transformers']['weights']}; attention {ran['transformers']['attention']}")
    names = [n for n in CONFIGS if n in measured]
    header = "  " + f"{'batch':>5}  " + "  ".join(f"{n + ' tok/s':>18} {'ms/step':>8}" for n in names)
    ratios = [k for k in rows[0] if k.endswith("_vs_eager") or k in ("eager_vs_transformers",
                                                                      "compiled_vs_transformers")]
    print(header + "".join(f"  {k.replace('_vs_', '/'):>15}" for k in ratios))

    for row in rows:
        cells = "  ".join(f"{row[n]['decode_tokens_per_s']:18.1f} {row[n]['ms_per_step']:8.2f}" for n in names)
        same = [k.removesuffix("_identical_to_eager") for k in row if k.endswith("_identical_to_eager") and not row[k]]
        print(f"  {row['batch']:5d}  {cells}" + "".join(f"  {row[k]:14.2f}x" for k in ratios)
              + (f"  tokens differ from eager: {', '.join(same)}" if same else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
