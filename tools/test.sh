#!/usr/bin/env bash
# Set up (first run only) and run the test suite; extra arguments go to pytest (e.g. -k parity, -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$root"
exec python -m pytest -q "$@"
