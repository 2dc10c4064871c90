"""The speed benchmark (turbotalk.bench): the CLI at tiny size on CPU, NFE counts, speed-ups from one run, bad arguments.

No timing assertions: speed belongs in the benchmark's records, not in tests.
"""
import csv, dataclasses, json, os, subprocess, sys
from pathlib import Path
import pytest, torch
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from turbotalk import bench
from turbotalk.bench import (BenchConfig, NFECounter, SamplerSpec, add_speedups, bench_table, main, pixel_pipeline,
                             random_model, sampler_specs, wan_rows)

ROOT = Path(__file__).resolve().parent.parent
COLS = ['name', 'nfe', 'median_s', 'p10_s', 'p90_s', 'prepare_s', 'denoise_s', 'decode_s', 's_per_nfe', 'fps', 'rtf',
        'peak_mem_mb', 'device', 'dtype', 'speedup', 'denoise_speedup', 'nfe_ratio', 'extrapolated', 'measured_nfe']

@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    "One real CLI run at tiny size on CPU (teacher measured at 4 steps, extrapolated to 40), with --wan (skipped on CPU)."
    out = tmp_path_factory.mktemp('bench') / 'run'
    cmd = [sys.executable, '-m', 'turbotalk.bench', '--preset', 'tiny', '--device', 'cpu', '--frames', '3', '--runs', '5',
           '--warmup', '1', '--measure-steps', '4', '--wan', '--out', str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg'))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p

def test_cli_writes_records(cli_run):
    out, p = cli_run
    for f in ['results.json', 'table.md', 'table.csv', 'config.json', 'cmd.txt', 'figs/latency.png']: assert (out/f).is_file(), f
    assert (out/'cmd.txt').read_text().startswith('python -m turbotalk.bench --preset tiny')
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['config']['preset'] == 'tiny' and cfg['config']['runs'] == 5 and 'torch' in cfg['env']['versions']
    assert '| teacher 40x3*' in p.stdout and 'needs a CUDA GPU' in p.stderr

def test_cli_table_has_all_columns(cli_run):
    out, _ = cli_run
    rows = list(csv.DictReader(open(out/'table.csv')))
    assert len(rows) == 7 and all(c in rows[0] for c in COLS)
    md = (out/'table.md').read_text().splitlines()
    assert [c.strip() for c in md[0].strip('|').split('|')] == [c for c, _, _ in bench.COLUMNS]
    assert len(md) >= 2 + 7 and all(l.count('|') == len(bench.COLUMNS) + 1 for l in md[2:9])
    assert 'tiny preset' in (out/'table.md').read_text() and 'measured at 12 NFE' in (out/'table.md').read_text()
    res = json.loads((out/'results.json').read_text())
    for r in res['table']:
        assert r['n_runs'] == 5 and r['device'].startswith('cpu') and r['dtype'] == 'float32'
        assert r['p10_s'] <= r['median_s'] <= r['p90_s'] and r['fps'] > 0 and r['rtf'] > 0
        assert r['fps'] == pytest.approx(3 / r['median_s']) and r['rtf'] == pytest.approx(3 / 25 / r['median_s'])
    if sys.platform.startswith('linux'): assert all(r['peak_mem_mb'] > 0 for r in res['table'])
    assert res['wan']['skipped'].startswith('--wan needs a CUDA GPU')

def test_cli_nfe_and_speedups_from_same_run(cli_run):
    res = json.loads((cli_run[0]/'results.json').read_text())
    rows = {r['name']: r for r in res['table']}
    assert {k: r['nfe'] for k, r in rows.items()} == {'teacher 40x3': 120, 'teacher 40x2': 80, 'teacher 40x1': 40,
        'student 4-step': 4, 'student 3-step': 3, 'student 2-step': 2, 'student 1-step': 1}
    assert [rows[f'teacher 40x{p}']['measured_nfe'] for p in (3, 2, 1)] == [12, 8, 4]
    base = rows['teacher 40x3']; assert base['baseline'] and base['speedup'] == 1.0
    for r in rows.values():  # ratios are those of this run's own rows
        assert r['speedup'] == pytest.approx(base['median_s'] / r['median_s'])
        assert r['denoise_speedup'] == pytest.approx(base['denoise_s'] / r['denoise_s'])
        assert r['nfe_ratio'] == pytest.approx(120 / r['nfe'])

def test_nfe_counts_match_network_evaluations():
    "Every row feeds the network exactly `nfe` batch rows per clip: teacher 40x3 = 120, 40x2 = 80, 40x1 = 40, students n."
    model, prepare, decode, shape = pixel_pipeline('tiny', n_frames=2)
    cnt = NFECounter(model)
    specs = sampler_specs(cnt, prepare, decode, shape)
    assert [s.nfe for s in specs] == [120, 80, 40, 4, 3, 2, 1]
    with torch.inference_mode():
        for s in specs:
            cnt.rows = 0; s.denoise(s.prepare())
            assert cnt.rows == s.nfe, s.name

def test_speedups_within_one_table():
    mm = lambda n: (lambda c: [c @ c for _ in range(n)])
    specs = [SamplerSpec('base', 8, mm(8), prepare=lambda: torch.randn(64, 64), baseline=True),
             SamplerSpec('one', 1, mm(1), prepare=lambda: torch.randn(64, 64))]
    rows = bench_table(specs, n_frames=10, n_warmup=1, n_runs=5)
    assert rows[1]['speedup'] == pytest.approx(rows[0]['median_s'] / rows[1]['median_s']) and rows[1]['nfe_ratio'] == 8
    assert add_speedups([dict(rows[1], baseline=False)])[0]['speedup'] is None   # no baseline in the table: no ratio

@pytest.mark.parametrize('args,msg', [
    (['--preset', 'huge'], 'unknown preset'), (['--runs', '3'], 'runs must be >= 5'), (['--dtype', 'int8'], 'unknown dtype'),
    (['--cfg-passes', '3,4'], 'cfg_passes has a value out of range'), (['--student-steps', 'four'], 'comma list of integers'),
    (['--measure-steps', '50'], 'measure_steps'), (['--wan-sizes', 'wan-2b'], 'unknown Wan size'), (['--device', 'tpu'], 'bad device'),
    (['--frames', 'x'], "invalid int value")])
def test_bad_args(args, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e: main(args + ['--out', str(tmp_path/'r')])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path/'r').exists()  # nothing written before validation

@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on machines without a GPU')
def test_cuda_without_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit): main(['--device', 'cuda', '--out', str(tmp_path/'r')])
    assert 'no CUDA GPU is available' in capsys.readouterr().err

