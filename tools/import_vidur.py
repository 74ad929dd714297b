"""Write ``fs_engine/sim/data/vidur_mlp.csv.gz`` and ``vidur_allreduce.csv.gz``: the per-operation medians of
Vidur's published profiles, and its all-reduce times of one machine's GPUs.

    python tools/import_vidur.py [--src ../shared/calibration/vidur] [--out fs_engine/sim/data]

Vidur (Microsoft, MLSys'24, MIT license; repository microsoft/vidur at commit 7d47513, ``data/profiling/``)
profiled every non-attention operation of one decoder layer on A100 80 GB, A40 and H100 for several models,
by token count and tensor-parallel degree. The simulator needs only the medians, so this keeps one row per
(gpu, model, tp, num_tokens) with the shape columns and each operation's median in milliseconds; the
license travels with the data. Its network profiles (``network/<system>/all_reduce.csv``) time NCCL
all-reduces by size and number of GPUs; the tensor-parallel ranks of one engine sit on one machine, so only
the rows with every GPU on one node are kept (``devices_per_node == num_workers``): one row per (system,
num_workers, size in bytes) with the median in milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import shutil
from pathlib import Path

OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
       "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
SHAPE = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")


def _median(row: dict[str, str], op: str) -> str:
    # phi-2 has no post_attention_layernorm (attention and MLP read one norm in parallel): it costs nothing
    value = row.get(f"time_stats.{op}.median")
    return f"{float(value):.5g}" if value else "0"


def _gzip_text(path: Path) -> io.TextIOWrapper:
    """A gzip file to write text to, byte-identical on every run (no timestamp in its header)."""
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), newline="")


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(root.parent / "shared" / "calibration" / "vidur"))
    parser.add_argument("--out", default=str(root / "fs_engine" / "sim" / "data"))
    args = parser.parse_args()
    src, out = Path(args.src), Path(args.out)
    rows = []
    for path in sorted((src / "compute").glob("*/*/*/mlp.csv")):
        gpu, org, model = path.parts[-4:-1]
        for row in csv.DictReader(path.open()):
            rows.append([gpu, f"{org}/{model}", *(row[k] for k in SHAPE), row["num_tensor_parallel_workers"],
                         row["num_tokens"], *(_median(row, op) for op in OPS)])
    out.mkdir(parents=True, exist_ok=True)
    with _gzip_text(out / "vidur_mlp.csv.gz") as f:
        writer = csv.writer(f)
        writer.writerow(["gpu", "model", *SHAPE, "tp", "num_tokens", *(f"{op}_ms" for op in OPS)])
        writer.writerows(sorted(rows, key=lambda r: (r[0], r[1], int(r[8]), int(r[9]))))
    network = []
    for path in sorted((src / "network").glob("*/all_reduce.csv")):
        for row in csv.DictReader(path.open()):
            if row["devices_per_node"] == row["num_workers"]:
                network.append([path.parent.name, int(row["num_workers"]), int(row["size"]),
                                f"{float(row['time_stats.all_reduce.median']):.5g}"])
    with _gzip_text(out / "vidur_allreduce.csv.gz") as f:
        writer = csv.writer(f)
        writer.writerow(["system", "num_workers", "size_bytes", "median_ms"])
        writer.writerows(sorted(network))
    shutil.copy(src / "LICENSE", out / "LICENSE.vidur")
    print(f"wrote {len(rows)} rows to {out / 'vidur_mlp.csv.gz'}, {len(network)} to {out / 'vidur_allreduce.csv.gz'}")


if __name__ == "__main__":
    main()
