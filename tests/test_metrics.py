"""Evaluation metrics (turbotalk.metrics): bad inputs, the SyncNet protocol on shifted clips, offset recovery,
loading real-SyncNet-shaped weights, LPIPS backbone loading, and the shipped probes."""
import json, math, shutil, sys, types
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from turbotalk.core import WeightsError
from turbotalk import metrics as M

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def probes():
    return M.load_probes()


@pytest.fixture(scope='module')
def clips():
    return M.synth_gt_clips(6, 'test', seed=2000)


# ---- the shipped probes --------------------------------------------------------------------------------------------
def test_shipped_probes_load_and_are_small(clips):
    d = M.default_probes_dir()
    files = sorted(d.glob('*.safetensors'))
    assert [f.stem for f in files] == sorted(M.PROBE_NAMES)
    assert sum(f.stat().st_size for f in files) < 20e6
    assert all(f.stat().st_size < 1.5e6 for f in files)
    rec = json.loads((d/'probes.json').read_text())
    assert rec['config']['size'] == 64
    p = M.load_probes(d)
    assert isinstance(p, M.Probes) and not p.training
    # recomputed here, not read from the record: the mouth reader follows the true opening of every unseen test clip
    for c in clips:
        r = np.corrcoef(M.probe_readings(p, c.frames)['open'].numpy(), c.gt['mouth_open'].numpy())[0, 1]
        assert r > 0.9, (c.path, r)


def test_missing_probes_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match='probes.json is missing'): M.load_probes(tmp_path)
    M.save_probes(M.Probes(), tmp_path/'p')
    (tmp_path/'p'/'sync.safetensors').unlink()
    with pytest.raises(WeightsError, match='sync.safetensors'): M.load_probes(tmp_path/'p')


# ---- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs(probes, clips):
    c = clips[0]
    with pytest.raises(ValueError, match='empty video'): M.clip_metrics(probes, torch.zeros(0, 3, 64, 64), c.audio)
    with pytest.raises(ValueError, match='length mismatch'): M.clip_metrics(probes, c.frames, c.audio[:16000])
    with pytest.raises(ValueError, match='the probes need 64x64'): M.clip_metrics(probes, c.frames[:, :32, :32], c.audio)
    with pytest.raises(ValueError, match='audio: empty'): M.clip_metrics(probes, c.frames, np.zeros(0))
    with pytest.raises(ValueError, match='4-d video'): M.flicker(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match='differ in shape'): M.psnr_ssim(c.frames, c.frames[:10])
    with pytest.raises(ValueError, match='too short'): M.sync_score(probes.sync, c.frames[:5], c.audio[:3200])


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match='syncnet_v2.model'): M.load_syncnet(tmp_path/'syncnet_v2.model')
    with pytest.raises(WeightsError, match='needs i3d_torchscript.pt'): M.i3d_fvd(tmp_path/'i3d_torchscript.pt')
    with pytest.raises((M.MetricUnavailable, WeightsError), match='unavailable'): M.inception_fid(tmp_path/'incep.pth')
    with pytest.raises((M.MetricUnavailable, WeightsError), match='LPIPS'): M.LPIPS('alex', tmp_path/'alexnet.pth')


def test_unavailable_metrics_are_empty_cells_with_notes(probes, tmp_path):
    dm = M.DistMetrics(probes, inception=tmp_path/'x.pth', i3d=tmp_path/'y.pt')
    v = torch.rand(20, 3, 64, 64) * 2 - 1
    for _ in range(3): dm.update(v, real=True); dm.update(-v, real=False)
    r = dm.compute()
    assert r['fid'] is None and r['fvd'] is None
    assert 'unavailable' in dm.notes['fid'] and 'i3d_torchscript.pt' in dm.notes['fvd']
    # the computable ones measure a distance: clearly > 0 between different videos, ~0 when the generated side is the
    # real side itself (reset forgets the generated side only)
    dm.reset()
    for _ in range(3): dm.update(v, real=False)
    same = dm.compute()
    for k in ('fid_st', 'fvd_st', 'fid_st_face'):
        assert r[k] > 0.5 and abs(same[k]) < 1e-3 * r[k], (k, r[k], same[k])


# ---- the SyncNet protocol ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('k', [-7, -2, 3, 8])
def test_protocol_finds_a_deliberate_shift(probes, clips, k):
    got = [M.sync_score(probes.sync, c.frames, M.delay_audio(c.audio, k))['offset'] for c in clips[:3]]
    assert sum(o == -k for o in got) >= 2, got


