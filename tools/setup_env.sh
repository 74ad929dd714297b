#!/usr/bin/env bash
# Creates .venv (once) and installs fs-engine with its test extra into it; sourced by quickstart.sh and test.sh.
# Without an NVIDIA GPU it installs the CPU build torch==2.13.0 first: a plain `torch` requirement would
# otherwise pull several GB of CUDA wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FS_ENGINE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python" -m venv "$venv"
fi
log="$venv/setup.log"
# pip's own chatter goes to a log that is shown only if an install fails
pip_install() {
  if ! "$venv/bin/python" -m pip --disable-pip-version-check install "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[setup] pip install $* failed; full log: $log" >&2
    exit 1
  fi
}

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch with CUDA" >&2
    pip_install torch
  else
    echo "[setup] no GPU: installing the CPU build torch==2.13.0" >&2
    pip_install torch==2.13.0
  fi
fi

# CUDA builds of torch ship Triton; on a CPU-only machine the Triton kernels' tests run in Triton's interpreter,
# so install it there (pinned: the tests patch one interpreter detail, see tests/unit/test_triton_attention.py)
if ! "$venv/bin/python" -c "import triton" 2>/dev/null; then
  echo "[setup] installing triton==3.9.0 (the Triton kernels' tests run in its interpreter on CPU)" >&2
  pip_install triton==3.9.0
fi

# reinstall only when the package metadata changed (the install is editable, code changes need nothing)
stamp="$venv/.fs_engine_installed"
digest="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "[setup] installing fs-engine[test] (editable)" >&2
  pip_install -e "$root[test]"
  echo "$digest" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
