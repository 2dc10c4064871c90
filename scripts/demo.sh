#!/usr/bin/env bash
# The main job on the embedded default: generate SynthTalk, then run the chapter notebooks as papermill jobs
# whose executed copies and records land under papermill_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
unset MPLBACKEND   # papermill kernels keep the inline backend, so executed notebooks keep their figures
data=${SYNTHTALK:-data/synthtalk}
runs=${RUNS:-papermill_runs}
pm() { mkdir -p "$(dirname "$2")"; TURBOTALK_CMD="papermill $*" papermill --log-level WARNING "$@"; }  # cmd.txt records it

echo "== 1/5 SynthTalk benchmark -> $data"
[ -f "$data/meta.json" ] || python -m turbotalk.synthtalk --out "$data" --n-clips 500 --seed 0 --split all
python -c "from turbotalk.synthtalk import check_synthtalk as c; c('$data')"   # refuses data an older generator made
echo "== 2/5 data chapter: a clip seen and heard, model-free sync check -> $runs/synthtalk"
pm nbs/01_data.ipynb "$runs/synthtalk/01_data.ipynb" -p data "$data" -p split test -p out "$runs/synthtalk"
python -c "import json; print(json.load(open('$runs/synthtalk/results.json')))"
echo "== 3/5 teacher: train the embedded synth teacher (flow matching, 1800 steps), then score it on the test split"
echo "   (40 steps x 3 CFG; about 25 min of training + 30 min of sampling + held-out TTS speech on a 2-core CPU) -> $runs/teacher"
teacher=$runs/teacher/synth_f8_bs8_lr2e-3_x0_refall_mw4_steps1800_seed0   # the shipped teacher (v1 front end)
# one torch thread: as the committed run (two runs gave the same losses at every step); faster than 2 on a busy 2-core CPU
# the shipped teacher hears absolute log-mels, without augmentation (the level front end is a candidate: see README)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} pm nbs/02b_teacher.ipynb "$teacher/02b_teacher.ipynb" -p data "$data" -p out "$teacher" \
  -p audio_norm none -p aug_gain_db 0.0 -p aug_noise_p 0.0
python -c "
import json; r = json.load(open('$teacher/results.json'))
print('training', r['train']['wall_s'], 's on', r['train']['device'])
for row in r['rows']: print(f\"{row['name']:40s} Sync-corr {row['sync_corr']:.3f}  CSIM-ST {row['csim_st']:.3f}  FID-ST {row['fid_st']:.3f}\")"
echo "== 4/5 evaluation v2: the baseline rows every later table carries (ground truth, copy-the-reference, the undistilled"
echo "   teacher at 1, 3, 4, 6 and 120 NFE, with sample diversity), cached per (data, probes, teacher); the metric checks"
echo "   (about 25 min the first time, a few minutes when the cached rows still match) -> $runs/eval/synthtalk_test32"
ev=$runs/eval/synthtalk_test32; mkdir -p "$ev"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} pm nbs/05_eval.ipynb "$ev/05_eval.ipynb" -p data "$data" -p n_clips 32 \
  -p out "$ev" -p teacher "$teacher"
cat "$ev/compare.md"
echo "== 5/5 Stage 1: DMD of the teacher into a 4-step student, and direct one-step DMD (a baseline of the ablations),"
echo "   each about 15 min on 2 CPU cores, then both in the evaluation v2 table -> $runs/dmd"
dmd1=$runs/dmd/synth_dmd1_seed0; dmd4=$runs/dmd/synth_dmd4_seed0
# resume True: a second make demo continues (or re-exports) the finished runs instead of refusing their checkpoints
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} pm nbs/03_dmd.ipynb "$dmd1/03_dmd.ipynb" -p out "$dmd1" -p teacher "$teacher" -p data "$data" \
  -p eval_cache "$ev" -p sigmas 1 -p resume True
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} pm nbs/03_dmd.ipynb "$dmd4/03_dmd.ipynb" -p out "$dmd4" -p teacher "$teacher" -p data "$data" \
  -p eval_cache "$ev" -p others "$dmd1" -p resume True
cat "$dmd4/compare.md"
