#!/usr/bin/env bash
# Quick start: set up (first run only) and generate a few completions with the embedded tiny default model.
# Extra arguments go to `fs-engine generate`, e.g. --model DIR --prompt "Hi" --max-tokens 64.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec fs-engine generate "$@"
