"""turbotalk.adv (Stage 2): notebook parameters = config fields, a papermill run of the chapter on the tiny preset with
steps=2 (phases 4 -> 3 -> 2, records per phase), a run killed with SIGKILL in the middle of a phase's warm-up resumes with
the same losses (the finished phase skipped), missing upstream runs are clear errors naming the commands that make them,
and every timestep / loss / self-compare option on a tiny phase method."""
import json, math, os, signal, subprocess, sys, time
from copy import deepcopy
from dataclasses import fields
from pathlib import Path
import numpy as np, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from turbotalk.core import RunDir, TurboTalkError, load_weights, save_weights
from turbotalk.adv import AdvConfig, AdvMethod, GAN_LOSSES, TIMESTEPS, finished_phases, load_phase, train_adv
from turbotalk.dmd import DMDConfig
from turbotalk.teacher import TeacherConfig, build_teacher

NB = ROOT/'nbs'/'04_adv_distill.ipynb'
L4 = '1,0.75,0.5,0.25'


def _env():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg',
           'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ['WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT']: env.pop(k, None)
    return env

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    "A tiny SynthTalk folder (8 / 1 / 1 clips of 1 s at 32x32), a tiny random teacher run and a stand-in Stage-1 run of it."
    from turbotalk.synthtalk import write_synthtalk
    d = tmp_path_factory.mktemp('synthtalk'); write_synthtalk(d/'data', 10, seed=0, size=32, seconds=1.0, workers=0)
    tc = TeacherConfig(preset='tiny', data=str(d/'data'), size=32, n_frames=4, steps=2, out=str(d/'teacher'))
    RunDir(tc.out).write_config(tc); torch.manual_seed(0); sd = build_teacher(tc).state_dict()
    save_weights(sd, RunDir(tc.out).sub('weights')/'teacher_ema.safetensors')
    RunDir(d/'dmd4').write_config(DMDConfig(teacher=tc.out, data=str(d/'data'), out=str(d/'dmd4'), sigmas=L4))
    save_weights(sd, RunDir(d/'dmd4').sub('weights')/'student_ema.safetensors')
    return d

def _tiny(synth, out, **kw):
    return {**dict(teacher=str(synth/'teacher'), student4=str(synth/'dmd4'), data=str(synth/'data'), steps=2, bs=2,
                   phase_iters='4,10', warm_iters=5, log_every=1, ckpt_every=2, sample_every=2, n_show=1, n_eval=0, cpu=True,
                   out=str(out)), **kw}

def _cli(args:dict, wait=True, log=None):
    cmd = [sys.executable, '-m', 'turbotalk.adv'] + [x for k, v in args.items() for x in (f'--{k}', str(v))]
    if not wait: return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, 'w'))
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

def _rows(out): return [json.loads(l) for l in (Path(out)/'metrics.jsonl').read_text().splitlines()]

def _losses(rows, phase, key):
    "step -> key of phase's rows after that phase's last start event."
    rows = [r for r in rows if r.get('phase') == phase]
    starts = [i for i, r in enumerate(rows) if r.get('event') == 'start']
    return {r['step']: r[key] for r in rows[starts[-1]:] if key in r}


def test_notebook_parameters_equal_config_fields():
    "Parameters = AdvConfig's fields, as papermill parses them; their defaults give AdvConfig()."
    import papermill as pm
    ps = pm.inspect_notebook(str(NB))
    assert list(ps) == [f.name for f in fields(AdvConfig)]
    got = AdvConfig(**{k: eval(p['default']) for k, p in ps.items() if k != 'out'})
    assert got == AdvConfig(), [(f.name, getattr(got, f.name)) for f in fields(got) if getattr(got, f.name) != getattr(AdvConfig(), f.name)]


