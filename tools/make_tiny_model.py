"""Generate a tiny random-weight Hugging Face checkpoint for tests and demos.

Usage (from the repo root, no install needed):

    python tools/make_tiny_model.py --arch qwen3 --out /tmp/tiny-qwen3 [--seed 0]
        [--preset test|default] [--shards N] [--no-tokenizer]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

try:
    from fs_engine.tiny_model import PRESETS, TINY_ARCHS, make_tiny_model
except ImportError:
    # Running from a checkout without `pip install -e .`: use the repo copy.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fs_engine.tiny_model import PRESETS, TINY_ARCHS, make_tiny_model


def _count_parameters(model_dir: Path) -> int:
    """Sum tensor sizes from safetensors headers (tied weights are stored once)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            total += numel
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=TINY_ARCHS)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="test", choices=sorted(PRESETS))
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer files")
    args = parser.parse_args(argv)

    try:
        out = make_tiny_model(
            args.arch,
            args.out,
            seed=args.seed,
            preset=args.preset,
            num_shards=args.shards,
            with_tokenizer=not args.no_tokenizer,
        )
    except ValueError as exc:
        parser.error(str(exc))
    config = json.loads((out / "config.json").read_text())
    print(out)
    print(
        f"arch={args.arch} preset={args.preset} seed={args.seed} "
        f"params={_count_parameters(out):,} vocab={config['vocab_size']} shards={args.shards}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
