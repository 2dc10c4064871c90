"""SynthTalk: the CLI writes a real-dataset layout, is deterministic from its seed, keeps splits disjoint,
and its mouths follow the audio (model-free sync check on the decoded mp4s)."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from scipy.signal import resample_poly
from turbotalk.core import TurboTalkError
from turbotalk.media import read_video
from turbotalk import synthtalk as st

ROOT = Path(__file__).resolve().parents[1]
PER_FRAME = ('mouth_open', 'mouth_width', 'yaw', 'pitch', 'roll', 'blink', 'mouth_box')
PER_CLIP = ('identity', 'speaker', 'utterance', 'seed', 'split', 'fps', 'sr', 'size')


def cli(*args, check=True):
    "Run `python -m turbotalk.synthtalk ARGS` from the repo root."
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    p = subprocess.run([sys.executable, '-m', 'turbotalk.synthtalk', *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if check: assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope='module')
def ds(tmp_path_factory):
    "A 10-clip dataset (8 train / 1 val / 1 test) written by the CLI with a process pool."
    out = tmp_path_factory.mktemp('st') / 'ds'
    cli('--out', out, '--n-clips', 10, '--seed', 3, '--workers', 2)
    return out


def sidecars(root, split):
    return [json.loads(p.read_text()) for p in sorted((Path(root) / split).glob('*.json'))]


def test_layout_and_sidecars(ds):
    meta = json.loads((ds / 'meta.json').read_text())
    assert meta['counts'] == dict(train=8, val=1, test=1) and meta['skipped'] == [] and meta['seed'] == 3
    assert meta['config']['size'] == 64 and meta['config']['seconds'] == 2.0
    for split, n in meta['counts'].items():
        mp4s, jsons = sorted((ds / split).glob('*.mp4')), sorted((ds / split).glob('*.json'))
        assert len(mp4s) == len(jsons) == n and [p.stem for p in mp4s] == [p.stem for p in jsons]
    gt = sidecars(ds, 'test')[0]
    for k in PER_FRAME: assert len(gt[k]) == 50, k
    for k in PER_CLIP: assert k in gt, k
    assert gt['split'] == 'test' and gt['video'] == gt['clip_id'] + '.mp4'
    assert all(0 <= x <= 1 for x in gt['mouth_open'] + gt['mouth_width'] + gt['blink'])
    assert all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 for x0, y0, x1, y1 in gt['mouth_box'])
    v = read_video(ds / 'test' / gt['video'])
    assert v.frames.shape == (50, 64, 64, 3) and v.fps == 25
    assert abs(len(v.audio) - 32000) < 2048 and np.abs(v.audio).max() > 0.1  # AAC pads the last frame


def test_cli_deterministic(ds, tmp_path):
    "Same seed, different worker count: identical sidecars and identical decoded audio."
    cli('--out', tmp_path / 'again', '--n-clips', 10, '--seed', 3, '--workers', 1)
    for split in ('train', 'val', 'test'):
        assert sidecars(ds, split) == sidecars(tmp_path / 'again', split)
    a, b = (read_video(r / 'test' / 'test_000000.mp4') for r in (ds, tmp_path / 'again'))
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_make_clip_deterministic():
    a, b, c = st.make_clip(11, 'val'), st.make_clip(11, 'val'), st.make_clip(12, 'val')
    np.testing.assert_array_equal(a.audio, b.audio); np.testing.assert_array_equal(a.frames, b.frames)
    assert a.gt == b.gt
    assert a.gt['utterance'] != c.gt['utterance'] and a.gt['identity'] != c.gt['identity']
    assert not np.array_equal(a.audio, c.audio)


def test_splits_disjoint(ds):
    "No identity and no utterance appears in two splits, by construction, even for colliding seeds."
    ids, utts = {}, {}
    for split in st.SPLITS:
        ids[split], utts[split] = set(), set()
        for i in range(150):
            r_id, r_utt, _ = st._streams(st.clip_seed(0, split, i), split)
            ids[split].add(st.sample_identity(r_id, split).key())
            utts[split].add(st.synth_utterance(r_utt, 2.0, split).text)
            r_id, r_utt, _ = st._streams(i, split)  # the same raw seed in every split
            ids[split].add(st.sample_identity(r_id, split).key())
            utts[split].add(st.synth_utterance(r_utt, 2.0, split).text)
        assert len(ids[split]) == 300 and len(utts[split]) > 290
    for a, b in [('train', 'val'), ('train', 'test'), ('val', 'test')]:
        assert not ids[a] & ids[b] and not utts[a] & utts[b]
    # and in the written dataset
    seen = {s: {(json.dumps(g['identity'], sort_keys=True), g['utterance']) for g in sidecars(ds, s)} for s in st.SPLITS}
    for a, b in [('train', 'val'), ('train', 'test'), ('val', 'test')]:
        assert not {x[0] for x in seen[a]} & {x[0] for x in seen[b]}
        assert not {x[1] for x in seen[a]} & {x[1] for x in seen[b]}


def test_sync_check(tmp_path):
    "Decoded mouth area follows the decoded audio's target (r >= 0.9); another clip's audio does not (|r| < 0.2)."
    st.write_synthtalk(tmp_path / 'sc', 16, seed=0, split='test', workers=2)
    res = st.sync_check(tmp_path / 'sc', 'test')
    assert res['n'] == 16 and len(res['r']) == 16
    assert res['r_min'] >= 0.9, res['r']
    assert res['mismatch_abs_mean'] < 0.2, res['mismatch_abs_r']


def test_mouth_targets_any_audio():
    "The target is a function of the audio alone: same speech at another rate or gain gives the same track."
    c = st.make_clip(5, 'test')
    ref = np.array(c.gt['mouth_open'])
    for sr, x in [(22050, resample_poly(c.audio, 441, 320)), (8000, resample_poly(c.audio, 1, 2))]:
        o = st.mouth_targets(x.astype(np.float32) * 0.3, sr=sr, fps=25, n_frames=50)['open']
        assert np.corrcoef(o, ref)[0, 1] > 0.95, sr
    o = st.mouth_targets(c.audio, fps=30)['open']  # other frame rates: length follows the audio
    assert len(o) == 60 and 0 <= o.min() and o.max() <= 1


@pytest.mark.parametrize('args,msg', [
    (['--n-clips', 2, '--size', 65], 'size must be an even integer'),
    (['--n-clips', 0], 'n_clips must be a positive integer'),
    (['--n-clips', 2, '--split', 'dev'], 'invalid choice'),
    (['--n-clips', 2, '--seconds', 0], 'seconds must be in'),
    (['--n-clips', 2, '--workers', -1], 'workers must be >= 0'),
    (['--n-clips', 'many'], "invalid int value"),
])
def test_cli_bad_args(tmp_path, args, msg):
    p = cli('--out', tmp_path / 'bad', *args, check=False)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not (tmp_path / 'bad' / 'meta.json').exists()


def test_api_errors(tmp_path):
    with pytest.raises(TurboTalkError, match='split must be one of'): st.make_clip(0, 'dev')
    with pytest.raises(TurboTalkError, match='needs at least 2 clips'): st.sync_check(tmp_path, 'test')
    with pytest.raises(TurboTalkError, match='frames but'): st.mouth_darkness(np.zeros((3, 8, 8, 3), np.uint8), [[0, 0, 4, 4]])
