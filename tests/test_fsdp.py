"""turbotalk.stage with shard='fsdp2': 2 CPU processes (accelerate launch --multi_gpu, gloo) with every network sharded by
FSDP2 train each stage (toy, teacher, DMD, adversarial) to the losses of 1 unsharded process with the same global batch
(every per-sample draw is keyed by the sample, never by the process), each process really holds about half of the
weights, and checkpoints (full state dicts) resume at another world size. With meta_init (the default) process 1 builds
every network on the meta device and receives process 0's weights in `fit` (each start event says so: built == [1, 0]);
test_meta_init_only_process0_builds measures the memory that saves and checks the weights and buffers it ends with;
test_sharded_resume_reads_on_process0_only does the same for a resume (process 0 reads the checkpoint, the others
receive their shards).

Tolerances: sharding and splitting the batch change only where the gradient average happens (a reduce-scatter instead of
our all-reduce over per-process means) and how the norm for clipping is summed, so the losses agree to float32
summation-order noise: rtol 1e-5 (measured: 0 to 3e-7 for the toy and the teacher, 9e-8 for DMD, 0 for the
adversarial phases; with the draws keyed by process, as before, DMD differed by up to 0.18 and the phases by 3e-4)."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from turbotalk.core import load_weights
from test_stage import _train, _losses          # the toy launcher (tests/_toy_train.py)
from test_adv import synth, _tiny as _adv_args  # a tiny SynthTalk folder, a random tiny teacher and Stage-1 run
from test_dmd import _tiny as _dmd_args
from test_teacher import _env, _port   # the launch environment and a free port, as test_teacher's 2-process test uses


def _cli(module:str, args:dict, procs:int=1):
    "python -m turbotalk.<module> --k v ... on `procs` CPU processes."
    launch = [sys.executable] if procs == 1 else [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu',
              '--num_processes', str(procs), '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              '--main_process_port', str(_port())]
    cmd = launch + ['-m', f'turbotalk.{module}'] + [x for k, v in args.items() for x in (f'--{k}', str(v))]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

def _rows(out): return [json.loads(l) for l in (Path(out)/'metrics.jsonl').read_text().splitlines()]

def _starts(out, phase=None): return [r for r in _rows(out) if r.get('event') == 'start' and r.get('phase') == phase]

def _by_step(out, key, phase=None):
    "step -> key of `phase`'s rows after its last start event."
    rows = [r for r in _rows(out) if r.get('phase') == phase]
    i = max(i for i, r in enumerate(rows) if r.get('event') == 'start')
    return {r['step']: r[key] for r in rows[i:] if key in r}

def _same(a:dict, b:dict, rtol=1e-5):
    assert sorted(a) == sorted(b) and a, (a, b)
    np.testing.assert_allclose([b[k] for k in sorted(a)], [a[k] for k in sorted(a)], rtol=rtol)

def _check_sharded(start:dict):
    """The start event of a sharded run: 2 processes, each holding about half of the elements, nothing held twice; and
    (meta_init) process 1 built every network on the meta device: none of its parameter elements held data before `fit`."""
    assert start['num_processes'] == 2 and start['shard'] == 'fsdp2', start
    assert all(0.45 < h < 0.55 for h in start['held']) and abs(sum(start['held']) - 1) < 1e-3, start['held']
    assert start['built'] == [1.0, 0.0], start


# ---------------------------------------------------------------- toy (seconds)
@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "The toy flow, 8 steps with checkpoints every 4: 1 process unsharded and 2 processes FSDP2."
    d = tmp_path_factory.mktemp('toy')
    return d, _train(d/'one', '--ckpt_every', 4), _train(d/'two', '--ckpt_every', 4, '--shard', 'fsdp2', procs=2)

def test_toy_fsdp2_matches_one_process(toy):
    d, one, two = toy
    assert two[0]['history'] == two[1]['history']
    _check_sharded(_starts(d/'two')[0])
    np.testing.assert_allclose(_losses(two[0]['history']), _losses(one[0]['history']), rtol=1e-5)
    assert {p.name for p in (d/'two'/'checkpoints'/'step_000004').iterdir()} >= {'weights.safetensors', 'ema.safetensors', 'optim_g.pt'}
    for f in ('teacher', 'teacher_ema'):   # exported weights are ordinary full safetensors
        wa, wb = load_weights(d/'one'/'weights'/f'{f}.safetensors'), load_weights(d/'two'/'weights'/f'{f}.safetensors')
        for k in wa: torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('src,procs,shard', [('two', 1, 'none'), ('one', 2, 'fsdp2')])
def test_toy_checkpoints_resume_across_sharding(toy, tmp_path, src, procs, shard):
    "A sharded 2-process checkpoint resumes in 1 process; an unsharded 1-process one (Accelerate's optimizer.bin) on 2 sharded."
    d, one, _ = toy
    shutil.copytree(d/src/'checkpoints'/'step_000004', tmp_path/'checkpoints'/'step_000004')
    h = _train(tmp_path, '--resume', '--shard', shard, procs=procs)[0]['history']
    assert [r['step'] for r in h] == [5, 6, 7, 8]
    np.testing.assert_allclose(_losses(h), _losses(one[0]['history'][4:]), rtol=1e-5)


# ---------------------------------------------------------------- the stages at the tiny preset
def _teacher_args(synth, out, **kw):
    return {**dict(preset='tiny', data=synth/'data', size=32, n_frames=4, bs=4, max_steps=4, repeats=20, log_every=1,
                   ckpt_every=2, warmup=2, n_show=0, n_eval=0, out=out), **kw}

def test_teacher_fsdp2_matches_one_process_and_resumes_in_one(synth, tmp_path):
    "The teacher's noise is keyed per sample, so 2 sharded processes == 1 process; the step-2 checkpoint resumes in 1."
    _cli('teacher', _teacher_args(synth, tmp_path/'one'))
    _cli('teacher', _teacher_args(synth, tmp_path/'two', shard='fsdp2'), procs=2)
    _check_sharded(_starts(tmp_path/'two')[0])
    one = _by_step(tmp_path/'one', 'g_loss')
    _same(one, _by_step(tmp_path/'two', 'g_loss'))
    shutil.copytree(tmp_path/'two'/'checkpoints'/'step_000002', tmp_path/'mix'/'checkpoints'/'step_000002')
    _cli('teacher', _teacher_args(synth, tmp_path/'mix', resume='true'))
    assert _starts(tmp_path/'mix')[-1]['num_processes'] == 1
    _same({k: v for k, v in one.items() if k > 2}, _by_step(tmp_path/'mix', 'g_loss'))

def test_dmd_fsdp2_matches_one_process(synth, tmp_path):
    """DMD's three networks (frozen real score sharded too) with samples during training, after a warm start on teacher
    ODE pairs (with meta_init only process 0 can run the teacher: it makes and caches the pairs, process 1 reads them).
    Its draws are keyed per sample (dmd.sample_rngs), so 2 sharded processes train to the losses of 1 process."""
    a = lambda out, **kw: {**_dmd_args(synth, out), 'max_steps': 4, 'sample_every': 2, 'warm_pairs': 4, 'warm_steps': 2, **kw}
    _cli('dmd', a(tmp_path/'one'))
    _cli('dmd', a(tmp_path/'fsdp', shard='fsdp2'), procs=2)
    for ph in ('warm', None): _check_sharded(_starts(tmp_path/'fsdp', ph)[0])
    _same(_by_step(tmp_path/'one', 'g_loss', 'warm'), _by_step(tmp_path/'fsdp', 'g_loss', 'warm'))
    for k in ('g_loss', 'fake_loss'): _same(_by_step(tmp_path/'one', k), _by_step(tmp_path/'fsdp', k))
    assert sorted(p.name for p in (tmp_path/'fsdp'/'samples').glob('*.mp4')) == ['train_step000002_0.mp4', 'train_step000004_0.mp4']

def test_adv_fsdp2_matches_one_process(synth, tmp_path):
    """Two adversarial phases (3 -> 2 steps), discriminator and frozen reference sharded; reference: 1 process. (d_mismatch,
    off here, pairs clips with audio within each process's slice of the batch, so with it on the runs would differ.)"""
    a = lambda out, **kw: {**_adv_args(synth, out), 'phase_iters': '2,2', **kw}
    _cli('adv', a(tmp_path/'one'))
    _cli('adv', a(tmp_path/'fsdp', shard='fsdp2'), procs=2)
    for ph in ('3', '2'):
        _check_sharded(_starts(tmp_path/'fsdp', ph)[0])
        for k in ('g_loss', 'd_loss'): _same(_by_step(tmp_path/'one', k, ph), _by_step(tmp_path/'fsdp', k, ph))


# ---------------------------------------------------------------- initialisation from process 0 (meta_init)
def _launch(script:str, out, *args, env=None) -> dict:
    "tests/<script> <out> <args> on 2 CPU processes (`env`: added to the launch environment): {rank: the record it wrote}."
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_port()),
           str(ROOT/'tests'/script), str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {i: json.loads((Path(out)/f'rank{i}.json').read_text()) for i in (0, 1)}

