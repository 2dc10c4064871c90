"""turbotalk.data from outside: audio features against references, the dataset on folders of arbitrary videos
(odd sizes, frame rates, sample rates, stereo, silent + .wav), every kind of bad input, caching, and SynthTalk."""
import json, os, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from turbotalk.core import MediaError, WeightsError
from turbotalk.media import write_mp4, write_wav
import turbotalk.data as D
from turbotalk.data import (LogMelFeatures, TalkingHeadDataset, Wav2Vec2Features, frame_windows, load_clip, load_ref,
                            logmel)

SR = 16000


# ---------------------------------------------------------------- helpers
def envelope(n_samples, sr, hz=3.0, phase=0.0):
    return 0.5 + 0.5 * np.sin(2 * np.pi * hz * np.arange(n_samples) / sr + phase)


def toy_clip(n=40, fps=25, sr=SR, hw=(48, 64), seed=0, channels=1):
    "Frames whose bright bar height follows the loudness envelope of the sound; audio (channels, N) or (N,)."
    rng = np.random.default_rng(seed)
    N = int(round(n / fps * sr)); t = np.arange(N) / sr
    env = envelope(N, sr, phase=rng.uniform(0, 6))
    wav = 0.4 * env * np.sin(2 * np.pi * rng.uniform(200, 500) * t)
    fr = np.full((n, *hw, 3), 30, np.uint8); fr[..., seed % 3] += 50
    cy, cx = hw[0] // 2, hw[1] // 2
    for i in range(n):
        h = 1 + int(round(10 * env[min(N - 1, int((i + 0.5) / fps * sr))]))
        fr[i, cy - h:cy + h, cx - 6:cx + 6] = 240
    wav = wav.astype(np.float32)
    return fr, (np.stack([wav, wav * 0.5]) if channels == 2 else wav)


def write_av(path, frames, fps, audio=None, sr=SR, fmt='mp4'):
    "Our own muxer (stereo AAC, any container) so the loader is tested on files media.write_mp4 cannot make."
    with av.open(str(path), 'w', format=fmt) as c:
        v = c.add_stream('libx264' if fmt != 'avi' else 'mpeg4', rate=fps)
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        if audio is not None:
            a = np.atleast_2d(audio).astype(np.float32); layout = 'stereo' if len(a) == 2 else 'mono'
            s = c.add_stream('aac' if fmt != 'avi' else 'mp2', rate=sr); s.layout = layout
        for fr in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(fr, format='rgb24')): c.mux(p)
        for p in v.encode(): c.mux(p)
        if audio is not None:
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(a), format='fltp', layout=layout); f.sample_rate, f.pts = sr, 0
            for p in s.encode(f): c.mux(p)
            for p in s.encode(): c.mux(p)
    return Path(path)


def tiny_w2v(d, preprocessor=True):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0); Wav2Vec2Model(cfg).save_pretrained(d)
    if preprocessor: Wav2Vec2FeatureExtractor().save_pretrained(d)
    return Path(d)


