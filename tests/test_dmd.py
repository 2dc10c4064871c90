"""turbotalk.dmd (Stage 1): notebook parameters = config fields, a papermill run of the chapter on the tiny preset
(records, diagnostics, exported student that loads back), direct one-step DMD, a run killed with SIGKILL resumes with
the same losses, and a missing teacher is a clear error naming the command that makes it."""
import json, os, signal, subprocess, sys, time
from dataclasses import fields
from pathlib import Path
import numpy as np, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from turbotalk.core import RunDir, TurboTalkError, load_weights, save_weights
from turbotalk.dmd import DMDConfig, load_student, train_dmd
from turbotalk.teacher import TeacherConfig, build_teacher

NB = ROOT/'nbs'/'03_dmd.ipynb'


def _env():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg',
           'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ['WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT']: env.pop(k, None)
    return env

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    "A tiny SynthTalk folder (8 / 1 / 1 clips of 1 s at 32x32) and a tiny random teacher run on it."
    from turbotalk.synthtalk import write_synthtalk
    d = tmp_path_factory.mktemp('synthtalk'); write_synthtalk(d/'data', 10, seed=0, size=32, seconds=1.0, workers=0)
    tc = TeacherConfig(preset='tiny', data=str(d/'data'), size=32, n_frames=4, steps=2, out=str(d/'teacher'))
    RunDir(tc.out).write_config(tc); torch.manual_seed(0)
    save_weights(build_teacher(tc).state_dict(), RunDir(tc.out).sub('weights')/'teacher_ema.safetensors')
    return d

def _tiny(synth, out, **kw):
    return {**dict(teacher=str(synth/'teacher'), data=str(synth/'data'), bs=2, max_steps=6, d_per_g=2, log_every=1, ckpt_every=2,
                   sample_every=3, n_show=1, n_quick=0, n_eval=0, cpu=True, sigmas='1,0.5', out=str(out)), **kw}

def _cli(args:dict, wait=True, log=None):
    cmd = [sys.executable, '-m', 'turbotalk.dmd'] + [x for k, v in args.items() for x in (f'--{k}', str(v))]
    if not wait: return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, 'w'))
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

def _rows(out): return [json.loads(l) for l in (Path(out)/'metrics.jsonl').read_text().splitlines()]

def _losses(rows, key):
    "step -> key of the rows after the last start event."
    starts = [i for i, r in enumerate(rows) if r.get('event') == 'start']
    return {r['step']: r[key] for r in rows[starts[-1]:] if key in r}


def test_notebook_parameters_equal_config_fields():
    "Parameters = DMDConfig's fields (+ others, the table's extra runs), as papermill parses them; defaults give DMDConfig()."
    import papermill as pm
    ps = pm.inspect_notebook(str(NB))
    assert list(ps) == [f.name for f in fields(DMDConfig)] + ['others']
    got = DMDConfig(**{k: eval(p['default']) for k, p in ps.items() if k not in ('out', 'others')})
    assert got == DMDConfig(), [(f.name, getattr(got, f.name)) for f in fields(got) if getattr(got, f.name) != getattr(DMDConfig(), f.name)]


def test_papermill_tiny_run_writes_records(synth, tmp_path):
    import papermill as pm
    out = tmp_path/'run'; out.mkdir()
    params = {**_tiny(synth, out), 'betas': '0.0,0.99'}
    pm.execute_notebook(str(NB), str(out/'03_dmd.ipynb'), parameters=params, cwd=str(ROOT), kernel_name='python3', progress_bar=False)
    for f in ('config.json', 'metrics.jsonl', 'results.json', 'cmd.txt', 'weights/student.safetensors',
              'weights/student_ema.safetensors', 'weights/fake.safetensors', 'figs/loss.png', 'figs/dmd_step000006.png',
              'samples/train_step000006_0.mp4'):
        assert (out/f).is_file(), f
    cfg = json.loads((out/'config.json').read_text())['config']
    assert (cfg['max_steps'], cfg['betas'], cfg['sigmas']) == (6, [0.0, 0.99], '1,0.5')
    rows = _rows(out)
    fake, g = _losses(rows, 'fake_loss'), _losses(rows, 'g_loss')
    assert sorted(fake) == [1, 2, 3, 4, 5, 6] and sorted(g) == [1, 3, 5] and np.isfinite(list(fake.values()) + list(g.values())).all()
    assert {r['step'] for r in rows if r.get('event') == 'sample'} == {3, 6}
    assert 'papermill nbs/03_dmd.ipynb' in (out/'cmd.txt').read_text() and '-p betas 0.0,0.99' in (out/'cmd.txt').read_text()
    model, c, tc = load_student(out)
    assert c.sigmas == '1,0.5' and tc.preset == 'tiny'
    w = load_weights(out/'weights'/'student_ema.safetensors')
    t = load_weights(synth/'teacher'/'weights'/'teacher_ema.safetensors')
    assert any(not torch.equal(w[k], t[k]) for k in t)                 # the student moved away from the teacher


