"""turbotalk.pipeline: save_pretrained -> from_pretrained gives the same frames; the `turbotalk` command writes an mp4 whose
sound lasts as long as its video; every bad input is one line, status 1, no traceback and no file left; streaming gives
the frames of the whole call; long audio is cut into the chunk plan's frames; the chapter's Run section on tiny random
pipelines (papermill). Every model here is random and tiny, made by the test itself."""
import contextlib, io, json, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from turbotalk import pipeline as tp
from turbotalk.pipeline import TurboTalkPipeline, random_pipeline, load_pipeline, main
from turbotalk.sampling import chunk_plan
from turbotalk.media import read_video, write_wav, write_mp4

NB = ROOT/'nbs'/'06_pipeline.ipynb'


def _tone(sec, sr=16000, f=220.):
    t = np.arange(round(sec * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)

def _quiet(p):
    p.set_progress_bar_config(disable=True); return p

def _cli(*args):
    "`turbotalk ARGS` in this process: (status, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): code = main([str(a) for a in args])
    return code, o.getvalue(), e.getvalue()

def _env():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg',
            'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

def _command():
    "The installed console script, else the module."
    exe = Path(sys.executable).parent/'turbotalk'
    return [str(exe)] if exe.is_file() else [sys.executable, '-m', 'turbotalk.pipeline']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "Inputs good and bad, and a tiny saved 2-step pipeline (16x16 frames, chunks of 4 with 1 context frame)."
    from matplotlib.image import imsave
    d = tmp_path_factory.mktemp('pipeline')
    face = (np.random.default_rng(0).random((40, 36, 3)) * 255).astype(np.uint8)
    imsave(d/'face.png', face); imsave(d/'tiny.png', face[:6, :6]); imsave(d/'wide.png', face[:8, :36])
    write_wav(d/'speech44k.wav', np.stack([_tone(1.32, 44100), _tone(1.32, 44100, 330.)]), 44100)   # 44.1 kHz stereo
    write_wav(d/'silence.wav', np.zeros(16000)); write_wav(d/'short.wav', _tone(0.1))
    write_mp4(d/'mute.mp4', np.zeros((10, 16, 16, 3), np.uint8)); (d/'notes.txt').write_text('not media\n')
    _quiet(random_pipeline(steps=2)).save_pretrained(d/'pipe')
    (d/'adv').mkdir(); (d/'adv'/'config.json').write_text((ROOT/tp.ADV_RUN/'config.json').read_text())   # a Stage-2 run, no students yet
    return d


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize('steps', [2, 0])   # a 2-step student; a teacher (Euler steps with 3-way CFG)
def test_save_pretrained_then_from_pretrained_gives_identical_frames(tmp_path, steps):
    pipe = _quiet(random_pipeline(steps=steps, chunk=4, n_ctx=1, seed=3))
    face, speech = np.full((16, 16, 3), 128, np.uint8), _tone(0.9)
    want = pipe(face, speech, 16000, seed=7).frames
    pipe.save_pretrained(tmp_path/'p')
    idx = json.loads((tmp_path/'p'/'model_index.json').read_text())
    assert idx['_class_name'] == 'TurboTalkPipeline' and idx['denoiser'] == ['turbotalk.pipeline', 'TalkingDenoiser']
    assert (idx['chunk'], idx['n_ctx'], idx['size'], idx['features']['n_mels']) == (4, 1, 16, 80)
    assert (idx['sigmas'], idx['mode']) == (([1.0, 0.5], 'x0') if steps else (None, 'euler'))
    assert sorted(p.name for p in (tmp_path/'p'/'denoiser').iterdir()) == ['config.json', 'diffusion_pytorch_model.safetensors']
    for back in (TurboTalkPipeline.from_pretrained(tmp_path/'p'), load_pipeline(tmp_path/'p')):
        got = _quiet(back)(face, speech, 16000, seed=7).frames
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert not np.array_equal(_quiet(back)(face, speech, 16000, seed=8).frames, want)          # the seed matters
    stats = back.denoiser.den.a_mean
    with torch.no_grad(): stats += 1.0                                                           # so do the saved audio statistics
    assert not np.array_equal(back(face, speech, 16000, seed=7).frames, want)


# ---------------------------------------------------------------- the command
def test_command_writes_an_mp4_with_sound_of_the_right_duration(files, tmp_path):
    out = tmp_path/'talk.mp4'
    r = subprocess.run(_command() + ['generate', '--image', files/'face.png', '--audio', files/'speech44k.wav', '--out', out,
                                     '--model', files/'pipe', '--seed', '1'], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'wrote {out}: 33 frames (1.32 s) of 16x16 at 25 fps with sound' in r.stdout, r.stdout
    assert 'turbotalk: note: ' in r.stderr and 'centre-cropped to 36x36 and resized to 16x16' in r.stderr   # the 36x40 face
    v = read_video(out)
    assert v.frames.shape == (33, 16, 16, 3) and v.fps == 25
    assert v.audio is not None and abs(len(v.audio) / v.sr - 33 / 25) < 0.05, len(v.audio) / v.sr   # sound as long as the video
    assert sorted(p.name for p in tmp_path.iterdir()) == ['talk.mp4']                                  # nothing else written


def test_command_error_is_one_line_without_traceback(files, tmp_path):
    "The real process: a silent recording."
    out = tmp_path/'x.mp4'
    r = subprocess.run(_command() + ['generate', '--image', files/'face.png', '--audio', files/'silence.wav', '--out', out,
                                     '--model', files/'pipe'], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.splitlines()[-1] == f"turbotalk: error: {files/'silence.wav'} is silent (peak below -80 dBFS): there is no speech to lip-sync"
    assert 'Traceback' not in r.stderr and list(tmp_path.iterdir()) == []


BAD = {   # name: (--image, --audio, --out name or None, extra args, what the message says)
    'missing image': ('none.png', 'speech44k.wav', None, (), 'face image file not found: '),
    'text file as image': ('notes.txt', 'speech44k.wav', None, (), 'notes.txt is not a media file FFmpeg can read'),
    'audio as image': ('speech44k.wav', 'speech44k.wav', None, (), 'speech44k.wav holds no picture: the face must be an image file'),
    'image too small': ('tiny.png', 'speech44k.wav', None, (), 'tiny.png is 6x6 pixels, too small: the model makes 16x16 video from a face of at least 8x8'),
    'image not square': ('wide.png', 'speech44k.wav', None, (), 'wide.png is 36x8 pixels, more than 2:1 from square'),
    'missing audio': ('face.png', 'none.wav', None, (), 'speech file not found: '),
    'text file as audio': ('face.png', 'notes.txt', None, (), 'notes.txt is not a media file FFmpeg can read'),
    'no audio stream': ('face.png', 'mute.mp4', None, (), 'mute.mp4 has no audio stream'),
    'image as audio': ('face.png', 'face.png', None, (), 'face.png has no audio stream'),
    'silent audio': ('face.png', 'silence.wav', None, (), 'silence.wav is silent (peak below -80 dBFS)'),
    'audio too short': ('face.png', 'short.wav', None, (), 'short.wav holds 0.10 s of audio: at least 0.2 s of speech is needed'),
    'not an mp4': ('face.png', 'speech44k.wav', 'x.avi', (), 'the output must be an .mp4 file'),
    'no such folder': ('face.png', 'speech44k.wav', 'no/x.mp4', (), 'does not exist'),
    'one-step student not made': ('face.png', 'speech44k.wav', None, ('--model', 'ADV'), 'is not made yet'),
    'teacher steps on a student': ('face.png', 'speech44k.wav', None, ('--steps', '3'), 'holds a 2-step model'),
}

@pytest.mark.parametrize('case', list(BAD))
def test_each_bad_input_gets_its_message_and_leaves_nothing(files, tmp_path, case):
    img, aud, name, extra, want = BAD[case]
    out = tmp_path/(name or 'x.mp4'); before = sorted(files.rglob('*'))
    extra = [files/'adv' if x == 'ADV' else x for x in extra]
    args = ['generate', '--image', files/img, '--audio', files/aud, '--out', out, '--quiet', *(['--model', files/'pipe'] if '--model' not in extra else []), *extra]
    code, o, e = _cli(*args)
    assert code == 1 and o == '', (code, o, e)
    *notes, last = e.splitlines()
    assert last.startswith('turbotalk: error: ') and want in last and all(n.startswith('turbotalk: note: ') for n in notes), e
    assert 'Traceback' not in e
    assert list(tmp_path.iterdir()) == [] and sorted(files.rglob('*')) == before      # no output, no temporary, inputs untouched
    if case == 'one-step student not made': assert 'Make it with `make demo`' in e


def test_usage_errors_and_unexpected_failures(files, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as ex: main(['generate', '--image', str(files/'face.png'), '--out', str(tmp_path/'x.mp4')])
    assert ex.value.code == 2 and 'the following arguments are required: --audio' in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex: main(['generate', '--image', 'f.png', '--audio', 'a.wav', '--out', 'x.mp4', '--steps', '-1'])
    assert ex.value.code == 2 and "argument --steps: a whole number >= 1, got '-1'" in capsys.readouterr().err
    def boom(path, *a, **k): Path(path).write_bytes(b'half an mp4'); raise RuntimeError('disk on fire\nsecond line')
    monkeypatch.setattr(tp, 'write_mp4', boom)                     # a failure half-way through writing: nothing is left behind
    code, o, e = _cli('generate', '--image', files/'face.png', '--audio', files/'speech44k.wav', '--out', tmp_path/'x.mp4', '--model', files/'pipe', '--quiet')
    assert code == 1 and e.splitlines()[-1] == 'turbotalk: error: unexpected RuntimeError: disk on fire second line (TURBOTALK_DEBUG=1 shows the traceback)'
    assert 'Traceback' not in e
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv('TURBOTALK_DEBUG', '1')
    with pytest.raises(RuntimeError, match='disk on fire'):
        _cli('generate', '--image', files/'face.png', '--audio', files/'speech44k.wav', '--out', tmp_path/'x.mp4', '--model', files/'pipe', '--quiet')
    assert list(tmp_path.iterdir()) == []


def test_demo_and_export(files, tmp_path):
    code, o, e = _cli('demo', '--out', tmp_path/'d.mp4', '--seconds', '0.6', '--model', files/'pipe', '--quiet', '--seed', '2')
    assert code == 0, e
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d.mp4', 'd_face.png', 'd_speech.wav']
    assert f"wrote {tmp_path/'d.mp4'}: 15 frames" in o and len(read_video(tmp_path/'d.mp4').frames) == 15
    code, o, e = _cli('generate', '--image', tmp_path/'d_face.png', '--audio', tmp_path/'d_speech.wav', '--out', tmp_path/'g.mp4',
                      '--model', files/'pipe', '--quiet', '--seed', '2')
    assert code == 0 and np.array_equal(read_video(tmp_path/'g.mp4').frames, read_video(tmp_path/'d.mp4').frames)   # demo = generate on its inputs
    code, o, e = _cli('demo', '--out', tmp_path/'e.mp4', '--seconds', '99', '--model', files/'pipe', '--quiet')
    assert code == 1 and 'seconds must be in [0.2, 60]' in e and not (tmp_path/'e.mp4').exists()
    code, o, e = _cli('export', '--out', tmp_path/'exp', '--model', files/'pipe')
    assert code == 0 and (tmp_path/'exp'/'model_index.json').is_file()


# ---------------------------------------------------------------- streaming and length
@pytest.mark.parametrize('steps,n_ctx', [(1, 2), (2, 0), (0, 1)])
def test_streaming_yields_the_frames_of_the_whole_call(steps, n_ctx):
    pipe = _quiet(random_pipeline(steps=steps, chunk=8, n_ctx=n_ctx, seed=1))
    face, speech = (np.random.default_rng(1).random((16, 16, 3))).astype(np.float32), _tone(1.7, 22050)
    whole = pipe(face, speech, 22050, seed=5)
    chunks = list(pipe.stream(face, speech, 22050, seed=5))
    plan = chunk_plan(len(whole.frames), 8, n_ctx)
    assert len(chunks) == len(plan) == whole.info['chunks']
    assert [c.start for c in chunks] == [0] + [s + n_ctx for s, _ in plan[1:]]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), whole.audio)
    el = [c.elapsed for c in chunks]
    assert el == sorted(el) and chunks[-1].rtf == pytest.approx(el[-1] / (len(whole.frames) / 25))


def test_long_audio_is_chunked_to_the_right_number_of_frames():
    pipe = _quiet(random_pipeline(steps=1, chunk=8, n_ctx=2))
    sr = 22050; speech = np.stack([_tone(30.52, sr), _tone(30.52, sr, 300.)], 1)         # 30.52 s of 22.05 kHz stereo (N, 2)
    res = pipe(np.zeros((16, 16, 3), np.uint8) + 90, speech, sr)
    T = round(30.52 * 25)
    assert res.frames.shape == (T, 16, 16, 3) and len(res.audio) == T * 640
    assert res.info['chunks'] == len(chunk_plan(T, 8, 2)) == 127 and res.info['nfe'] == 127
    assert chunk_plan(T, 8, 2)[-1][1] == T


# ---------------------------------------------------------------- the Run section
def test_papermill_tiny_run_writes_the_measurements(tmp_path):
    "The Run section on a tiny random 1-step pipeline and a tiny random teacher, short clips, two voices."
    import papermill as pm
    for name, steps in (('model', 1), ('teacher', 0)):
        _quiet(random_pipeline(steps=steps, size=64, chunk=8, n_ctx=2 if steps else 0)).save_pretrained(tmp_path/name)
    out = tmp_path/'run'
    params = dict(model=str(tmp_path/'model'), steps=0, teacher=str(tmp_path/'teacher'), data=str(tmp_path/'st'), seconds=1.28,
                  short=0.64, n_long=2, n_voices=2, voice_frames=12, out=str(out))
    pm.execute_notebook(str(NB), str(tmp_path/'06_pipeline.ipynb'), parameters=params, cwd=str(ROOT), kernel_name='python3', progress_bar=False)
    assert set(pm.inspect_notebook(str(NB))) == set(json.loads((out/'config.json').read_text())['config'])   # every parameter recorded
    R = json.loads((out/'results.json').read_text())
    s = R['speed']
    assert (s['model'], s['frames'], s['mp4_frames'], s['chunks'], s['nfe_per_chunk']) == ('random 1-step', 32, 32, 5, 1)
    assert abs(s['mp4_audio_s'] - 1.28) < 0.05 and s['saved_identical'] and s['identical_rerun']
    assert all(s[k] > 0 for k in ('load_s', 'first_frame_s', 'generate_s', 'rtf', 'load_saved_s'))
    assert s['cli_s'] > 0 and s['cli'].startswith('turbotalk generate --image') and str(tmp_path) in s['cli']   # the whole command, timed
    assert s['teacher']['model'] == 'random teacher 2 x 3 CFG' and s['teacher']['nfe'] == 4 * 6 and s['speedup'] > 0
    L = R['long']
    assert L['trace']['seams'] == [8, 14, 20, 26] and len(L['trace']['model']) == 31 and len(L['clips']) == 2
    assert all(np.isfinite(v) for v in [*L['seam_ratio'].values(), *L['sync'].values(), *L['sync_segments']])
    assert len(L['sync_segments']) == 2 and L['sync']['gt'] > 0.5                  # the ground truth is in sync
    V = R['voices']
    assert list(V['rows']) == ['clean', '-30 dBFS', '44.1 kHz stereo', 'noise 20 dB SNR', 'shuffled control'] and V['n_items'] == 2
    assert 'teacher_rows' not in V                                                  # a pipeline folder has no robustness record
    for f in ('samples/long_model.mp4', 'samples/long_teacher.mp4', 'samples/long_side_by_side.mp4', 'inputs/face.png',
              'inputs/speech.wav', 'figs/pipeline.png', 'pipeline/model_index.json', 'cmd.txt'):
        assert (out/f).is_file(), f
    v = read_video(out/'samples'/'long_side_by_side.mp4')
    assert v.frames.shape == (32, 64, 130, 3) and v.audio is not None
    assert (tmp_path/'st'/'test').is_dir()                                          # the missing test split was written
