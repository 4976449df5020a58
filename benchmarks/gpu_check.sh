#!/usr/bin/env bash
# The device check of a CUDA machine (issue 16): one command, under 10 minutes on one GPU.
#
#   benchmarks/gpu_check.sh [--out DIR] [--quick] [--skip-pytest] [--budget-s SECONDS]
#
# Runs pytest -m cuda, the projector and memory benchmarks on CUDA (with the paper-sized 3D
# memory curve), `fbsem plan` on data/paper.yaml and the first stages of a cut paper profile
# timed against its forecast; writes DIR/gpu_check.json (default
# benchmarks/results/gpu_check/) with the machine info and each part's status (ran / failed /
# skipped, with the reason) and results. Without CUDA the CUDA parts are skipped, saying so.
# Python: $PYTHON, else the repository's .venv, else python3. Exit status: 0 when no part
# failed, 1 when one did, 2 for bad arguments.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
cd "$root"
exec "$py" "$here/gpu_check.py" "$@"
