"""The main job on the embedded default: SynthTalk -> data chapter -> teacher -> evaluation v2 baselines -> Stage 1 DMD
(4-step student, and direct 1-step DMD as a baseline) -> Stage 2 (4 -> 3 -> 2 -> 1) -> the final table and a sample mp4.

Every step is a papermill job into a run folder under papermill_runs/. A step whose run folder holds its outputs and whose
inputs.json matches (same notebook parameters, same data version and upstream weights: turbotalk.core.run_status) is
skipped, so a second run changes nothing; an interrupted step resumes from its last checkpoint. The teacher is the
committed one unless TEACHER=train. REDO=step[,step] (or all) remakes steps whatever their state.

    python scripts/demo.py [--plan] [--adopt STEP,STEP|all]     (make demo runs it with the project's .venv)
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from turbotalk.core import stamp_run, STAMP  # noqa: E402
from turbotalk.ablate import main_runs, main_params, effective, job_status, run_job, sh as _sh, param_value as _value  # noqa: E402

DATA = os.environ.get('SYNTHTALK', 'data/synthtalk')
RUNS = os.environ.get('RUNS', 'papermill_runs')
M = main_runs(DATA, RUNS); P = main_params(M)   # the run folders and the Stage-1/2 parameters the ablations share (chapter 07)
TEACHER = M['teacher']   # the shipped teacher (v2: level front end + augmentation, seed 1 of three)
EVAL, DMD1, DMD4, ADV = M['eval'], M['dmd1'], M['dmd4'], M['adv']
META = M['meta']   # the data's identity: generator version, seed, sizes (meta.json without timings)
TW, SW = M['tw'], M['sw']
PROBES = 'papermill_runs/eval_probes/st64_seed0/probes/probes.json'
ONE = 'weights/1/student_ema.safetensors'   # a Stage-2 run's one-step student
# the Stage-2 run whose one-step student ships (git add -f): the main job's own adv run
SHIP = ADV
PIPE = f'{RUNS}/pipeline/synth_1step'

# name, notebook, run folder, parameters (what the run is made from), input files, outputs, torch threads, about (2-core CPU)
STEPS = [
    ('data', 'nbs/01_data.ipynb', f'{RUNS}/synthtalk', dict(data=DATA, split='test', out=f'{RUNS}/synthtalk'),
     [META], ['01_data.ipynb', 'results.json'], 1, 'a clip seen and heard, model-free sync check (< 1 min)'),
    ('teacher', 'nbs/02b_teacher.ipynb', TEACHER,
     dict(data=DATA, out=TEACHER, seed=1),
     [META], ['02b_teacher.ipynb', 'results.json', 'weights/teacher_ema.safetensors'], 1,
     'the embedded synth teacher: 1800 steps of flow matching, then scored (about 60 min; TEACHER=train)'),
    ('eval', 'nbs/05_eval.ipynb', EVAL, dict(data=DATA, n_clips=32, out=EVAL, teacher=TEACHER),
     [META, TW, PROBES], ['05_eval.ipynb', 'results.json', 'compare.md'], 1,
     'evaluation v2: the baseline rows every table carries, cached (about 4 min; 25 min without the cache)'),
    ('dmd1', 'nbs/03_dmd.ipynb', DMD1, dict(out=DMD1, **P['dmd1']),
     [META, TW], ['03_dmd.ipynb', 'results.json'], 2, 'Stage 1 baseline: DMD straight to one step (about 20 min)'),
    ('dmd4', 'nbs/03_dmd.ipynb', DMD4, dict(out=DMD4, **P['dmd4']),
     [META, TW], ['03_dmd.ipynb', 'results.json', 'weights/student_ema.safetensors'], 2,
     'Stage 1: DMD of the teacher into the 4-step student (about 20 min)'),
    ('adv', 'nbs/04_adv_distill.ipynb', ADV, dict(out=ADV, **P['adv']),
     [META, TW, SW], ['04_adv_distill.ipynb', 'results.json', 'compare.md', ONE], 2,
     'Stage 2: 4 -> 3 -> 2 -> 1 steps, adversarial with self-compare (about 32 min)'),
    ('pipeline', 'nbs/06_pipeline.ipynb', PIPE, dict(model=SHIP, steps=1, teacher=TEACHER, data=DATA, out=PIPE, threads=2),
     [META, TW, f'{SHIP}/{ONE}', PROBES], ['06_pipeline.ipynb', 'results.json'], 2,
     'the one-step pipeline: 10 s of speech to an mp4 with sound, its seams, real voices, the teacher timed (about 2 min)'),
]
RESUMABLE = {'teacher', 'dmd1', 'dmd4', 'adv'}   # notebooks with a `resume` parameter (training jobs)
# the job machinery (parameters in effect, inputs.json, set-aside checkpoints, the papermill call) is turbotalk.ablate's (chapter 07)


def sh(*cmd, env=None): _sh(*cmd, env=env, cwd=ROOT)


def make_data():
    if not (ROOT/DATA/'meta.json').exists():
        sh(sys.executable, '-m', 'turbotalk.synthtalk', '--out', DATA, '--n-clips', 500, '--seed', 0, '--split', 'all')
    sh(sys.executable, '-c', f'from turbotalk.synthtalk import check_synthtalk as c; c({DATA!r})')  # refuses an older generator's data
    m = json.loads((ROOT/DATA/'meta.json').read_text())
    v = dict(generator_version=m.get('generator_version'), seed=m.get('seed'), counts=m.get('counts'), skipped=m.get('skipped'),
             config={k: x for k, x in m.get('config', {}).items() if k != 'workers'})   # the same data on any machine
    text = json.dumps(v, indent=1, sort_keys=True) + '\n'
    if not (ROOT/META).exists() or (ROOT/META).read_text() != text: (ROOT/META).write_text(text)   # written only when it changes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--plan', action='store_true', help='say what each step would do, run nothing')
    ap.add_argument('--adopt', metavar='STEPS', default='',
                    help="stamp these steps' finished runs (comma list, or all) that have no inputs.json when their config.json "
                         "matches the step's parameters: only for runs known to be made from today's inputs (data, upstream weights)")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    redo = {s for s in os.environ.get('REDO', '').split(',') if s}
    names = [s[0] for s in STEPS]
    if redo - set(names) - {'all'}: sys.exit(f'REDO names unknown steps {sorted(redo - set(names))}; steps: {", ".join(names)}')
    train_teacher = os.environ.get('TEACHER', 'committed') == 'train'
    adopt = set(names) if a.adopt == 'all' else {s for s in a.adopt.split(',') if s}
    if adopt - set(names): sys.exit(f'--adopt names unknown steps {sorted(adopt - set(names))}; steps: {", ".join(names)}')
    t0 = time.time()
    if not a.plan: print(f'== SynthTalk benchmark -> {DATA}'); make_data()
    for i, (name, nb, run, params, files, outs, threads, about) in enumerate(STEPS, 1):
        run, eff = Path(run), effective(nb, params)
        status, why = job_status(run, eff, files, outs, nb)   # a missing input: an upstream step has not made its output yet
        forced = 'all' in redo or name in redo or (name == 'teacher' and train_teacher)
        if name in adopt and status == 'new' and not (run/STAMP).exists() and all((run/o).exists() for o in outs):
            cfg = json.loads((run/'config.json').read_text()).get('config', {}) if (run/'config.json').exists() else {}
            bad = [k for k, v in eff.items() if k in cfg and _value(cfg[k]) != v]
            if not bad: stamp_run(run, eff, files); status, why = 'done', 'adopted: config.json matches the parameters'
            else: why += f'; not adopted, config.json differs in {bad}'
        print(f'== {i}/{len(STEPS)} {name}: {about} -> {run}\n   {status}: {why}' + (' (REDO)' if forced else ''), flush=True)
        if a.plan or a.adopt: continue
        if status == 'done' and not forced: continue
        if name == 'teacher' and not train_teacher:
            if not all((run/o).exists() for o in outs):
                sys.exit(f'the committed teacher is missing from {run}; TEACHER=train make demo trains it (about 60 min)')
            print('   using the committed teacher weights (TEACHER=train make demo retrains it)'); continue
        run_job(nb, run, params, eff, files, fresh=status == 'new' or forced, resume=name in RESUMABLE, threads=threads, cwd=ROOT)
    if a.plan or a.adopt: return
    print(f'== the final table ({ADV}/compare.md): the students of every phase next to the baseline rows')
    print((ROOT/ADV/'compare.md').read_text())
    n = dict((s[0], s[3]) for s in STEPS)['adv']['steps']   # phase n's files are named after its number of steps
    mp4 = sorted((ROOT/ADV/'samples').glob(f'test_phase{n}_*.mp4'))
    if mp4: print(f'a 1-step sample with its sound: {mp4[0].relative_to(ROOT)}')
    try: r = json.loads((ROOT/PIPE/'results.json').read_text())
    except (OSError, ValueError): r = {}
    if isinstance(r, dict) and 'speed' in r:
        sp = r['speed']; t = sp.get('teacher', {})
        print(f"the pipeline ({PIPE}): {sp['seconds']:g} s of speech made in {sp['generate_s']:.2f} s by {sp['model']} "
              f"(RTF {sp['rtf']:.3g})" + (f", {t['generate_s']:.0f} s by the teacher ({sp['speedup']}x)" if t else '')
              + f"; {PIPE}/samples/long_model.mp4")
    print(f'main job done in {(time.time() - t0) / 60:.1f} min')


if __name__ == '__main__':
    main()
