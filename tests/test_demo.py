"""The main job's bookkeeping (scripts/demo.py): finished work is skipped and a second run changes no file; changed inputs
or parameters make a step run again; a missing committed teacher or an unknown REDO name is a clear error. The jobs
themselves are stood in for by run folders holding their outputs (the chapters' own tests run the notebooks)."""
import hashlib, importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest
from turbotalk.synthtalk import GENERATOR_VERSION

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT/'scripts'/'demo.py'


def _demo_module(monkeypatch, data, runs):
    monkeypatch.setenv('SYNTHTALK', str(data)); monkeypatch.setenv('RUNS', str(runs))
    spec = importlib.util.spec_from_file_location('demo_under_test', DEMO)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m


def _run(env, *args, check=True):
    r = subprocess.run([sys.executable, str(DEMO), *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check: assert r.returncode == 0, r.stdout + r.stderr
    return r


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*')) if p.is_file()}


@pytest.fixture
def finished(tmp_path, monkeypatch):
    "A SynthTalk folder and a run folder per step holding its outputs and a config.json of its parameters."
    data, runs = tmp_path/'st', tmp_path/'runs'
    data.mkdir(); (data/'meta.json').write_text(json.dumps({'generator_version': GENERATOR_VERSION, 'elapsed_s': 1.0}))
    m = _demo_module(monkeypatch, data, runs); m.make_data()         # checks the data, writes version.json
    for name, nb, run, params, files, outs, threads, about in m.STEPS:
        for o in outs:
            p = Path(run)/o; p.parent.mkdir(parents=True, exist_ok=True); p.write_text(f'{name} {o}')
        (Path(run)/'config.json').write_text(json.dumps({'config': params}))
    (Path(m.ADV)/'compare.md').write_text('| sampler | NFE |\n|---|---|\n| TurboTalk 1 step | 1 |\n')
    env = dict(os.environ, SYNTHTALK=str(data), RUNS=str(runs), PYTHONPATH=str(ROOT))
    return m, data, runs, env


def test_second_run_skips_everything_and_changes_nothing(finished):
    m, data, runs, env = finished
    plan = _run(env, '--plan').stdout
    assert plan.count('new: no inputs.json') == len(m.STEPS), plan
    out = _run(env, '--adopt', 'all').stdout
    assert out.count('adopted: config.json matches') == len(m.STEPS), out
    before = _snapshot(runs) | {'data/' + k: v for k, v in _snapshot(data).items()}
    out = _run(env).stdout                                            # "make demo" with everything finished
    assert out.count('done: outputs present, same parameters and inputs') == len(m.STEPS), out
    assert '| TurboTalk 1 step | 1 |' in out and 'main job done' in out
    after = _snapshot(runs) | {'data/' + k: v for k, v in _snapshot(data).items()}
    assert after == before                                            # no file written, none changed


def test_changed_inputs_or_parameters_rerun(finished):
    m, data, runs, env = finished
    cfg = Path(m.DMD4)/'config.json'; c = json.loads(cfg.read_text()); c['config']['eval_cache'] = 'elsewhere'
    cfg.write_text(json.dumps(c))                                     # a run made with other parameters is not adopted
    out = _run(env, '--adopt', 'all').stdout
    assert "not adopted, config.json differs in ['eval_cache']" in out, out
    assert out.count('adopted: config.json matches') == len(m.STEPS) - 1
    v = Path(m.META).read_text()
    (data/'meta.json').write_text(json.dumps({'generator_version': GENERATOR_VERSION, 'elapsed_s': 9.0}))
    m.make_data(); assert Path(m.META).read_text() == v              # timings are not the data
    assert _run(env, '--plan').stdout.count('done: outputs present') == len(m.STEPS) - 1
    (data/'meta.json').write_text(json.dumps({'generator_version': GENERATOR_VERSION, 'config': {'n_clips': 7}}))
    m.make_data()                                                     # other data: every stamped step is made again
    plan = _run(env, '--plan').stdout
    assert plan.count(f'new: input {m.META} changed') == len(m.STEPS) - 1, plan


def test_clear_errors(finished):
    m, data, runs, env = finished
    r = _run(dict(env, REDO='dmd9'), check=False)
    assert r.returncode != 0 and 'REDO names unknown steps' in r.stderr and 'dmd4' in r.stderr
    _run(env, '--adopt', 'all'); (Path(m.TW)).unlink()
    r = _run(env, check=False)
    assert r.returncode != 0 and 'TEACHER=train make demo trains it' in r.stderr, r.stdout + r.stderr


def test_a_step_made_again_starts_in_an_empty_folder(finished, monkeypatch):
    """A step whose inputs changed must not find the earlier record's finished phases, exported weights, scored rows or checkpoints
    (chapter 04 would skip a phase whose weights exist and keep rows already in results.json): they are moved aside, never deleted."""
    import turbotalk.ablate as ab
    m, data, runs, env = finished
    adv = Path(m.ADV); (adv/'weights'/'1').mkdir(parents=True, exist_ok=True); (adv/'weights'/'1'/'student_ema.safetensors').write_bytes(b'old weights')
    (adv/'checkpoints'/'1'/'step_000100').mkdir(parents=True); (adv/'results.json').write_text('{"rows": [{"name": "TurboTalk 1 step"}]}')
    old = _snapshot(adv); seen = []
    monkeypatch.setattr(ab, 'run_notebook', lambda nb, run, *a, **k: seen.append(sorted(p.name for p in Path(run).iterdir())))
    for _ in range(2):                                                # twice: the second keeps the first's stale folder as it is
        ab.run_job('nbs/04_adv_distill.ipynb', adv, {}, {}, fresh=True, resume=True)
    assert seen[0][0] == 'inputs.json' and len(seen[0]) == 2 and seen[0][1].startswith('stale-'), seen
    stale = adv/seen[0][1]
    assert {k: v for k, v in _snapshot(stale).items()} == {k: v for k, v in old.items() if k != 'inputs.json'}   # all of it, unchanged
    assert seen[1] == seen[0]                                         # nothing new to set aside: no second stale folder
    ab.run_job('nbs/04_adv_distill.ipynb', adv, {}, {}, fresh=False, resume=True)   # a resumed job keeps its folder as it is
    assert seen[2] == seen[0]