def test_offset_recovery_and_sync_separation(probes, clips):
    gt = [M.sync_score(probes.sync, c.frames, c.audio) for c in clips]
    sh = [M.sync_score(probes.sync, c.frames, clips[(i + 1) % len(clips)].audio) for i, c in enumerate(clips)]
    assert np.mean([r['offset'] == 0 for r in gt]) >= 5 / 6
    assert np.mean([r['sync_c'] for r in gt]) > 2 * np.mean([r['sync_c'] for r in sh])
    assert np.mean([r['sync_d'] for r in gt]) < np.mean([r['sync_d'] for r in sh])


def calc_pdist(feat1, feat2, vshift=15):
    "syncnet_python's SyncNetInstance.calc_pdist, verbatim: per video step, distances to the audio steps i-vshift..i+vshift."
    win_size = vshift * 2 + 1
    feat2p = F.pad(feat2, (0, 0, vshift, vshift))
    return [F.pairwise_distance(feat1[[i], :].repeat(win_size, 1), feat2p[i:i + win_size, :]) for i in range(len(feat1))]


def reference_protocol(lip, aud, vshift=15):
    "syncnet_python's evaluate() after the features: mean distance per offset, offset = vshift - argmin, conf = median - min."
    mdist = torch.mean(torch.stack(calc_pdist(lip, aud, vshift), 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return dict(offset=int(vshift - minidx), sync_c=float(torch.median(mdist) - minval), sync_d=float(minval), dists=mdist)


def test_protocol_on_features_matches_reference_semantics():
    g = torch.Generator().manual_seed(0)
    f, other = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    for k in (6, -6, 0):                                  # k > 0: the audio is delayed by k frames (it lags the video)
        lip, aud = (f[k:k + 40], f[:40]) if k >= 0 else (f[:40], f[-k:40 - k])
        r, ref = M.sync_protocol(lip, aud, vshift=15), reference_protocol(lip, aud, 15)
        assert r['offset'] == -k == ref['offset'] and len(r['dists']) == 31   # syncnet_python's sign: delay k -> offset -k
        np.testing.assert_allclose(r['dists'], ref['dists'], rtol=1e-6, atol=1e-6)
        assert r['sync_c'] == pytest.approx(ref['sync_c'], abs=1e-5) and r['sync_d'] == pytest.approx(ref['sync_d'], abs=1e-5)
        # the matching features: confident (large Sync-C, small Sync-D); unrelated audio: neither
        un = M.sync_protocol(lip, other, vshift=15)
        assert r['sync_c'] > 3 * un['sync_c'] and r['sync_d'] < 0.5 * un['sync_d'], (k, r['sync_c'], un['sync_c'])


def syncnet_python_windows(video, audio):
    "syncnet_python's evaluate(): cv2 frames (BGR, 0-255) stacked (1,3,T,H,W), MFCCs (1,1,13,F); window i = frames i..i+4, MFCC 4i..4i+19."
    im = ((video + 1) / 2).clamp(0, 1)[:, [2, 1, 0]] * 255
    imtv, cct = im.permute(1, 0, 2, 3)[None], torch.from_numpy(M.syncnet_mfcc(audio))[None, None]
    lastframe = min(len(video), math.floor(len(audio) / 640)) - 5
    return [imtv[:, :, i:i + 5] for i in range(lastframe)], [cct[:, :, :, i * 4:i * 4 + 20] for i in range(lastframe)]


def test_fake_real_syncnet_weights_load_and_run(tmp_path):
    torch.manual_seed(0)
    v = torch.rand(20, 3, 224, 224) * 2 - 1                  # already the real SyncNet's 224x224 input: no resize
    a = np.random.default_rng(0).standard_normal(20 * 640).astype(np.float32) * 0.1
    lips, auds = syncnet_python_windows(v, a)
    net = M.SyncNet(M.SYNCNET_SIZES['real'])
    # random weights whose batch-norm statistics are those of real inputs (one train-mode pass), so the embeddings vary
    # with the content (with arbitrary statistics they are near-constant and any wrong window would go unnoticed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm): m.momentum = None; m.reset_running_stats()
    with torch.no_grad(): net.train(); net.forward_lip(torch.cat(lips[:6])); net.forward_aud(torch.cat(auds))
    sd = net.state_dict()
    torch.save(sd, tmp_path/'syncnet_v2.model')              # a plain state dict, like the real file
    s = M.load_syncnet(tmp_path/'syncnet_v2.model')
    assert torch.equal(s.netfcaud[3].weight, sd['netfcaud.3.weight']) and not s.training
    # the windows are syncnet_python's, and the scores are its evaluate() on them, one window at a time
    lip, aud = M.sync_windows(s, v, a)
    torch.testing.assert_close(lip, torch.cat(lips)); torch.testing.assert_close(aud, torch.cat(auds))
    with torch.no_grad():
        ref = reference_protocol(torch.cat([s.forward_lip(x) for x in lips]), torch.cat([s.forward_aud(x) for x in auds]))
    r = M.sync_score(s, v, a)
    np.testing.assert_allclose(r['dists'], ref['dists'], rtol=1e-5)
    assert np.ptp(r['dists']) > 1                            # the distances depend on the offset: a real comparison
    assert r['offset'] == ref['offset'] and r['sync_c'] == pytest.approx(ref['sync_c'], rel=1e-4)
    assert r['sync_d'] == pytest.approx(ref['sync_d'], rel=1e-5)
    sd['netcnnlip.0.weight'] = sd['netcnnlip.0.weight'][:, :, :3]
    torch.save(sd, tmp_path/'bad.model')
    with pytest.raises(WeightsError, match='does not match'): M.load_syncnet(tmp_path/'bad.model')


# ---- LPIPS backbone loading (a stand-in for the lpips package, which needs torchvision) ----------------------------
def test_lpips_backbone_mapping(tmp_path, monkeypatch):
    feats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU())
    class FakeNet(nn.Module):
        def __init__(self):
            super().__init__()
            f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU())
            self.slice1, self.slice2 = nn.Sequential(), nn.Sequential()
            for i in range(2): self.slice1.add_module(str(i), f[i])
            for i in range(2, 4): self.slice2.add_module(str(i), f[i])
    class FakeLPIPS(nn.Module):
        def __init__(self, net='alex', pnet_rand=True, verbose=False): super().__init__(); self.net = FakeNet()
        def forward(self, a, b): return (a - b).abs().mean((1, 2, 3), keepdim=True)
    monkeypatch.setitem(sys.modules, 'lpips', types.SimpleNamespace(LPIPS=FakeLPIPS))
    torch.save({f'features.{k}': v for k, v in feats.state_dict().items()} | {'classifier.1.weight': torch.zeros(2)}, tmp_path/'alex.pth')
    m = M.LPIPS('alex', tmp_path/'alex.pth')
    assert torch.equal(getattr(m.model.net.slice2, '2').weight, feats[2].weight)
    v = torch.rand(4, 3, 16, 16) * 2 - 1
    # the network sees both videos in [-1, 1] (lpips' convention), frame by frame: here LPIPS(v, -v) = mean |2v|
    assert m(v, v) == 0 and m(v, -v) == pytest.approx(float((2 * v).abs().mean()), rel=1e-6)
    torch.save({'features.0.weight': torch.zeros(1)}, tmp_path/'bad.pth')
    with pytest.raises(WeightsError, match='not a torchvision backbone'): M.LPIPS('alex', tmp_path/'bad.pth')