def _meta_run(out, meta_init:str) -> dict: return _launch('_meta_init.py', out, '--meta_init', meta_init)

def test_meta_init_only_process0_builds(tmp_path):
    """Two TalkingDiT denoisers (186 MB of float32 weights; one trained with an EMA, one frozen). meta_init: process 1
    builds on the meta device, adds almost no memory (measured: 7 MB) and peaks at its shards (~93 MB of weights + ~47 MB
    of EMA shadow: 154 MB), while process 0 builds in full (197 MB); without meta_init process 1 builds in full too and
    peaks higher (357 MB). After `setup` every process holds the weights, the EMA shadows and every buffer (Wan's rotary
    tables are not persistent, so no state dict carries them) of a model built on the CPU from process 0's seed."""
    on, off = _meta_run(tmp_path/'on', 'true'), _meta_run(tmp_path/'off', 'false')
    mb = on[0]['model_mb']
    assert (on[0]['meta_before'], on[1]['meta_before'], off[1]['meta_before']) == (0.0, 1.0, 0.0)
    assert on[1]['build_mb'] < 0.1 * mb and on[0]['build_mb'] > 0.9 * mb and off[1]['build_mb'] > 0.9 * mb, (on, off)
    assert on[1]['setup_peak_mb'] < off[1]['setup_peak_mb'] - 0.5 * mb, (on[1], off[1])
    assert on[1]['setup_peak_mb'] < 1.0 * mb   # its shards (half of the weights and of the EMA) and a tensor in flight
    for rec in (*on.values(), *off.values()):
        assert rec['buffers'] and all(rec['buffers'].values()), rec['buffers']
        assert 'student.net.rope.freqs_cos' in rec['buffers'] and 'teacher.a_mean' in rec['buffers']
        assert rec['weights'] and rec['ema'] and rec['ema_buffers'], rec
        assert abs(rec['local_mb'] - mb / 2) < 0.01 * mb
    assert _starts(tmp_path/'on')[0]['built'] == [1.0, 0.0] and _starts(tmp_path/'off')[0]['built'] == [1.0, 1.0]