def test_papermill_tiny_run_writes_records_per_phase(synth, tmp_path):
    "steps=2: phases 3 and 2, each with its checkpoints, weights, loss figure, batch grid and val samples."
    import papermill as pm
    out = tmp_path/'run'; out.mkdir()
    params = {**_tiny(synth, out, phase_iters='2,2', sample_every=2), 'betas': '0.0,0.9'}
    pm.execute_notebook(str(NB), str(out/'04_adv_distill.ipynb'), parameters=params, cwd=str(ROOT), kernel_name='python3', progress_bar=False)
    for n in ('3', '2'):
        for f in (f'weights/{n}/student.safetensors', f'weights/{n}/student_ema.safetensors', f'weights/{n}/disc.safetensors',
                  f'weights/{n}/heads.safetensors', f'checkpoints/{n}/step_000002/progress.json', f'figs/phase{n}_losses.png',
                  f'figs/phase{n}_batch_step000002.png', f'figs/phase{n}_step000002.png', f'samples/phase{n}_step000002_0.mp4'):
            assert (out/f).is_file(), f
    assert not (out/'weights'/'1').exists() and finished_phases(out) == [3, 2]
    cfg = json.loads((out/'config.json').read_text())['config']
    assert (cfg['steps'], cfg['betas'], cfg['phase_iters']) == (2, [0.0, 0.9], '2,2')
    rows, res = _rows(out), json.loads((out/'results.json').read_text())
    for n in ('3', '2'):
        g, d = _losses(rows, n, 'g_loss'), _losses(rows, n, 'd_loss')
        assert sorted(g) == sorted(d) == [1, 2] and np.isfinite(list(g.values()) + list(d.values())).all()
        assert {r['step'] for r in rows if r.get('event') == 'sample' and r.get('phase') == n} == {2}
    assert res['phases']['3']['sigmas'] == [1.0, 0.909091, 0.714286] and res['phases']['2']['sigmas'] == [1.0, 0.833333]  # after shift 5
    assert res['schedules']['4'] == [1.0, 0.75, 0.5, 0.25]
    cmd = (out/'cmd.txt').read_text()
    assert 'papermill nbs/04_adv_distill.ipynb' in cmd and '-p steps 2' in cmd and '-p betas 0.0,0.9' in cmd
    model, sig, c, tc = load_phase(out, 2)
    assert sig == [1.0, 0.833333] and tc.preset == 'tiny'
    w, t = (load_weights(p) for p in (out/'weights'/'2'/'student_ema.safetensors', synth/'dmd4'/'weights'/'student_ema.safetensors'))
    assert any(not torch.equal(w[k], t[k]) for k in t)                 # the student moved away from the Stage-1 student


