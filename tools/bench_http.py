"""What the HTTP hop costs: one trace replayed through the ZeroMQ SDK and through the OpenAI HTTP API, side by
side in one run.

Two engines with the same flags start here: ``fs-engine launch`` (replayed with ``bench.driver.run_against_server``:
the SDK, one connection) and ``fs-engine serve`` (``bench.http_driver.run_against_http``: streaming
``/v1/completions`` with token ids, one HTTP connection per request in flight). Rounds alternate between them
(``--rounds``), each replaying the same multi-turn trace (greedy, fixed reply lengths), so both do the same
work; the replies must be identical. Printed per round and as medians: tokens/s, TTFT p50/p95 and the
HTTP/SDK ratios.

    python tools/bench_http.py                                   # tiny qwen3, CPU
    python tools/bench_http.py --conversations 32 --rate 8 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fs_engine.bench.driver import RunResult, run_against_server  # noqa: E402
from fs_engine.bench.http_driver import run_against_http  # noqa: E402
from fs_engine.bench.workload import WorkloadConfig, generate  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402


def start(argv: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    """A server process and the address its ready line names."""
    proc = subprocess.Popen([sys.executable, "-m", "fs_engine", *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if selector.select(300) else ""
    match = re.search(pattern, line)
    if not match:
        proc.kill()
        raise SystemExit(f"{argv[0]} did not start: {line!r}")
    return proc, match.group(1)


def figures(result: RunResult) -> dict[str, float]:
    ttft = sorted(r.token_times[0] - r.sent_s for r in result.records if r.token_times)
    tokens = sum(len(r.token_times) for r in result.records)
    return {"tokens_per_s": tokens / result.duration_s, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_p95_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], "seconds": result.duration_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny qwen3, default preset)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--rate", type=float, default=4.0, help="conversations arriving per second")
    parser.add_argument("--scale", type=float, default=0.1, help="lengths relative to ShareGPT's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("engine_flags", nargs="*", help="flags for both engines, after --")
    args = parser.parse_args()
    model = args.model or str(make_tiny_model("qwen3", Path(tempfile.mkdtemp()) / "qwen3", seed=0, preset="default"))
    trace = generate(WorkloadConfig(num_conversations=args.conversations, request_rate=args.rate, scale=args.scale,
                                    max_context=1024, seed=1))
    launch, address = start(["launch", "--model", model, "--port", "0", *args.engine_flags], r"ready at (tcp://\S+)")
    procs = [launch]
    rows = []
    try:
        serve, url = start(["serve", model, "--port", "0", *args.engine_flags], r"ready at (http://\S+)")
        procs.append(serve)
        for k in range(args.rounds):
            sdk = run_against_server(address, trace, progress=False)
            http = run_against_http(url, trace, progress=False)
            if sdk.replies != http.replies or sdk.rejected or http.rejected:
                raise SystemExit(f"round {k}: the replies differ or turns were rejected "
                                 f"({sdk.rejected[:2]} {http.rejected[:2]})")
            rows.append({"sdk": figures(sdk), "http": figures(http)})
            s, h = rows[-1]["sdk"], rows[-1]["http"]
            print(f"round {k}: tokens/s sdk {s['tokens_per_s']:.1f} http {h['tokens_per_s']:.1f} "
                  f"({h['tokens_per_s'] / s['tokens_per_s']:.3f}x); TTFT p50 sdk {s['ttft_p50_ms']:.0f} ms "
                  f"http {h['ttft_p50_ms']:.0f} ms; p95 {s['ttft_p95_ms']:.0f} / {h['ttft_p95_ms']:.0f} ms", flush=True)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    med = {side: {key: statistics.median(r[side][key] for r in rows) for key in rows[0][side]}
           for side in ("sdk", "http")}
    ratio = {key: med["http"][key] / med["sdk"][key] for key in med["sdk"]}
    print(f"median of {args.rounds}: tokens/s http/sdk {ratio['tokens_per_s']:.3f}x, TTFT p50 http/sdk "
          f"{ratio['ttft_p50_ms']:.3f}x, p95 {ratio['ttft_p95_ms']:.3f}x "
          f"({trace.num_requests} requests a round, replies identical)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rows, "median": med, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