# ---- evaluate ------------------------------------------------------------------------------------------------------
def test_evaluate_row_and_bad_generators(probes, tmp_path):
    from turbotalk.synthtalk import write_synthtalk
    for s in ('val', 'test'): write_synthtalk(tmp_path/'st', 3, seed=7, split=s, workers=1)
    gt = M.evaluate(None, tmp_path/'st', probes, n_clips=3, n_frames=24, bs=3, name='gt')
    sh = M.evaluate(M.shuffled_audio, tmp_path/'st', probes, n_clips=3, n_frames=24, bs=3, name='shuffled')
    assert list(gt) == list(M.ROW_KEYS) and gt['sync_corr'] > 0.8 and sh['sync_corr'] < gt['sync_corr'] - 0.5
    assert gt['sync_c'] is None and 'syncnet_v2.model' in gt['notes'] and gt['lpips'] is None
    with pytest.raises(ValueError, match='generator returned'):
        M.evaluate(lambda b: b['x'][:, :5], tmp_path/'st', probes, n_clips=2, n_frames=24, bs=2)
    out = tmp_path/'gen'; out.mkdir()
    with pytest.raises(Exception, match='file not found'):
        M.evaluate(M.video_folder(out), tmp_path/'st', probes, n_clips=2, n_frames=24, bs=2)
    for f in (tmp_path/'st'/'test').glob('*.mp4'): shutil.copy(f, out/f.name)   # 'generated' = the real videos
    disk = M.evaluate(M.video_folder(out), tmp_path/'st', probes, n_clips=3, n_frames=24, bs=3)
    assert disk['psnr'] == 100 and disk['sync_corr'] == pytest.approx(gt['sync_corr'])
    csv, md = M.write_table([gt, sh], tmp_path/'tab')
    assert 'n/a' in md.read_text() and csv.read_text().startswith('name,')
