"""turbotalk.stage: the training machinery. Multi-process runs (accelerate launch on CPU), cross-world resume,
emergency checkpoints, checkpoint hygiene, frozen roles, precision switches, notebook parameters."""
import json, os, shutil, socket, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # runnable without installing the package
from turbotalk.core import RunDir, TurboTalkError, load_weights
from turbotalk.stage import (StageConfig, Method, ToyData, ToyFlow, ToyGAN, VelocityNet, fit, check_world,
                             complete_ckpts, ckpt_root, mlp)

SCRIPT = ROOT/'tests'/'_toy_train.py'


# ---------------------------------------------------------------- helpers
def _env():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1', 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ['WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT']: env.pop(k, None)
    return env

def _port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _train(out, *args, procs=1):
    "Run tests/_toy_train.py on `procs` CPU processes; return {rank: record}."
    if procs == 1: cmd = [sys.executable, str(SCRIPT)]
    else: cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(procs),
                 '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                 '--main_process_port', str(_port()), str(SCRIPT)]
    r = subprocess.run(cmd + [str(out), '--cpu', *map(str, args)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {i: json.loads((Path(out)/f'rank{i}.json').read_text()) for i in range(procs)}

def _losses(hist, keys=('g_loss',)):
    return np.array([[r.get(k, 0.) for k in keys] for r in hist])

def _gan_cfg(out, **kw):
    return StageConfig(**{**dict(max_steps=6, bs=64, lr_g=1e-2, lr_d=1e-2, ema=.9, log_every=1, ckpt_every=3, cpu=True, out=str(out)), **kw})

def _dl(bs=64, n=320): return DataLoader(ToyData(n), batch_size=bs, shuffle=True)


# ---------------------------------------------------------------- multi-process
def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    "Global batch 64 on 1 process == 32 + 32 on 2 processes (sharded data, averaged grads); a 1-process checkpoint resumes on 2."
    one = _train(tmp_path/'one', '--ckpt_every', 4)
    two = _train(tmp_path/'two', '--ckpt_every', 4, procs=2)
    assert (one[0]['num_processes'], two[0]['num_processes'], two[1]['num_processes']) == (1, 2, 2)  # not the silent 1-process trap
    assert two[0]['history'] == two[1]['history']  # every process logs the same process means
    np.testing.assert_allclose(_losses(two[0]['history']), _losses(one[0]['history']), rtol=1e-5)
    for k in range(8):  # step k: process 0 loads the first half of the global batch, process 1 the second
        assert two[0]['indices'][32*k:32*k+32] + two[1]['indices'][32*k:32*k+32] == one[0]['indices'][64*k:64*k+64]
    wa, wb = load_weights(tmp_path/'one'/'weights'/'teacher.safetensors'), load_weights(tmp_path/'two'/'weights'/'teacher.safetensors')
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert [p.name for p in complete_ckpts(tmp_path/'two'/'checkpoints')] == ['step_000004', 'step_000008']
    # resume the 1-process run's step-4 checkpoint (mid-epoch 0) on 2 processes
    (tmp_path/'mix'/'checkpoints').mkdir(parents=True)
    shutil.copytree(tmp_path/'one'/'checkpoints'/'step_000004', tmp_path/'mix'/'checkpoints'/'step_000004')
    mix = _train(tmp_path/'mix', '--resume', procs=2)
    assert [r['step'] for r in mix[0]['history']] == [5, 6, 7, 8]
    np.testing.assert_allclose(_losses(mix[0]['history']), _losses(one[0]['history'][4:]), rtol=1e-5)


def test_two_process_gan_resumes_exactly(tmp_path):
    "G and D roles on 2 processes: D/G turns, collective checkpoints, and exact resume (each process's RNG restored)."
    a = _train(tmp_path/'a', '--method', 'gan', '--steps', 4, '--d_per_g', 2, '--ckpt_every', 2, procs=2)
    h = a[0]['history']
    assert h == a[1]['history'] and a[0]['num_processes'] == 2
    assert ['g_loss' in r for r in h] == [True, False, True, False]
    assert sorted(p.name for p in (tmp_path/'a'/'checkpoints').iterdir()) == ['step_000002', 'step_000004']  # no stray .tmp
    ck = tmp_path/'a'/'checkpoints'/'step_000002'
    assert {'weights.safetensors', 'ema.safetensors', 'optimizer.bin', 'optimizer_1.bin', 'random_states_0.pkl',
            'random_states_1.pkl', 'progress.json'} <= {p.name for p in ck.iterdir()}
    shutil.copytree(ck, tmp_path/'b'/'checkpoints'/'step_000002')
    b = _train(tmp_path/'b', '--method', 'gan', '--steps', 4, '--d_per_g', 2, '--resume', procs=2)
    np.testing.assert_allclose(_losses(b[0]['history'], ('g_loss', 'd_loss')), _losses(h[2:], ('g_loss', 'd_loss')), atol=1e-6)


def test_world_size_trap():
    with pytest.raises(TurboTalkError, match='silently runs one process'): check_world(1, {'WORLD_SIZE': '2'})
    check_world(2, {'WORLD_SIZE': '2'})


# ---------------------------------------------------------------- resume and interruption (in process)
def test_resume_exact_with_grad_accum(tmp_path):
    "6 steps straight == 3 + 3 resumed, with 2 micro-batches per update (the data stream skips 6 batches)."
    def run(out, steps, resume=False, init=0):
        torch.manual_seed(init); m = ToyFlow()
        cfg = StageConfig(max_steps=steps, bs=32, lr_g=1e-2, grad_accum=2, ema=.9, log_every=1, ckpt_every=3, cpu=True, out=str(out), resume=resume)
        return m, fit(m, _dl(32, 160), cfg, RunDir(out))
    m6, h6 = run(tmp_path/'a', 6)
    _, h3 = run(tmp_path/'b', 3)
    m3, h3b = run(tmp_path/'b', 6, resume=True, init=1)
    np.testing.assert_allclose(_losses(h3 + h3b), _losses(h6), atol=1e-6)
    for a, b in zip(m6.parameters(), m3.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ea, eb = (load_weights(tmp_path/d/'weights'/'teacher_ema.safetensors') for d in 'ab')
    for k in ea: torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)


class Boom(ToyGAN):
    "ToyGAN interrupted (KeyboardInterrupt) in its g_loss or d_loss at step `at`, after it drew its noise."
    def __init__(self, at, where): super().__init__(); self.at, self.where = at, where
    def g_loss(self, batch, step):
        out = super().g_loss(batch, step)
        if step == self.at and self.where == 'g': raise KeyboardInterrupt
        return out
    def d_loss(self, batch, step):
        out = super().d_loss(batch, step)
        if step == self.at and self.where == 'd': raise KeyboardInterrupt
        return out


def test_interrupt_saves_emergency_checkpoint_and_resumes_exactly(tmp_path):
    torch.manual_seed(0); h6 = fit(ToyGAN(), _dl(), _gan_cfg(tmp_path/'a'), RunDir(tmp_path/'a'))
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt): fit(Boom(4, 'g'), _dl(), _gan_cfg(tmp_path/'b'), RunDir(tmp_path/'b'))
    assert [p.name for p in complete_ckpts(tmp_path/'b'/'checkpoints')] == ['step_000003', 'step_000004']  # 4 = emergency
    torch.manual_seed(1)
    hb = fit(ToyGAN(), _dl(), _gan_cfg(tmp_path/'b', resume=True), RunDir(tmp_path/'b'))
    assert [r['step'] for r in hb] == [5, 6]
    np.testing.assert_allclose(_losses(hb, ('g_loss', 'd_loss')), _losses(h6[4:], ('g_loss', 'd_loss')), atol=1e-6)


def test_no_emergency_checkpoint_mid_step(tmp_path):
    "Interrupted after the G update but before the D update: the state is half a step, so nothing is written."
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt): fit(Boom(4, 'd'), _dl(), _gan_cfg(tmp_path), RunDir(tmp_path))
    assert [p.name for p in complete_ckpts(tmp_path/'checkpoints')] == ['step_000003']


