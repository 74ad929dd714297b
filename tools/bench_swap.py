"""Swap latency of one request's KV: ``block_layer`` vs ``block`` vs ``group`` copies, side by side.

For each context length, one request's KV (Llama-3-8B shapes by default: 32 layers, 8 KV heads of 128,
bfloat16, 16-token blocks = 2 MiB per block, 128 KiB per token) is swapped out to the host arena and back
in with each copy granularity, interleaved over ``--repeats`` rounds; medians are reported with the
number of copy calls and the effective bandwidth. Blocks are placed by the block-group allocator
(``--placement contiguous``, what fs-engine does) or scattered as a churned free list would leave them
(``--placement scattered``, what vLLM's allocator does), so both halves of the mechanism can be seen.

    python tools/bench_swap.py                       # CPU: both arenas in host memory
    python tools/bench_swap.py --tokens 1024,4096 --json swap.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256,512,1024,2048,4096,8192", help="context lengths, comma-separated")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--placement", default="contiguous", choices=("contiguous", "scattered"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
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
    print(f"device {name}; KV {layout.block_bytes / 2**20:.2f} MiB per block of {args.block_size} tokens "
          f"({args.layers} layers x {args.kv_heads} kv heads x {args.head_dim}, {args.dtype}); "
          f"placement {args.placement}; median of {args.repeats}")
    print(f"{'tokens':>7} {'MiB':>7} | " + " | ".join(f"{g:^33}" for g in GRANULARITIES))
    print(f"{'':>7} {'':>7} | " + " | ".join(f"{'calls':>7} {'out ms':>7} {'in ms':>7} {'GB/s':>8}" for _ in GRANULARITIES))
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
            row[g] = {"calls": calls[g], "swap_out_ms": round(t_out * 1e3, 3), "swap_in_ms": round(t_in * 1e3, 3),
                      "gb_per_s": round(gbps, 2)}
            cells.append(f"{calls[g]:>7} {t_out * 1e3:>7.2f} {t_in * 1e3:>7.2f} {gbps:>8.2f}")
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
                                               "block_bytes": layout.block_bytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
