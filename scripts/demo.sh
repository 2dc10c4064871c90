#!/usr/bin/env bash
# The main job on the embedded default: generate SynthTalk, then run the chapter notebooks as papermill jobs
# whose executed copies and records land under papermill_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg
data=${SYNTHTALK:-data/synthtalk}
runs=${RUNS:-papermill_runs}
pm() { mkdir -p "$(dirname "$2")"; TURBOTALK_CMD="papermill $*" papermill --log-level WARNING "$@"; }  # cmd.txt records it

echo "== 1/2 SynthTalk benchmark -> $data"
[ -f "$data/meta.json" ] || python -m turbotalk.synthtalk --out "$data" --n-clips 500 --seed 0 --split all
echo "== 2/2 data chapter: a clip seen and heard, model-free sync check -> $runs/synthtalk"
pm nbs/01_data.ipynb "$runs/synthtalk/01_data.ipynb" -p data "$data" -p split test -p out "$runs/synthtalk"
python -c "import json; print(json.load(open('$runs/synthtalk/results.json')))"