def test_resume_after_kill_continues_with_same_losses(synth, tmp_path):
    "Killed after phase 2's step-2 checkpoint (inside its 5-iteration warm-up): phase 3 is skipped, phase 2 resumes exactly."
    _cli(_tiny(synth, tmp_path/'straight', n_show=0))
    p = _cli(_tiny(synth, tmp_path/'killed', phase_iters='4,100000', keep=100000, n_show=0), wait=False, log=tmp_path/'killed.log')
    ck = tmp_path/'killed'/'checkpoints'/'2'
    try:
        t0 = time.time()
        while not (ck/'step_000002'/'progress.json').exists():
            if p.poll() is not None or time.time() - t0 > 600:
                pytest.fail('the run ended or stalled before its phase-2 step-2 checkpoint:\n' + (tmp_path/'killed.log').read_text()[-3000:])
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    _cli(_tiny(synth, tmp_path/'killed', n_show=0, resume='true'))
    a, b = _rows(tmp_path/'straight'), _rows(tmp_path/'killed')
    starts = [r for r in b if r.get('event') == 'start']
    assert [r['phase'] for r in starts] == ['3', '2', '2']                # phase 3 was finished: not started again
    k0 = starts[-1]['step']; assert 'checkpoints/2/step_0000' in starts[-1]['resumed_from'] and 2 <= k0 < 10
    for key in ('g_loss', 'd_loss', 'adv_g', 'sc', 'r1', 's_last', 'gap_real_fake'):
        for ph in ('3', '2'):
            x, y = _losses(a, ph, key), _losses(b, ph, key)
            assert y and (ph == '3' or all(k > k0 for k in y))
            np.testing.assert_allclose([y[k] for k in sorted(y)], [x[k] for k in sorted(y)], rtol=1e-5, err_msg=f'{ph} {key}')
    s_last = _losses(a, '2', 's_last')
    assert all(0.714286 <= s_last[k] <= 0.833333 for k in range(1, 6)) and all(abs(s_last[k] - 0.833333) < 1e-6 for k in range(6, 11))   # warm-up 5 (shift 5)
    wa, wb = (load_weights(tmp_path/r/'weights'/'2'/'student_ema.safetensors') for r in ('straight', 'killed'))
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_missing_upstream_names_the_command(synth, tmp_path):
    with pytest.raises(TurboTalkError, match='papermill nbs/03_dmd.ipynb'):
        train_adv(AdvConfig(**_tiny(synth, tmp_path/'x', student4=str(tmp_path/'no_student'))))
    assert not (tmp_path/'x'/'metrics.jsonl').exists()                  # nothing written before the check
    RunDir(tmp_path/'dmd').write_config(DMDConfig(teacher=str(tmp_path/'no_teacher'), out=str(tmp_path/'dmd')))
    save_weights({}, RunDir(tmp_path/'dmd').sub('weights')/'student_ema.safetensors')
    with pytest.raises(TurboTalkError, match='papermill nbs/02b_teacher.ipynb'):
        train_adv(AdvConfig(**_tiny(synth, tmp_path/'x', student4=str(tmp_path/'dmd'), teacher=str(tmp_path/'no_teacher'))))
    with pytest.raises(TurboTalkError, match='was distilled from'):
        train_adv(AdvConfig(**_tiny(synth, tmp_path/'x', teacher=str(tmp_path/'other_teacher'))))
    with pytest.raises(TurboTalkError, match='steps must be in 1..3'):
        train_adv(AdvConfig(**_tiny(synth, tmp_path/'x', steps=4)))


# ---------------------------------------------------------------- options on a tiny phase method (no data, no subprocess)
@pytest.fixture(scope='module')
def tiny():
    from turbotalk.model import TalkingDiT
    from turbotalk.teacher import Denoiser
    torch.manual_seed(0); S0 = Denoiser(TalkingDiT.from_preset('tiny', latent_channels=12)).eval()
    b = dict(ref=torch.rand(2, 3, 16, 16) * 2 - 1, a=torch.randn(2, 4, 3, 8), x=torch.rand(2, 4, 3, 16, 16) * 2 - 1, i=torch.arange(2))   # i keys the draws
    def new(cfg, sig='1,0.5', old=(1., .666667, .333333), prev=True):
        return AdvMethod(deepcopy(S0).requires_grad_(True), deepcopy(S0), deepcopy(S0) if prev else None, sig, old, L4, cfg)
    return new, b

@pytest.mark.parametrize('mode', TIMESTEPS)
def test_timestep_options(tiny, mode):
    new, b = tiny
    for sig, old, lo, hi in (('1,0.5', (1., .666667, .333333), .333333, .5), ('1', (1., .5), .5, 1.)):
        m = new(AdvConfig(timesteps=mode, warm_iters=3, p_ctx=0.0), sig, old)
        lists = [m.plan(k)[0] for k in range(6)]
        assert all(l[0] == 1.0 and all(a > b for a, b in zip(l, l[1:])) for l in lists)
        if mode == 'fixed': assert all(l == m.sigmas for l in lists)
        if mode == 'progressive':
            assert all(lo <= l[-1] <= hi for l in lists[:3]) and all(l == m.sigmas for l in lists[3:])
            assert len(lists[0]) == len(m.sigmas) + (sig == '1')        # the one-step warm-up list is [1, s]
        if mode == 'uniform': assert all(len(l) == len(m.sigmas) for l in lists) and len({tuple(l) for l in lists}) == (6 if sig != '1' else 1)
        gl, glogs = m.g_loss(b, 0)
        assert math.isfinite(gl.item()) and glogs['s_last'] == lists[0][-1]

