#!/usr/bin/env bash
# The main job on the embedded default: generate SynthTalk, then run the chapter notebooks as papermill jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg
data=${SYNTHTALK:-data/synthtalk}
[ -f "$data/meta.json" ] || python -m turbotalk.synthtalk --out "$data" --n-clips 500 --seed 0 --split all