def test_resume_ignores_incomplete_checkpoints_and_prunes(tmp_path):
    torch.manual_seed(0)
    fit(ToyGAN(), _dl(), _gan_cfg(tmp_path, max_steps=4, ckpt_every=1), RunDir(tmp_path))
    root = ckpt_root(RunDir(tmp_path))
    assert [p.name for p in complete_ckpts(root)] == ['step_000003', 'step_000004'] and not list(root.glob('*.tmp'))
    shutil.copytree(root/'step_000004', root/'step_000009.tmp')                    # a crash mid-write
    shutil.copytree(root/'step_000004', root/'step_000010'); (root/'step_000010'/'progress.json').unlink()  # no progress.json
    h = fit(ToyGAN(), _dl(), _gan_cfg(tmp_path, max_steps=5, ckpt_every=1, resume=True), RunDir(tmp_path))
    assert [r['step'] for r in h] == [5]
    starts = [r for r in RunDir(tmp_path).metrics() if r.get('event') == 'start']
    assert starts[-1]['resumed_from'].endswith('step_000004')


# ---------------------------------------------------------------- roles
class WithFrozen(Method):
    "A student trained against a frozen teacher (with dropout, to check it is kept in eval mode)."
    g_roles = ('student',)
    def __init__(self):
        super().__init__()
        self.student, self.teacher = VelocityNet(16), nn.Sequential(nn.Dropout(.5), VelocityNet(16))
    def g_loss(self, batch, step):
        assert not self.teacher.training and self.student.training
        x, t = batch['x0'], batch['t']
        with torch.no_grad(): target = self.teacher[1](x, t)
        return ((self.student(x, t) - target) ** 2).mean(), {}


