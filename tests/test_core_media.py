"""Core and media from outside: run records, safe weights, media failure cases a long job must survive."""
import json, os
import numpy as np
import pytest
import torch
from turbotalk.core import RunDir, MediaError, WeightsError, load_weights, save_weights
from turbotalk.media import load_audio, read_video, write_mp4, write_wav


def test_rundir_records(tmp_path):
    run = RunDir(tmp_path / 'run')
    run.write_config({'seed': 0}); run.write_cmd('make demo'); run.log(3, loss=1.0); run.write_results({'ok': 1})
    cfg = json.loads((tmp_path / 'run/config.json').read_text())
    assert cfg['config'] == {'seed': 0} and cfg['env']['versions']['torch'].startswith('2.13')
    assert (tmp_path / 'run/cmd.txt').read_text().strip() == 'make demo'
    assert run.metrics() == [{'step': 3, 'loss': 1.0}]


def test_weights_never_unpickle_objects(tmp_path):
    class Evil:  # a pickle that is not plain tensors must be refused by weights_only loading
        def __reduce__(self): return (os.system, ('true',))
    torch.save({'x': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(WeightsError, match='evil.pt'): load_weights(tmp_path / 'evil.pt')
    save_weights({'w': torch.ones(2)}, tmp_path / 'ok.safetensors')
    assert not list(tmp_path.glob('*.tmp')), 'atomic save leaves no temp file'


@pytest.mark.parametrize('sr,ch', [(8000, 1), (44100, 2), (48000, 1), (16000, 2)])
def test_any_rate_and_layout_becomes_16k_mono(tmp_path, sr, ch):
    t = np.arange(sr // 2) / sr
    write_wav(tmp_path / 'a.wav', np.stack([np.sin(2 * np.pi * 200 * t)] * ch) * 0.5, sr)
    a = load_audio(tmp_path / 'a.wav')
    assert a.dtype == np.float32 and a.ndim == 1 and abs(len(a) - 8000) < 40


def test_media_errors_name_the_file(tmp_path):
    (tmp_path / 'trunc.mp4').write_bytes(b'')
    for p in ['nope.mp4', 'trunc.mp4']:
        with pytest.raises(MediaError, match=p): read_video(tmp_path / p)
    write_mp4(tmp_path / 'v.mp4', np.zeros((3, 16, 16, 3), np.float32))
    with pytest.raises(MediaError, match='no audio track'): load_audio(tmp_path / 'v.mp4')
    # a truncated mp4 (interrupted download) is an error or a shorter video, never a crash of another kind
    write_mp4(tmp_path / 'full.mp4', np.random.rand(20, 32, 32, 3), audio=np.zeros(16000, np.float32))
    data = (tmp_path / 'full.mp4').read_bytes(); (tmp_path / 'cut.mp4').write_bytes(data[: len(data) // 2])
    try: v = read_video(tmp_path / 'cut.mp4')
    except MediaError as e: assert 'cut.mp4' in str(e)
    else: assert len(v.frames) <= 20