# ---------------------------------------------------------------- resume: only process 0 reads the checkpoint
MMAP = {'MALLOC_MMAP_THRESHOLD_': '65536'}   # glibc: every tensor in its own mapping, returned at free (RSS = what is live)

def test_sharded_resume_reads_on_process0_only(tmp_path):
    """A wide toy flow (50 MB of weights; its checkpoint: weights, EMA and AdamW states, 200 MB) on 2 FSDP2 processes,
    4 steps; then its step-2 and step-4 checkpoints in a new run, the step-4 one corrupt, resumed on 2 processes. Process 0
    alone hashes the files, chooses step 2 for both and reads it; process 1 reads no weights, EMA or optimiser file and
    receives its shards (broadcast_from_rank0), so its memory peak during `resume_ckpt` stays below process 0's by more
    than the weights. Measured (MB added at the peak, process 0 / 1): 192 / 93 (process 1: its AdamW shards, their zero
    gradients from torch's optimiser-state init and one full tensor in flight); before, when every process read the
    checkpoint: 200 / 200. Steps 3 and 4 then repeat the uninterrupted run's losses."""
    a = _launch('_resume_mem.py', tmp_path/'a')
    root = tmp_path/'b'/'checkpoints'
    for s in ('step_000002', 'step_000004'): shutil.copytree(tmp_path/'a'/'checkpoints'/s, root/s)
    (root/'step_000004'/'ema.safetensors').write_bytes(b'cut short')   # both processes must resume from step 2
    b = _launch('_resume_mem.py', tmp_path/'b', '--resume', env=MMAP)
    assert b[0]['history'] == b[1]['history'] and [r['step'] for r in b[0]['history']] == [3, 4]
    np.testing.assert_allclose(_losses(b[0]['history']), _losses(a[0]['history'][2:]), rtol=1e-6)
    assert (root/'step_000004.corrupt').is_dir() and _starts(tmp_path/'b')[-1]['resumed_from'].endswith('step_000002')
    big = {'weights.safetensors', 'ema.safetensors', 'optim_g.pt'}
    assert big <= {f for how, f in b[0]['read'] if how == 'read'} and big <= {f for how, f in b[0]['read'] if how == 'hash'}
    assert not big & {f for _, f in b[1]['read']} and not [f for how, f in b[1]['read'] if how == 'hash'], b[1]['read']
    mb = b[0]['model_mb']
    assert b[1]['resume_mb'] < b[0]['resume_mb'] - mb, (b[0]['resume_mb'], b[1]['resume_mb'], mb)