def test_frozen_role_is_never_trained_or_saved(tmp_path):
    torch.manual_seed(0); m = WithFrozen()
    t0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    fit(m, _dl(), StageConfig(max_steps=3, bs=64, lr_g=1e-2, ckpt_every=3, cpu=True, out=str(tmp_path)), RunDir(tmp_path))
    for k, v in m.teacher.state_dict().items(): torch.testing.assert_close(v, t0[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    keys = load_weights(complete_ckpts(tmp_path/'checkpoints')[-1]/'weights.safetensors')
    assert keys and all(k.startswith('student.') for k in keys)  # the frozen teacher is not repeated in checkpoints
    assert sorted(p.name for p in (tmp_path/'weights').iterdir()) == ['student.safetensors']


class DEveryOther(ToyGAN):
    "A GAN whose critic only learns on even steps (d_loss returns None otherwise)."
    def d_loss(self, batch, step): return super().d_loss(batch, step) if step % 2 == 0 else None


def test_d_loss_none_skips_the_d_update(tmp_path):
    torch.manual_seed(0); m = DEveryOther(); seen = {}
    from turbotalk.stage import Callback
    class Watch(Callback):
        def on_step_end(self, st): seen[st.step] = torch.cat([p.detach().flatten() for p in st.method.disc.parameters()]).clone()
    h = fit(m, _dl(), StageConfig(max_steps=4, bs=64, lr_d=1e-2, log_every=1, cpu=True, out=str(tmp_path)), RunDir(tmp_path), callbacks=[Watch()])
    assert ['d_loss' in r for r in h] == [True, False, True, False]
    assert torch.equal(seen[1], seen[2]) and not torch.equal(seen[2], seen[3])


# ---------------------------------------------------------------- precision, config, errors
def test_bf16_then_fp32_in_one_process(tmp_path):
    "Each fit owns its Accelerator: switching precision between phases works."
    torch.manual_seed(0); m = ToyGAN()
    h = fit(m, _dl(), _gan_cfg(tmp_path, max_steps=2, ckpt_every=0, mixed_precision='bf16'), RunDir(tmp_path), phase='bf16')
    h += fit(m, _dl(), _gan_cfg(tmp_path, max_steps=2, ckpt_every=0), RunDir(tmp_path), phase='fp32')
    assert len(h) == 4 and all(np.isfinite(r['g_loss']) and np.isfinite(r['d_loss']) for r in h)


def test_loader_batch_must_be_the_global_batch(tmp_path):
    with pytest.raises(TurboTalkError, match='global batch'):
        fit(ToyFlow(), _dl(32), StageConfig(bs=64, cpu=True, out=str(tmp_path)), RunDir(tmp_path))


def test_notebook_parameters_equal_config_fields():
    "The chapter's parameters cell lists exactly StageConfig's fields, in order, as papermill parses it (a comment with '=' hides a line)."
    import papermill as pm
    from dataclasses import fields
    ps = pm.inspect_notebook(str(ROOT/'nbs'/'02a_stage.ipynb'))
    assert list(ps) == [f.name for f in fields(StageConfig)]
    assert StageConfig(betas=eval(ps['betas']['default'])).betas == (0.9, 0.999)   # a comma string: -p betas 0,0.999 works


# ---------------------------------------------------------------- crash safety
@pytest.mark.parametrize('victim', ['weights.safetensors', 'optimizer.bin'])
def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, victim):
    "The last checkpoint has its completion marker but a file cut in half: resume warns, sets it aside, uses the one before."
    torch.manual_seed(0); h6 = fit(ToyFlow(), _dl(), _gan_cfg(tmp_path/'a'), RunDir(tmp_path/'a'))
    torch.manual_seed(0); fit(ToyFlow(), _dl(), _gan_cfg(tmp_path/'b'), RunDir(tmp_path/'b'))
    root = ckpt_root(RunDir(tmp_path/'b'))
    f = root/'step_000006'/victim; f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f'step_000006 is corrupt .*{victim}'):
        h = fit(ToyFlow(), _dl(), _gan_cfg(tmp_path/'b', max_steps=6, resume=True), RunDir(tmp_path/'b'))
    assert [r['step'] for r in h] == [4, 5, 6]
    np.testing.assert_allclose(_losses(h), _losses(h6[3:]), atol=1e-6)
    assert (root/'step_000006.corrupt').is_dir() and [p.name for p in complete_ckpts(root)] == ['step_000003', 'step_000006']


def test_checkpoint_without_checksums_is_still_checked(tmp_path):
    "A checkpoint from before checksums (no sha256 in progress.json) is corrupt when a safetensors file does not load."
    from turbotalk.stage import ckpt_problem
    torch.manual_seed(0); fit(ToyFlow(), _dl(), _gan_cfg(tmp_path, max_steps=3), RunDir(tmp_path))
    ck = ckpt_root(RunDir(tmp_path))/'step_000003'
    prog = json.loads((ck/'progress.json').read_text()); assert set(prog.pop('sha256')) >= {'weights.safetensors', 'optimizer.bin'}
    (ck/'progress.json').write_text(json.dumps(prog))
    assert ckpt_problem(ck) == ''
    f = ck/'ema.safetensors'; f.write_bytes(f.read_bytes()[:100])
    assert 'ema.safetensors' in ckpt_problem(ck)