@pytest.mark.parametrize('kind', list(GAN_LOSSES))
def test_loss_options_at_zero_heads(tiny, kind):
    """Zero-initialised heads give logit 0 everywhere, so each loss takes its value at 0; lambda_sc = 0 removes the term;
    the mismatched-audio pair (d_mismatch) is one more D loss at 0."""
    new, b = tiny
    at0 = dict(r3gan=(math.log(2), math.log(2)), hinge=(0., 2.), ns=(math.log(2), 2 * math.log(2)))[kind]
    for lam in (0.5, 0.0):
        m = new(AdvConfig(loss=kind, lambda_sc=lam, d_mismatch=0.5)); dm = m.cfg.d_mismatch
        (gl, glogs), (dl, dlogs) = m.g_loss(b, 0), m.d_loss(b, 0)
        assert dm > 0 and gl.item() == pytest.approx(at0[0] + lam * math.log(2), abs=1e-6)
        assert dl.item() == pytest.approx(at0[1] * (1 + dm), abs=1e-6) and float(dlogs['gap_real_mis']) == 0
        assert ('sc' in glogs) == (lam > 0) and float(glogs['gap_real_fake']) == 0 and float(dlogs['r1']) == 0
    l = m.logits([m.codec.encode(b['x'])], m.cond(b, m.codec.encode(b['x']), False), torch.full((2,), .5), torch.randn(2, 12, 4, 8, 8))[0]
    assert torch.equal(l.detach(), torch.zeros(2))


def test_lora_discriminator_trains_adapters_and_heads_and_resumes(synth, tmp_path):
    """d_backbone='lora' (phase 3 only): D's trainable parameters are chapter 08's lora_params(4) plus the heads; its
    frozen base stays the phase's start student bit for bit; a phase stopped at its step-2 checkpoint (its exported
    weights removed, as a kill before the export leaves it) resumes to the straight run's losses and weights."""
    import shutil
    from turbotalk.dmd import load_student
    from turbotalk.scale import lora_params
    kw = lambda out, **k: AdvConfig(**_tiny(synth, out, **{**dict(steps=3, phase_iters='4', d_backbone='lora', d_lora_rank=4, n_show=0), **k}))
    m, h = train_adv(kw(tmp_path/'straight'))
    heads = sum(p.numel() for p in m.heads.parameters())
    assert sum(p.numel() for p in m.d_params()) == lora_params(load_student(synth/'dmd4')[0].net, 4) + heads
    disc = load_weights(tmp_path/'straight'/'weights'/'3'/'disc.safetensors')
    assert sum(v.numel() for v in disc.values()) == lora_params(load_student(synth/'dmd4')[0].net, 4)
    s0 = load_weights(synth/'dmd4'/'weights'/'student_ema.safetensors')
    base = {k.replace('.base_layer', ''): v for k, v in m.disc_base.state_dict().items() if 'lora_' not in k}
    assert sorted(base) == sorted(s0) and all(torch.equal(base[k], s0[k]) for k in s0)
    train_adv(kw(tmp_path/'stopped', phase_iters='2'))
    shutil.rmtree(tmp_path/'stopped'/'weights'/'3')
    _, h2 = train_adv(kw(tmp_path/'stopped', resume=True))
    assert [r['step'] for r in h2[3]] == [3, 4]
    a, b = _rows(tmp_path/'straight'), _rows(tmp_path/'stopped')
    for key in ('g_loss', 'd_loss', 'r1', 'gap_real_fake'):
        x, y = _losses(a, '3', key), _losses(b, '3', key)
        assert sorted(y) == [3, 4]
        np.testing.assert_allclose([y[k] for k in sorted(y)], [x[k] for k in sorted(y)], rtol=1e-5, err_msg=key)
    for f in ('disc', 'heads', 'student_ema'):
        wa, wb = (load_weights(tmp_path/r/'weights'/'3'/f'{f}.safetensors') for r in ('straight', 'stopped'))
        for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