# ---------------------------------------------------------------- LoRA critic / discriminator (adapters sharded with their base)
def test_lora_fsdp2_matches_one_process_and_resumes_in_one(synth, tmp_path):
    """DMD with a LoRA fake score (fake_lora: adapters on the sharded teacher) and one adversarial phase with a LoRA
    discriminator (d_backbone='lora'): 2 sharded processes train to the losses of 1 process and export the same full
    adapters; DMD's sharded step-2 checkpoint (full adapter tensors) resumes in 1 process."""
    a = lambda out, **kw: {**_dmd_args(synth, out), 'max_steps': 4, 'n_show': 0, 'fake_lora': 4, **kw}
    _cli('dmd', a(tmp_path/'one'))
    _cli('dmd', a(tmp_path/'fsdp', shard='fsdp2'), procs=2)
    _check_sharded(_starts(tmp_path/'fsdp')[0])
    for k in ('g_loss', 'fake_loss'): _same(_by_step(tmp_path/'one', k), _by_step(tmp_path/'fsdp', k))
    wa, wb = (load_weights(tmp_path/r/'weights'/'fake.safetensors') for r in ('one', 'fsdp'))
    assert sorted(wa) == sorted(wb)
    for k in wa: torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=2e-5)   # Adam: near-zero grads, their summation-order noise scaled up (measured 3e-6 to 7e-6)
    shutil.copytree(tmp_path/'fsdp'/'checkpoints'/'step_000002', tmp_path/'mix'/'checkpoints'/'step_000002')
    _cli('dmd', a(tmp_path/'mix', resume='true'))
    _same({k: v for k, v in _by_step(tmp_path/'one', 'fake_loss').items() if k > 2}, _by_step(tmp_path/'mix', 'fake_loss'))
    b = lambda out, **kw: {**_adv_args(synth, out), 'steps': 3, 'phase_iters': '2', 'd_backbone': 'lora', 'd_lora_rank': 4, 'n_show': 0, **kw}
    _cli('adv', b(tmp_path/'adv_one'))
    _cli('adv', b(tmp_path/'adv_fsdp', shard='fsdp2'), procs=2)
    _check_sharded(_starts(tmp_path/'adv_fsdp', '3')[0])
    for k in ('g_loss', 'd_loss'): _same(_by_step(tmp_path/'adv_one', k, '3'), _by_step(tmp_path/'adv_fsdp', k, '3'))
