#!/usr/bin/env bash
# Stages 1-7 of MechaRule for one task and one analysed model: a thin wrapper around
# lib/pipeline/run.py, which holds the stage list, the presets, the skip/force logic and the timings.
#
#   bash _run_pipeline.sh <task> <model> [options]        (bash _run_pipeline.sh --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-.env/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || true)"
[ -n "$PY" ] || { echo "_run_pipeline.sh: error: no Python found (run setup.sh or set PYTHON)" >&2; exit 2; }
export PYTHON="$PY"
exec "$PY" -m lib.pipeline.run "$@"
