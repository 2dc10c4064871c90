#!/usr/bin/env bash
# The main job on the embedded default (make demo): SynthTalk, then every chapter as a papermill job whose executed copy
# and record land under papermill_runs/; finished work whose inputs still match is skipped (scripts/demo.py says how).
#   TEACHER=train make demo    retrain the teacher instead of using the committed weights
#   REDO=dmd4,adv make demo    remake these steps (or REDO=all) whatever their state
#   python scripts/demo.py --plan   what a run would do, running nothing
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
unset MPLBACKEND   # papermill kernels keep the inline backend, so executed notebooks keep their figures
exec python scripts/demo.py "$@"
