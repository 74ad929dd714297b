"""The serving benchmark and the FastSwitch ablation: ``fs-engine bench`` as a script.

    python tools/bench_serving.py ablate --out bench-out               # tiny default model, CPU, a few minutes
    python tools/bench_serving.py generate --out trace.json --num-conversations 200 --request-rate 2
    python tools/bench_serving.py run --trace trace.json --address tcp://127.0.0.1:5555

See ``fs_engine/bench/cli.py`` (or ``--help``) for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fs_engine.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="bench_serving.py"))