def build(*a, **k):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always'); ds = TalkingHeadDataset(*a, **k)
    return ds, [str(w.message) for w in ws]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "Arbitrary videos with sound: odd sizes, 24/25/30 fps, 8/16/44.1/48 kHz, stereo, silent+wav, .mov; plus bad ones."
    d = tmp_path_factory.mktemp('videos')
    fr, a = toy_clip(40, 25, 16000, (48, 64), 0); write_mp4(d / 'mono16k.mp4', fr, 25, a, 16000)
    fr, a = toy_clip(36, 30, 44100, (90, 160), 1, channels=2); write_av(d / 'stereo44k.mp4', fr, 30, a, 44100)
    fr, a = toy_clip(32, 24, 48000, (120, 68), 2); write_mp4(d / 'portrait48k.mov', fr, 24, a, 48000)
    fr, a = toy_clip(40, 25, 8000, (64, 64), 3); write_mp4(d / 'sub' / 'narrow8k.mp4', fr, 25, a, 8000)
    fr, a = toy_clip(40, 25, 22050, (48, 48), 4, channels=2)
    write_mp4(d / 'silent_plus_wav.mp4', fr, 25); write_wav(d / 'silent_plus_wav.wav', a, 22050)
    # bad ones
    (d / 'empty.mp4').write_bytes(b'')
    (d / 'garbage.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42' + np.random.default_rng(0).bytes(2000))
    good = (d / 'mono16k.mp4').read_bytes(); (d / 'truncated.mp4').write_bytes(good[:len(good) // 3])
    # write_mp4 puts the index (moov) after the media data (mdat): cut at a third, the file has no index at all
    assert good.rfind(b'moov') > len(good) // 3 > good.find(b'mdat')
    fr, a = toy_clip(40, 25); write_mp4(d / 'no_audio.mp4', fr, 25)
    fr, a = toy_clip(8, 25); write_mp4(d / 'too_short.mp4', fr, 25, a)
    fr, a = toy_clip(40, 25); write_mp4(d / 'bad_sidecar.mp4', fr, 25, a); (d / 'bad_sidecar.json').write_text('{oops')
    (d / '.hidden').mkdir(); write_mp4(d / '.hidden' / 'x.mp4', fr, 25, a)   # hidden folders are not read
    return d


GOOD = {'mono16k.mp4', 'stereo44k.mp4', 'portrait48k.mov', 'narrow8k.mp4', 'silent_plus_wav.mp4'}


# ---------------------------------------------------------------- log-mel and windows
def test_logmel_matches_a_direct_stft():
    "One frame by hand: periodic Hann window, centred frames (reflect padding), power, the same mel bank, ln."
    from transformers.audio_utils import mel_filter_bank
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    m = logmel(x)
    assert m.shape == (80, 101) and m.dtype == np.float32
    j = 37; seg = x[j * 160 - 200:j * 160 + 200]
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    p = np.abs(np.fft.rfft(seg * win, 512)) ** 2
    bank = mel_filter_bank(257, 80, 0.0, 8000, SR, norm='slaney', mel_scale='htk')
    np.testing.assert_allclose(m[:, j], np.log(np.maximum(p @ bank, 1e-10)), rtol=1e-3, atol=1e-3)


def test_logmel_frequency_order_and_sample_rate():
    t = np.arange(SR) / SR
    peaks = [logmel(np.sin(2 * np.pi * hz * t))[:, 50].argmax() for hz in (250, 1000, 4000)]
    assert peaks[0] < peaks[1] < peaks[2]
    with pytest.raises(ValueError, match='too short'): logmel(np.zeros(50))


@pytest.mark.parametrize('rate,fps,ctx,w', [(25, 25, 2, 5), (100, 25, 2, 20), (100, 30, 2, 17), (50, 25, 0, 2)])
def test_frame_windows_shapes_and_centres(rate, fps, ctx, w):
    f = torch.arange(1000.)
    out = frame_windows(f, rate, fps, 20, ctx)
    assert out.shape == (20, w)
    centre_time = (out.float().mean(1) + 0.5) / rate        # mean feature time of each window
    interior = slice(ctx + 1, 20)
    np.testing.assert_allclose(centre_time[interior], (torch.arange(20.)[interior] + 0.5) / fps, atol=0.6 / rate + 1e-6)
    assert (frame_windows(f, rate, fps, 5, ctx, start=7) == frame_windows(f, rate, fps, 20, ctx)[7:12]).all()


def test_frame_windows_edges_are_clamped_and_dims_kept():
    f = torch.randn(10, 3, 4)
    out = frame_windows(f, 25, 25, 10, ctx=2)
    assert out.shape == (10, 5, 3, 4)
    assert (out[0, 0] == f[0]).all() and (out[0, 1] == f[0]).all() and (out[9, 4] == f[9]).all()
    with pytest.raises(ValueError, match='empty'): frame_windows(torch.zeros(0, 3), 25, 25, 4)


# ---------------------------------------------------------------- wav2vec2
def test_wav2vec2_from_disk_shape_and_determinism(tmp_path):
    d = tiny_w2v(tmp_path / 'w2v')
    x = np.random.default_rng(1).standard_normal(int(1.6 * SR)).astype(np.float32) * 0.1
    f1 = Wav2Vec2Features(d)
    a = f1(x, SR, 25, 40)
    assert a.shape == (40, 5, 2, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, Wav2Vec2Features(d)(x, SR, 25, 40))                        # a fresh load gives the same
    assert Wav2Vec2Features(d, ctx=1, layers='mean')(x, SR, 25, 17).shape == (17, 3, 32)
    assert Wav2Vec2Features(d, layers='last')(x, SR, 25, 40).shape == (40, 5, 32)
    # without preprocessor_config.json the fallback normalisation is the feature extractor's
    d2 = tmp_path / 'noproc'; tiny_w2v(d2, preprocessor=False)
    torch.testing.assert_close(Wav2Vec2Features(d2)(x, SR, 25, 40), a, atol=1e-4, rtol=1e-4)


def test_wav2vec2_interpolates_conv_features_to_the_frame_rate(tmp_path):
    "Reference: CNN features -> linear interpolation to n frames -> projection -> encoder (MultiTalk's order)."
    from transformers import Wav2Vec2Model
    d = tiny_w2v(tmp_path / 'w2v', preprocessor=False)
    x = np.random.default_rng(2).standard_normal(SR).astype(np.float32)
    feats, rate = Wav2Vec2Features(d).feats(x, SR, 25, 25)
    assert rate == 25 and feats.shape == (25, 2, 32)
    m = Wav2Vec2Model.from_pretrained(str(d)).eval()
    with torch.no_grad():
        xn = torch.from_numpy((x - x.mean()) / np.sqrt(x.var() + 1e-7))[None]
        c = F.interpolate(m.feature_extractor(xn), size=25, mode='linear', align_corners=True).transpose(1, 2)
        ref = m.encoder(m.feature_projection(c)[0]).last_hidden_state[0]
    torch.testing.assert_close(feats[:, -1], ref, atol=1e-5, rtol=1e-5)


def test_wav2vec2_errors(tmp_path):
    with pytest.raises(WeightsError, match='nowhere'): Wav2Vec2Features(tmp_path / 'nowhere')
    (tmp_path / 'broken').mkdir(); (tmp_path / 'broken' / 'config.json').write_text('{}')
    with pytest.raises(WeightsError, match='broken'): Wav2Vec2Features(tmp_path / 'broken')
    f = Wav2Vec2Features(tiny_w2v(tmp_path / 'w2v'))
    with pytest.raises(ValueError, match='16000'): f(np.zeros(8000), 8000, 25, 25)
    with pytest.raises(ValueError, match='layers'): Wav2Vec2Features(tmp_path / 'w2v', layers='sum')


# ---------------------------------------------------------------- direct loading and bad input
@pytest.mark.parametrize('name', ['stereo44k.mp4', 'portrait48k.mov', 'sub/narrow8k.mp4', 'silent_plus_wav.mp4'])
def test_any_rate_and_layout_loads_as_16k_mono_with_the_right_pitch(folder, name):
    c = load_clip(folder / name, size=32)
    assert c.sr == SR and c.audio.ndim == 1 and c.audio.dtype == np.float32
    assert c.frames.shape[1:] == (32, 32, 3) and c.frames.dtype == torch.uint8
    assert abs(len(c.audio) / SR - len(c.frames) / c.fps) < 0.1        # audio spans the video
    spec = np.abs(np.fft.rfft(c.audio * np.hanning(len(c.audio))))
    assert 150 < spec.argmax() * SR / len(c.audio) < 600                 # the tone survived resampling


@pytest.mark.parametrize('name,match', [('missing.mp4', 'missing.mp4'), ('empty.mp4', 'empty.mp4'),
                                        ('garbage.mp4', 'garbage.mp4'), ('no_audio.mp4', 'no_audio.mp4'),
                                        ('bad_sidecar.mp4', 'bad_sidecar.json')])
def test_direct_loading_raises_media_error_naming_the_file(folder, name, match):
    with pytest.raises(MediaError, match=match): load_clip(folder / name)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / 'face.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'junk' * 10)
    with pytest.raises(MediaError, match='face.png'): load_ref(tmp_path / 'face.png')
    with pytest.raises(MediaError, match='gone.jpg'): load_ref(tmp_path / 'gone.jpg')
    import matplotlib.pyplot as plt
    img = np.zeros((40, 60, 3), np.uint8); img[:, 10:50] = 255; plt.imsave(tmp_path / 'ok.png', img)
    r = load_ref(tmp_path / 'ok.png', size=16)
    assert r.shape == (3, 16, 16) and torch.allclose(r, torch.ones_like(r), atol=1e-2)   # centre crop is white


# ---------------------------------------------------------------- the dataset
def test_folder_of_arbitrary_videos_builds_and_reports_bad_items(folder):
    ds, warns = build(folder, n_frames=12, size=32)
    assert {Path(p).name for p, _ in ds.items} == GOOD
    skipped = {Path(p).name: r for p, r in ds.skipped}
    assert set(skipped) == {'empty.mp4', 'garbage.mp4', 'no_audio.mp4', 'too_short.mp4', 'bad_sidecar.mp4', 'truncated.mp4'}
    assert 'need at least 13' in skipped['too_short.mp4'] and 'no_audio.wav' in skipped['no_audio.mp4']
    # the truncated mp4 lost its index (see the fixture): FFmpeg cannot open it, so it is skipped (not fatal) with a
    # MediaError that names it, and the build goes on with every good video
    assert skipped['truncated.mp4'].startswith('MediaError: cannot open') and 'truncated.mp4' in skipped['truncated.mp4']
    with pytest.raises(MediaError, match='cannot open .*truncated.mp4'): load_clip(folder / 'truncated.mp4')
    assert len(warns) == 1 and '6 of 11 videos' in warns[0]
    for i in range(len(ds)):
        b = ds[i]
        assert b['x'].shape == (12, 3, 32, 32) and b['ref'].shape == (3, 32, 32) and b['a'].shape == (12, 20, 80)
        assert b['audio'].shape == (12 * SR // 25,) and b['fps'] == 25
        assert b['x'].min() >= -1 and b['x'].max() <= 1 and torch.isfinite(b['a']).all()
        assert not b['start'] <= b['ref_idx'] < b['start'] + 12 and 'gt' not in b


def test_dataloader_collates_mixed_sources(folder):
    ds, _ = build(folder, n_frames=8, size=32)
    for workers in (0, 2):
        b = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers,
                                                  generator=torch.Generator().manual_seed(0))))
        assert b['x'].shape == (4, 8, 3, 32, 32) and b['a'].shape == (4, 8, 20, 80) and b['audio'].shape == (4, 5120)
        assert b['start'].shape == (4,) and len(b['path']) == 4


