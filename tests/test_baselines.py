"""Baseline rows (turbotalk.baselines): computed once and read from the cache, remade when what they depend on changes;
copy-the-reference cannot score well; the teacher samplers count their NFE and honour the diversity seeds."""
import json, shutil
from pathlib import Path
import pytest, torch
import turbotalk.baselines as B
from turbotalk.synthtalk import write_synthtalk
from turbotalk.core import SHIPPED_TEACHER

TEACHER = Path(__file__).resolve().parent.parent/SHIPPED_TEACHER
SMALL = dict(n_clips=3, n_frames=16, bs=3, div_seeds=2, div_clips=2, div_frames=8)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('st')
    for s in ('val', 'test'): write_synthtalk(d, 3, seed=11, split=s, workers=1)
    return d


def test_rows_are_cached_and_remade_when_the_data_changes(data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    samplers = (B.Sampler('ground truth', 'gt'), B.Sampler('copy reference', 'copy_ref'))
    logs = []
    rows = B.baseline_rows(TEACHER, data, tmp_path, samplers=samplers, log=logs.append, **SMALL)
    assert [r['name'] for r in rows] == ['ground truth', 'copy reference'] and all('evaluated' in l for l in logs)
    gt, cp = rows
    # a frozen video: Sync-corr 0 on every clip (never missing), no motion, no diversity, far from the real clips
    assert (cp['sync_corr'], cp['n_sync_undefined'], cp['flicker_rel'], cp['div_pix'], cp['div_pose']) == (0.0, 3, 0.0, 0.0, 0.0)
    assert gt['sync_corr'] > 0.8 and gt['flicker_rel'] == pytest.approx(1.0) and cp['fid_st'] > 2 * gt['fid_st']
    assert gt['div_pose'] is None and 'one sample per condition' in gt['notes']

    def boom(*a, **k): raise AssertionError('evaluate called although the cache matches')
    monkeypatch.setattr(B, 'evaluate', boom)
    logs.clear()
    again = B.baseline_rows(TEACHER, data, tmp_path, samplers=samplers, log=logs.append, **SMALL)
    assert again == rows and all('cached' in l for l in logs)
    monkeypatch.undo()

    # other settings or other data: a new key, so the rows are evaluated again
    logs.clear(); B.baseline_rows(TEACHER, data, tmp_path, samplers=samplers[:1], log=logs.append, **(SMALL | dict(n_clips=2)))
    assert 'evaluated' in logs[0]
    d2 = tmp_path/'st2'; shutil.copytree(data, d2)
    k1 = B.cache_key(samplers[0], data, B.default_probes_dir(), TEACHER, {})
    (d2/'test'/sorted(p.name for p in (d2/'test').glob('*.json'))[0]).write_text('{}')  # a changed sidecar
    assert B.cache_key(samplers[0], d2, B.default_probes_dir(), TEACHER, {})['digest'] != k1['digest']

    # a half-written cache file is recomputed, not trusted
    p = tmp_path/'baselines'/'copy_reference.json'; p.write_text(p.read_text()[:50])
    logs.clear(); B.baseline_rows(TEACHER, data, tmp_path, samplers=samplers[1:], log=logs.append, **SMALL)
    assert 'evaluated' in logs[0] and json.loads(p.read_text())['row']['sync_corr'] == 0.0


def test_teacher_key_follows_its_weights(data, tmp_path):
    t2 = tmp_path/'teacher'; shutil.copytree(TEACHER, t2, ignore=shutil.ignore_patterns('samples', 'figs', '*.ipynb'))
    (t2/'weights'/'teacher.safetensors').write_bytes(b'raw weights: not what the teacher is sampled with')
    s, probes = B.Sampler('teacher 1 step', steps=1, cfg=False), B.default_probes_dir()
    k1 = B.cache_key(s, data, probes, TEACHER, {})
    assert B.cache_key(s, data, probes, t2, {})['digest'] == k1['digest']            # same config and EMA weights, same key
    w = t2/'weights'/'teacher_ema.safetensors'; b = bytearray(w.read_bytes()); b[-1] ^= 1; w.write_bytes(bytes(b))
    assert B.cache_key(s, data, probes, t2, {})['digest'] != k1['digest']            # one flipped bit: remade
    assert B.cache_key(B.Sampler('copy', 'copy_ref'), data, probes, t2, {})['teacher'] is None   # no teacher in it


def test_teacher_sampler_counts_nfe_and_honours_the_seed(data, tmp_path):
    torch.set_num_threads(1)
    from turbotalk.teacher import load_teacher
    model, tcfg = load_teacher(TEACHER)
    s = B.Sampler('teacher 1 step + CFG', steps=1, cfg=True)
    calls = []
    orig = model.forward
    model.forward = lambda *a, **k: calls.append(len(a[0])) or orig(*a, **k)   # samples evaluated per call
    gen = B.sampler_generator(s, model, tcfg)
    from turbotalk.teacher import eval_clips
    ex = eval_clips(data, 'test', 1, seconds=16 / 25)
    b = dict(x=ex['x'], ref=ex['ref'], a=ex['a'])
    v0, v0b, v1 = gen(b | dict(seed=0)), gen(b | dict(seed=0)), gen(b | dict(seed=1))
    assert sum(calls) == 3 * s.nfe * 2                       # 3 calls x 2 chunks of 8 frames x 3 NFE (CFG branches batched)
    assert torch.equal(v0, v0b) and (v0 - v1).abs().mean() > 1e-3 and v0.shape == ex['x'].shape
    row = B.sampler_row(gen, s.name, s.nfe, data, **SMALL)
    assert (row['nfe'], row['speedup']) == (3, 40.0) and row['gen_s_per_clip'] > 0 and row['div_pix'] > 0
