"""Swap benchmarks, each measured side by side in one run.

``--scenario copy`` (default): swap latency of one request's KV, ``block_layer`` vs ``block`` vs ``group``.

For each context length, one request's KV (Llama-3-8B shapes by default: 32 layers, 8 KV heads of 128,
bfloat16, 16-token blocks = 2 MiB per block, 128 KiB per token) is swapped out to the host arena and back
in with each copy granularity, interleaved over ``--repeats`` rounds; medians are reported with the
number of copy calls and the effective bandwidth. Blocks are placed by the block-group allocator
(``--placement contiguous``, what fs-engine does) or scattered as a churned free list would leave them
(``--placement scattered``, what vLLM's allocator does), so both halves of the mechanism can be seen.

``--scenario overlap``: median engine step time of a resident decode batch while two long "ballast"
requests take turns at the top priority, so one is swapped out and the other in every few steps; against
the same batch with no swaps, for each ``--mode`` (sync: steps wait for their copies; async: they do not).

``--scenario multiturn``: several multi-turn conversations under priority churn, with the CPU KV reuse store
off and on: bytes swapped out, bytes a valid host copy saved, tokens computed, prefix tokens reused.

``--scenario bandwidth``: the physical ceiling. Pinned host<->device copy bandwidth against copy size (``--sizes``,
64 KiB .. 1 GiB in powers of 4), host-to-device and device-to-host each alone, then both at once on two streams;
median of ``--repeats``. The copies of one measurement are queued behind a short GPU sleep, so the events time the
copy engines, not Python's launch loop; small sizes run many copies back to back and report the time per copy.
The ``copy`` scenario measures the same ceiling at ``--ceiling-size`` (1 GiB on a GPU) and reports each
granularity's bandwidth as a fraction of it. Without a CUDA device both arenas are host memory, so every row is a
host-to-host memcpy (labelled so): a smoke test, not a ceiling.

    python tools/bench_swap.py                       # CPU: both arenas in host memory
    python tools/bench_swap.py --tokens 1024,4096 --json swap.json
    python tools/bench_swap.py --scenario overlap --mode sync,async
    python tools/bench_swap.py --scenario multiturn --mode sync,async
    python tools/bench_swap.py --scenario bandwidth --json bandwidth.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fs_engine.kv.block_groups import BlockGroupAllocator, paired_runs  # noqa: E402
from fs_engine.kv.kv_manager import blocks_for  # noqa: E402
from fs_engine.kv.layout import KVLayout  # noqa: E402
from workers.kv_arena import allocate_host_arena, allocate_kv_arena  # noqa: E402
from workers.swap.copier import GRANULARITIES, KVCopier  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def place_blocks(num_arena_blocks: int, n: int, placement: str, rng: random.Random) -> list[int]:
    if placement == "contiguous":
        return BlockGroupAllocator(num_arena_blocks).allocate(n)
    return rng.sample(range(num_arena_blocks), n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(copier: KVCopier, out_runs, in_runs, device: torch.device) -> tuple[float, float, int]:
    sync(device)
    t0 = time.perf_counter()
    out = copier.swap_out(out_runs)
    sync(device)
    t1 = time.perf_counter()
    into = copier.swap_in(in_runs)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out.calls + into.calls


def parse_size(text: str) -> int:
    """'64K', '4M', '1G' (binary units) or a plain byte count -> bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def format_size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"


DIRECTIONS = ("h2d", "d2h", "both")