@pytest.mark.parametrize('fps', [None, 25])
def test_audio_and_video_stay_in_sync(folder, fps):
    "The bar height (from pixels) follows the loudness of the audio snippet frame by frame, in every source."
    ds, _ = build(folder, n_frames=24, size=None, fps=fps)
    for i in range(len(ds)):
        b = ds[i]; fps = float(b['fps']); spf = SR / fps
        x = (b['x'] + 1) / 2
        bar = (x[:, :, :, x.shape[-1] // 2 - 2:x.shape[-1] // 2 + 2].mean(1) > 0.8).float().mean((1, 2))
        rms = torch.stack([b['audio'][int(k * spf):int((k + 1) * spf)].pow(2).mean().sqrt() for k in range(24)])
        c = lambda u, v: float(np.corrcoef(u, v)[0, 1])
        assert c(bar, rms) > 0.9, (b['path'], c(bar, rms))
        assert c(bar, rms) > c(bar[3:], rms[:-3]) + 0.05 and c(bar, rms) > c(bar[:-3], rms[3:]) + 0.05, b['path']


def test_features_and_snippet_are_the_windows_of_the_whole_clip(folder):
    ds, _ = build(folder, n_frames=10, size=32, fps=25)
    for i in range(len(ds)):
        b = ds[i]; c = load_clip(b['path'], size=32, fps=25); s = b['start']
        full = LogMelFeatures()(c.audio, SR, 25, len(c.frames))
        assert torch.equal(b['a'], full[s:s + 10])
        snip = c.audio[round(s * SR / 25):round(s * SR / 25) + 6400]
        assert np.array_equal(b['audio'][:len(snip)].numpy(), snip)
        assert torch.equal(b['x'], D.to_x(c.frames[s:s + 10])) and torch.equal(b['ref'], D.to_x(c.frames[b['ref_idx']]))


def test_sampling_is_deterministic_per_seed_epoch_index(folder):
    draws = lambda ds: [(ds[i]['start'], ds[i]['ref_idx']) for i in range(len(ds))]
    a, _ = build(folder, n_frames=8, size=16, seed=3); b, _ = build(folder, n_frames=8, size=16, seed=3, cache=False)
    assert draws(a) == draws(b) and torch.equal(a[1]['x'], b[1]['x'])       # cache on/off: same samples
    e0 = draws(a); a.set_epoch(1); e1 = draws(a); a.set_epoch(0)
    assert e1 != e0 and draws(a) == e0
    c, _ = build(folder, n_frames=8, size=16, seed=4); assert draws(c) != e0
    f, _ = build(folder, n_frames=8, size=16, ref='first')
    assert all(r == (0 if s > 0 else 8) for s, r in draws(f))


def test_disk_cache_skips_decoding_and_notices_changes(folder, tmp_path, monkeypatch):
    d = tmp_path / 'v'; d.mkdir()
    for n in ['mono16k.mp4', 'stereo44k.mp4']: (d / n).write_bytes((folder / n).read_bytes())
    ds1, _ = build(d, n_frames=8, size=32, cache_dir=tmp_path / 'cache')
    assert len(list((tmp_path / 'cache').glob('*.safetensors'))) == 4    # clip + features, per video
    def boom(*a, **k): raise AssertionError('decoded although cached')
    monkeypatch.setattr(D, 'read_video', boom)
    ds2, _ = build(d, n_frames=8, size=32, cache_dir=tmp_path / 'cache')
    assert not ds2.skipped and torch.equal(ds1[0]['x'], ds2[0]['x']) and torch.equal(ds1[1]['a'], ds2[1]['a'])
    os.utime(d / 'mono16k.mp4', ns=(1, 1))                              # changed file: new key, decodes again
    ds3, _ = build(d, n_frames=8, size=32, cache_dir=tmp_path / 'cache')
    assert [Path(p).name for p, _ in ds3.skipped] == ['mono16k.mp4'] and 'decoded although cached' in ds3.skipped[0][1]


def test_cache_dir_inside_root_and_splits(folder, tmp_path):
    root = tmp_path / 'r'
    for split, names in [('train', ['mono16k.mp4', 'stereo44k.mp4']), ('val', ['portrait48k.mov'])]:
        (root / split).mkdir(parents=True)
        for n in names: (root / split / n).write_bytes((folder / n).read_bytes())
    tr, w = build(root, split='train', n_frames=8, size=16, cache_dir=root / 'cache')
    assert len(tr) == 2 and not w
    again, w = build(root, n_frames=8, size=16, cache_dir=root / 'cache')   # no split: both, never the cache
    assert len(again) == 3 and not again.skipped
    with pytest.raises(MediaError, match='test'): TalkingHeadDataset(root, split='test')


def test_nothing_usable_is_one_clear_error(folder, tmp_path):
    for n in ['empty.mp4', 'garbage.mp4']: (tmp_path / n).write_bytes((folder / n).read_bytes())
    with pytest.raises(MediaError, match='no usable videos'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); TalkingHeadDataset(tmp_path, n_frames=8)


def test_sidecar_ground_truth_is_sliced_with_the_window(folder, tmp_path):
    (tmp_path / 'c.mp4').write_bytes((folder / 'mono16k.mp4').read_bytes())
    (tmp_path / 'c.json').write_text(json.dumps(dict(
        clip_id='c', seed=0, frames=dict(mouth_open=list(range(40)), mouth_box=[[i, i, i + 1, i + 1] for i in range(40)]),
        yaw=[0.1 * i for i in range(40)], note=['x'] * 40)))
    ds, _ = build(tmp_path, n_frames=8, size=16, fps=None)
    b = ds[0]; s = b['start']
    assert set(b['gt']) == {'mouth_open', 'mouth_box', 'yaw'}
    assert torch.equal(b['gt']['mouth_open'], torch.arange(s, s + 8).float()) and b['gt']['mouth_box'].shape == (8, 4)
    # boxes follow the crop (64x48 -> centre 48x48 from x=8) and the resize (48 -> 16)
    i = torch.arange(s, s + 8).float()
    torch.testing.assert_close(b['gt']['mouth_box'], torch.stack([i - 8, i, i - 7, i + 1], 1) / 3)
    bb = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert bb['gt']['yaw'].shape == (1, 8) and bb['gt']['mouth_box'].shape == (1, 8, 4)


def test_wav2vec2_features_through_the_dataset(folder, tmp_path):
    d = tmp_path / 'v'; d.mkdir(); (d / 'c.mp4').write_bytes((folder / 'mono16k.mp4').read_bytes())
    ds, _ = build(d, n_frames=8, size=16, features=Wav2Vec2Features(tiny_w2v(tmp_path / 'w2v')))
    b = ds[0]
    assert b['a'].shape == (8, 5, 2, 32)
    assert torch.equal(b['a'], ds.features(load_clip(d / 'c.mp4').audio, SR, 25, 40)[b['start']:b['start'] + 8])


@pytest.mark.skipif(not (Path(D.__file__).parent / 'synthtalk.py').exists(), reason='turbotalk.synthtalk not written yet')
def test_synthtalk_folder_reads_through_the_same_dataset(tmp_path):
    from turbotalk.synthtalk import write_synthtalk
    write_synthtalk(tmp_path / 'st', n_clips=2, seed=0, split='train', size=64, seconds=2.0, workers=1)
    ds, w = build(tmp_path / 'st', split='train', n_frames=8, size=32)
    assert len(ds) == 2 and not ds.skipped and not w
    b = ds[0]
    assert b['x'].shape == (8, 3, 32, 32) and b['a'].shape == (8, 20, 80)
    for k in ['mouth_open', 'mouth_width', 'yaw', 'pitch', 'roll', 'blink']: assert b['gt'][k].shape == (8,), k
    assert b['gt']['mouth_box'].shape == (8, 4)
    # frames and ground truth stay aligned through decoding, resizing and windowing: the dark area inside the
    # (rescaled) mouth box follows the sidecar's mouth opening
    from turbotalk.synthtalk import mouth_darkness
    ds, _ = build(tmp_path / 'st', split='train', n_frames=24, size=32)
    for i in range(len(ds)):
        b = ds[i]; box = b['gt']['mouth_box']
        assert box.min() >= 0 and box.max() <= 32
        fr = ((b['x'] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.corrcoef(mouth_darkness(fr, box.round().numpy()), b['gt']['mouth_open'])[0, 1] > 0.8
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert b['gt']['mouth_box'].shape == (2, 24, 4) and b['a'].shape == (2, 24, 20, 80)