def test_direct_one_step_dmd(synth, tmp_path):
    "sigmas 1: direct one-step DMD, every iteration trains the one step (k = 1)."
    m, hist = train_dmd(DMDConfig(**_tiny(synth, tmp_path/'one', sigmas='1', n_show=0, max_steps=4)))
    ks = [h['k'] for h in hist if 'k' in h]
    assert ks == [1.0, 1.0] and all(np.isfinite(h['fake_loss']) for h in hist)


def test_resume_after_kill_continues_with_same_losses(synth, tmp_path):
    "A run SIGKILLed after its step-4 checkpoint resumes with the straight run's fake-score and student losses."
    _cli(_tiny(synth, tmp_path/'straight', max_steps=30, n_show=0))
    p = _cli(_tiny(synth, tmp_path/'killed', max_steps=100000, keep=100000, n_show=0), wait=False, log=tmp_path/'killed.log')
    ck = tmp_path/'killed'/'checkpoints'
    try:
        t0 = time.time()
        while not (ck/'step_000004'/'progress.json').exists():
            if p.poll() is not None or time.time() - t0 > 600:
                pytest.fail('the run ended or stalled before its step-4 checkpoint:\n' + (tmp_path/'killed.log').read_text()[-3000:])
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    _cli(_tiny(synth, tmp_path/'killed', max_steps=30, n_show=0, resume='true'))
    rows = _rows(tmp_path/'killed'); start = [r for r in rows if r.get('event') == 'start'][-1]
    assert 'checkpoints/step_0000' in start['resumed_from']
    k0 = start['step']; assert 4 <= k0 < 30
    for key in ('fake_loss', 'g_loss', 'dmd_grad'):
        a, b = _losses(_rows(tmp_path/'straight'), key), _losses(rows, key)
        assert b and all(k > k0 for k in b)
        np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(b)], rtol=1e-5)
    wa, wb = (load_weights(tmp_path/r/'weights'/'student_ema.safetensors') for r in ('straight', 'killed'))
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_missing_teacher_names_the_command(synth, tmp_path):
    with pytest.raises(TurboTalkError, match='papermill nbs/02b_teacher.ipynb'):
        train_dmd(DMDConfig(**_tiny(synth, tmp_path/'x', teacher=str(tmp_path/'no_teacher'))))
    assert not (tmp_path/'x'/'metrics.jsonl').exists()   # nothing written before the check


def _no_lora(sd:dict) -> dict: return {k.replace('.base_layer', ''): v for k, v in sd.items() if 'lora_' not in k}

def test_lora_fake_score_trains_adapters_only_and_resumes(synth, tmp_path):
    """fake_lora=4: the fake score's trainable parameters (exported as weights/fake.safetensors) are chapter 08's
    lora_params(4); the teacher it shares stays bit for bit the teacher run's weights; a run stopped at its step-2
    checkpoint resumes to the straight run's losses and weights."""
    from turbotalk.scale import lora_params
    from turbotalk.teacher import load_teacher
    kw = _tiny(synth, tmp_path/'straight', max_steps=4, n_show=0, fake_lora=4)
    m, h = train_dmd(DMDConfig(**kw))
    fake, t = load_weights(tmp_path/'straight'/'weights'/'fake.safetensors'), load_weights(synth/'teacher'/'weights'/'teacher_ema.safetensors')
    assert sum(v.numel() for v in fake.values()) == sum(p.numel() for p in m.d_params()) == lora_params(load_teacher(synth/'teacher')[0].net, 4)
    assert all(float(v.abs().sum()) > 0 for k, v in fake.items() if k.endswith('.B.weight'))      # the adapters moved (B starts at 0)
    base = _no_lora(m.teacher.state_dict()); assert sorted(base) == sorted(t) and all(torch.equal(base[k], t[k]) for k in t)
    train_dmd(DMDConfig(**{**kw, 'out': str(tmp_path/'stopped'), 'max_steps': 2}))
    _, h2 = train_dmd(DMDConfig(**{**kw, 'out': str(tmp_path/'stopped'), 'resume': True}))
    assert [r['step'] for r in h2] == [3, 4]
    for key in ('fake_loss', 'g_loss', 'dmd_grad'):
        a, b = _losses(_rows(tmp_path/'straight'), key), _losses(_rows(tmp_path/'stopped'), key)
        assert b and all(k > 2 for k in b)
        np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(b)], rtol=1e-5)
    for f in ('fake', 'student_ema'):
        wa, wb = (load_weights(tmp_path/r/'weights'/f'{f}.safetensors') for r in ('straight', 'stopped'))
        for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