class CopyBuffers:
    """Two pinned host buffers and two device buffers of ``max_bytes``: h2d copies host_a -> dev_a, d2h copies
    dev_b -> host_b, so both directions can run at once without sharing memory. Without CUDA the "device" buffers
    are host memory too."""

    def __init__(self, max_bytes: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.device = device
        self.host_a = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=pin)
        self.host_b = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=pin)
        self.dev_a = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        self.dev_b = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        for buf in (self.host_a, self.host_b, self.dev_a, self.dev_b):
            buf.fill_(1)  # touch every page before anything is timed
        self.streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)] if pin else []

    def pairs(self, direction: str, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dst, src) of each concurrent copy."""
        h2d = (self.dev_a[:size], self.host_a[:size])
        d2h = (self.host_b[:size], self.dev_b[:size])
        return {"h2d": [h2d], "d2h": [d2h], "both": [h2d, d2h]}[direction]


def time_copies_cuda(bufs: CopyBuffers, pairs, inner: int) -> list[float]:
    """Seconds per copy of each concurrent copy stream, timed by events from one common start."""
    main = torch.cuda.current_stream(bufs.device)
    torch.cuda.synchronize(bufs.device)
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time: every copy is queued before the start event fires
    start = torch.cuda.Event(enable_timing=True)
    start.record(main)
    ends = []
    for stream, (dst, src) in zip(bufs.streams, pairs):
        stream.wait_event(start)
        with torch.cuda.stream(stream):
            for _ in range(inner):
                dst.copy_(src, non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            ends.append(end)
    torch.cuda.synchronize(bufs.device)
    return [start.elapsed_time(end) / 1e3 / inner for end in ends]


def time_copies_host(pairs, inner: int) -> list[float]:
    """Host-to-host stand-in: one thread per concurrent copy, wall time from a common start."""
    barrier = threading.Barrier(len(pairs) + 1)
    seconds = [0.0] * len(pairs)

    def copy(i: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        barrier.wait()
        for _ in range(inner):
            dst.copy_(src)
        seconds[i] = (time.perf_counter() - start) / inner

    threads = [threading.Thread(target=copy, args=(i, dst, src)) for i, (dst, src) in enumerate(pairs)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return seconds


def measure_bandwidth(bufs: CopyBuffers, size: int, direction: str, repeats: int) -> dict:
    """Median over ``repeats`` (after one warm-up) of the per-copy time of each direction in ``direction``."""
    inner = max(1, min(64, (256 << 20) // size))  # small copies: many back to back, so timer resolution is no issue
    pairs = bufs.pairs(direction, size)
    runs = []
    for _ in range(repeats + 1):
        if bufs.device.type == "cuda":
            runs.append(time_copies_cuda(bufs, pairs, inner))
        else:
            runs.append(time_copies_host(pairs, inner))
    runs = runs[1:]
    names = ["h2d", "d2h"] if direction == "both" else [direction]
    per_copy = {name: statistics.median(r[i] for r in runs) for i, name in enumerate(names)}
    result = {f"{name}_gb_per_s": round(size / s / 1e9, 2) for name, s in per_copy.items()}
    if direction == "both":  # aggregate: both copies' bytes over the slower one's time
        result["gb_per_s"] = round(2 * size / max(per_copy.values()) / 1e9, 2)
    else:
        result["gb_per_s"] = result.pop(f"{direction}_gb_per_s")
        result["us_per_copy"] = round(per_copy[direction] * 1e6, 2)
    return result


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, pinned host memory"
    return f"cpu ({torch.get_num_threads()} threads), NO CUDA DEVICE: host->host memcpy, not PCIe"


def measure_ceiling(device: torch.device, size: int, repeats: int) -> dict:
    """Host->device and device->host GB/s of ``size``-byte copies: what a swap of that size could reach at best."""
    bufs = CopyBuffers(size, device)
    ceiling = {"bytes": size, "h2d_gb_per_s": measure_bandwidth(bufs, size, "h2d", repeats)["gb_per_s"],
               "d2h_gb_per_s": measure_bandwidth(bufs, size, "d2h", repeats)["gb_per_s"],
               "kind": "pinned host<->device" if device.type == "cuda" else "host->host memcpy (no CUDA device)"}
    del bufs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ceiling


def scenario_bandwidth(args) -> dict:
    device = resolve_device(args)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    bufs = CopyBuffers(max(sizes), device)
    print(f"copy bandwidth on {device_label(device)}; median of {args.repeats}; "
          f"'both' = h2d and d2h at once on two {'streams' if device.type == 'cuda' else 'threads'}")
    print(f"{'size':>9} | {'h2d GB/s':>9} {'us/copy':>9} | {'d2h GB/s':>9} {'us/copy':>9} | "
          f"{'both GB/s':>9} {'(h2d':>7} {'d2h)':>7}")
    rows = []
    for size in sizes:
        row = {"bytes": size, **{d: measure_bandwidth(bufs, size, d, args.repeats) for d in DIRECTIONS}}
        rows.append(row)
        h2d, d2h, both = row["h2d"], row["d2h"], row["both"]
        print(f"{format_size(size):>9} | {h2d['gb_per_s']:>9.2f} {h2d['us_per_copy']:>9.1f} | "
              f"{d2h['gb_per_s']:>9.2f} {d2h['us_per_copy']:>9.1f} | {both['gb_per_s']:>9.2f} "
              f"{both['h2d_gb_per_s']:>7.2f} {both['d2h_gb_per_s']:>7.2f}")
    largest = rows[-1]
    ceiling = {"bytes": largest["bytes"], "h2d_gb_per_s": largest["h2d"]["gb_per_s"],
               "d2h_gb_per_s": largest["d2h"]["gb_per_s"], "both_gb_per_s": largest["both"]["gb_per_s"]}
    print(f"ceiling at {format_size(ceiling['bytes'])}: h2d {ceiling['h2d_gb_per_s']:.2f} GB/s, "
          f"d2h {ceiling['d2h_gb_per_s']:.2f} GB/s, both at once {ceiling['both_gb_per_s']:.2f} GB/s")
    return {"device": device_label(device), "host_to_host": device.type != "cuda", "rows": rows, "ceiling": ceiling}


def resolve_device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(args.device)


def engine_model(args) -> str:
    if args.model:
        return args.model
    from fs_engine.tiny_model import make_tiny_model

    return str(make_tiny_model("qwen3", Path(args.workdir) / "model", preset="default"))


def scenario_overlap(args) -> dict:
    from fs_engine import LLMEngine, SamplingParams

    model = engine_model(args)
    results = {}
    decode = SamplingParams(max_tokens=args.steps + 40, temperature=0, ignore_eos=True)  # outlives the measurement
    rng = random.Random(0)
    ballast = [[rng.randrange(1000) for _ in range(args.ballast_tokens)] for _ in range(2)]
    for label, mode, churn in [("no swaps", "sync", False)] + [(f"{m} swaps", m, True) for m in args.mode.split(",")]:
        # room for the batch and one ballast request, not two: every churn preempts one and resumes the other
        per_ballast = blocks_for(args.ballast_tokens + args.steps + 40, 16)
        per_resident = blocks_for(64 + args.steps + 40, 16)
        engine = LLMEngine(model, policy="priority", swap_mode=mode, block_size=16, max_num_seqs=args.batch + 2,
                           load_format=args.load_format, dtype=args.engine_dtype, compile=args.compile,
                           num_gpu_blocks=args.batch * per_resident + per_ballast + 4, preemption_cooldown_steps=0)
        for i in range(args.batch):
            engine.add_request(f"r{i}", [rng.randrange(1000) for _ in range(64)], decode, priority=1)
        for i, prompt in enumerate(ballast):
            engine.add_request(f"ballast{i}", prompt, decode, priority=2 + i)
        for _ in range(20):  # warm-up: prefill everything, first preemption
            engine.step()
        times = []
        for step in range(args.steps):
            if churn and step % args.churn_every == 0:
                top = (step // args.churn_every) % 2
                engine.update_priority(f"ballast{top}", 0)
                engine.update_priority(f"ballast{1 - top}", 3)
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        stats = engine.stats()
        results[label] = {"median_step_ms": round(statistics.median(times) * 1e3, 3),
                          "mean_step_ms": round(statistics.mean(times) * 1e3, 3),
                          "swap_outs": stats["num_swap_outs"], "swap_ins": stats["num_swap_ins"],
                          "swap_wait_s": stats["swap_wait_s"]}
        engine.shutdown()
    base = results["no swaps"]["mean_step_ms"]
    print(f"resident batch of {args.batch} decoding, ballast {args.ballast_tokens} tokens x 2, churn every "
          f"{args.churn_every} steps, {args.steps} steps")
    for label, r in results.items():
        print(f"  {label:<14} median {r['median_step_ms']:7.2f} ms  mean {r['mean_step_ms']:7.2f} ms "
              f"({r['mean_step_ms'] / base:5.2f}x)  swaps out/in {r['swap_outs']}/{r['swap_ins']}  "
              f"waited {r['swap_wait_s']:.3f} s")
    return results


def scenario_multiturn(args) -> dict:
    from fs_engine import LLMEngine, SamplingParams
    from fs_engine.engine.multiturn import run_conversations

    model = engine_model(args)
    rng = random.Random(0)
    messages = [[[rng.randrange(1000) for _ in range(rng.randint(20, 80))] for _ in range(args.turns)]
                for _ in range(args.conversations)]
    reply = SamplingParams(max_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
    longest = max(sum(len(m) for m in conv) for conv in messages) + args.turns * args.reply_tokens
    results = {}
    for mode in args.mode.split(","):
        for reuse in (False, True):
            engine = LLMEngine(model, policy="priority", swap_mode=mode, enable_kv_reuse=reuse, block_size=16,
                               load_format=args.load_format, dtype=args.engine_dtype, compile=args.compile,
                               num_gpu_blocks=2 * blocks_for(longest, 16) + 4, preemption_cooldown_steps=1)
            flips = random.Random(1)

            def on_step(e, step):
                if step % 3 == 0:
                    for rid in list(e.scheduler.requests):
                        e.update_priority(rid, flips.randrange(4))

            start = time.perf_counter()
            run_conversations(engine, messages, reply, think_steps=3, on_step=on_step)
            s = engine.stats()
            results[f"{mode}, reuse {'on' if reuse else 'off'}"] = {
                "wall_s": round(time.perf_counter() - start, 3), "swap_out_bytes": s["swap_out_bytes"],
                "reused_swap_out_bytes": s["reused_swap_out_bytes"], "swap_in_bytes": s["swap_in_bytes"],
                "tokens_computed": s["num_batched_tokens"], "reused_prefix_tokens": s["reused_prefix_tokens"],
                "preemptions": s["num_preemptions"], "cpu_store_hits": s["cpu_store_hits"]}
            engine.shutdown()
    print(f"{args.conversations} conversations x {args.turns} turns, replies of {args.reply_tokens} tokens, "
          f"priorities re-drawn every 3 steps")
    for label, r in results.items():
        print(f"  {label:<18} swapped out {r['swap_out_bytes'] / 2**20:8.2f} MiB (saved {r['reused_swap_out_bytes'] / 2**20:7.2f})"
              f"  tokens computed {r['tokens_computed']:6d} (prefix reused {r['reused_prefix_tokens']:5d})"
              f"  preemptions {r['preemptions']:4d}  {r['wall_s']:6.2f} s")
    for mode in args.mode.split(","):
        off, on = results[f"{mode}, reuse off"], results[f"{mode}, reuse on"]
        cut = f"{1 - on['swap_out_bytes'] / off['swap_out_bytes']:.0%}" if off["swap_out_bytes"] else "n/a (no swaps)"
        print(f"  {mode}: reuse cuts swapped-out bytes by {cut} "
              f"and computed tokens by {1 - on['tokens_computed'] / off['tokens_computed']:.0%}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="copy", choices=("copy", "overlap", "multiturn", "bandwidth"))
    ap.add_argument("--mode", default="sync,async", help="swap modes for overlap / multiturn, comma-separated")
    ap.add_argument("--model", help="checkpoint for overlap / multiturn (default: tiny qwen3, default preset)")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                    help="overlap / multiturn: dummy = seeded random weights from config.json alone")
    ap.add_argument("--engine-dtype", default="auto", help="overlap / multiturn: the engine's dtype")
    ap.add_argument("--compile", default="off", choices=("auto", "on", "off"),
                    help="overlap / multiturn: the engine's compile mode (default off: the copies are measured, and a "
                         "compilation per engine would only lengthen the run)")
    ap.add_argument("--workdir", default=None, help="where to build the default model (default: a temp dir)")
    ap.add_argument("--batch", type=int, default=8, help="overlap: resident requests decoding")
    ap.add_argument("--ballast-tokens", type=int, default=1500, help="overlap: context of each swapped request")
    ap.add_argument("--churn-every", type=int, default=4, help="overlap: steps between swaps")
    ap.add_argument("--steps", type=int, default=80, help="overlap: measured steps per configuration")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--tokens", default="256,512,1024,2048,4096,8192", help="context lengths, comma-separated")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--placement", default="contiguous", choices=("contiguous", "scattered"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M,256M,1G",
                    help="bandwidth: copy sizes, comma-separated (K, M, G = KiB, MiB, GiB)")
    ap.add_argument("--ceiling-size", default=None,
                    help="copy: size of the copies that measure the ceiling (default 1G on a GPU; on CPU the "
                         "largest swap of the run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if args.scenario == "bandwidth":
        results = scenario_bandwidth(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"scenario": "bandwidth", **results}, indent=2))
        return
    if args.scenario != "copy":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            args.workdir = args.workdir or tmp
            run = scenario_overlap if args.scenario == "overlap" else scenario_multiturn
            results = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"scenario": args.scenario, "results": results}, indent=2))
        return

    device = resolve_device(args)
    tokens = [int(t) for t in args.tokens.split(",")]
    layout = KVLayout(args.layers, args.block_size, args.kv_heads, args.head_dim, args.dtype)
    max_blocks = blocks_for(max(tokens), args.block_size)
    arena_blocks = 2 * max_blocks  # room for the request plus free space around it
    dtype = DTYPES[args.dtype]
    device_arena = allocate_kv_arena(layout, arena_blocks, dtype, device)
    host_arena = allocate_host_arena(layout, arena_blocks, dtype, pin=device.type == "cuda")
    copiers = {g: KVCopier(device_arena, host_arena, g) for g in GRANULARITIES}
    rng = random.Random(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    # the physical ceiling, measured now on this machine: a swap out then in at full speed each way
    ceiling_size = (parse_size(args.ceiling_size) if args.ceiling_size else
                    1 << 30 if device.type == "cuda" else max_blocks * layout.block_bytes)
    ceiling = measure_ceiling(device, ceiling_size, args.repeats)
    ceiling["out_then_in_gb_per_s"] = round(2 / (1 / ceiling["h2d_gb_per_s"] + 1 / ceiling["d2h_gb_per_s"]), 2)
    print(f"device {name}; KV {layout.block_bytes / 2**20:.2f} MiB per block of {args.block_size} tokens "
          f"({args.layers} layers x {args.kv_heads} kv heads x {args.head_dim}, {args.dtype}); "
          f"placement {args.placement}; median of {args.repeats}")
    print(f"ceiling ({ceiling['kind']}, {format_size(ceiling_size)} copies): h2d {ceiling['h2d_gb_per_s']:.2f} GB/s, "
          f"d2h {ceiling['d2h_gb_per_s']:.2f} GB/s, so out then in at best {ceiling['out_then_in_gb_per_s']:.2f} GB/s "
          f"(the 'ceil' column is GB/s as a fraction of that)")
    print(f"{'tokens':>7} {'MiB':>7} | " + " | ".join(f"{g:^39}" for g in GRANULARITIES))
    print(f"{'':>7} {'':>7} | " + " | ".join(f"{'calls':>7} {'out ms':>7} {'in ms':>7} {'GB/s':>8} {'ceil':>6}"
                                             for _ in GRANULARITIES))
    rows = []
    for n_tokens in tokens:
        n = blocks_for(n_tokens, args.block_size)
        gpu_blocks = place_blocks(arena_blocks, n, args.placement, rng)
        host_blocks = BlockGroupAllocator(arena_blocks).allocate(n)
        out_runs = paired_runs(gpu_blocks, host_blocks)
        in_runs = paired_runs(host_blocks, gpu_blocks)
        times = {g: ([], []) for g in GRANULARITIES}
        calls = {}
        measure(copiers["group"], out_runs, in_runs, device)  # warm-up: page in both arenas
        for _ in range(args.repeats):
            for g in GRANULARITIES:  # interleaved, so drifting load hits every granularity alike
                t_out, t_in, calls[g] = measure(copiers[g], out_runs, in_runs, device)
                times[g][0].append(t_out)
                times[g][1].append(t_in)
        num_bytes = n * layout.block_bytes
        row = {"tokens": n_tokens, "blocks": n, "bytes": num_bytes, "runs": len(out_runs)}
        cells = []
        for g in GRANULARITIES:
            t_out, t_in = statistics.median(times[g][0]), statistics.median(times[g][1])
            gbps = 2 * num_bytes / (t_out + t_in) / 1e9
            fraction = gbps / ceiling["out_then_in_gb_per_s"]
            row[g] = {"calls": calls[g], "swap_out_ms": round(t_out * 1e3, 3), "swap_in_ms": round(t_in * 1e3, 3),
                      "gb_per_s": round(gbps, 2), "fraction_of_ceiling": round(fraction, 3),
                      "out_fraction_of_d2h_ceiling": round(num_bytes / t_out / 1e9 / ceiling["d2h_gb_per_s"], 3),
                      "in_fraction_of_h2d_ceiling": round(num_bytes / t_in / 1e9 / ceiling["h2d_gb_per_s"], 3)}
            cells.append(f"{calls[g]:>7} {t_out * 1e3:>7.2f} {t_in * 1e3:>7.2f} {gbps:>8.2f} {fraction:>6.0%}")
        rows.append(row)
        print(f"{n_tokens:>7} {num_bytes / 2**20:>7.0f} | " + " | ".join(cells))
    for row in rows:
        base = row["block_layer"]
        row["speedup_group_vs_block_layer"] = round(
            (base["swap_out_ms"] + base["swap_in_ms"]) / (row["group"]["swap_out_ms"] + row["group"]["swap_in_ms"]), 2)
    print("group vs block_layer latency: " + ", ".join(f"{r['tokens']}: {r['speedup_group_vs_block_layer']}x"
                                                       for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "placement": args.placement, "dtype": args.dtype,
                                               "block_bytes": layout.block_bytes, "ceiling": ceiling, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