def test_wan_sizes_on_meta():
    "The Wan sizes build without memory; 480x832 x 81 frames -> latent (16, 21, 60, 104) -> 32760 tokens."
    for size, lo, hi in [('wan-1.3b', 1.4e9, 2.0e9), ('wan-14b', 14e9, 20e9)]:
        m = random_model(size, device='meta', dtype=torch.bfloat16)
        assert lo < bench.n_params(m) < hi and m.n_tokens((16, 21, 60, 104)) == 32760
        assert m.patch_embedding.weight.dtype == torch.bfloat16 and m.scale_shift_table.dtype == torch.float32

def test_wan_rows_small_on_cpu():
    "The Wan code path (VAE encode/decode, one measured teacher step extrapolated to 40x3) on a shrunken model."
    small = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=1, text_dim=8, text_len=2, audio_dim=8,
                 vae_cfg=dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1))
    rows, info = wan_rows('wan-1.3b', frames=5, height=16, width=16, n_warmup=0, n_runs=1, device='cpu', dtype=torch.float32, **small)
    assert [(r['name'], r['nfe'], r['measured_nfe']) for r in rows] == [('teacher 40x3', 120, 3), ('student 1-step', 1, 1)]
    assert info['latent_shape'] == (1, 16, 2, 2, 2) and rows[1]['nfe_ratio'] == 120

def test_notebook_parameters_are_config_fields():
    import papermill as pm
    params = pm.inspect_notebook(str(ROOT/'nbs'/'05a_bench.ipynb'))
    assert list(params) == [f.name for f in dataclasses.fields(BenchConfig)]
    for f in dataclasses.fields(BenchConfig):
        assert params[f.name]['inferred_type_name'] == (f.type if isinstance(f.type, str) else f.type.__name__)
        if f.name != 'out': assert params[f.name]['help'] == f.metadata['help'], f.name   # one description of each knob
