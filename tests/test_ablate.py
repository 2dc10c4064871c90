"""The ablation driver and collector (turbotalk.ablate, chapter 07). The driver runs a tiny grid over a toy stage notebook
written here (a parameters cell like a real stage's, and a body that writes a run's records in a second): every point
runs once, a second pass runs nothing and changes no file, a grid killed mid-run completes when run again (the killed run
resumes, finished ones are not redone), and --dry-run lists and runs nothing. The collector, on run folders made here by
hand, gives the right means, spreads and verdicts, and keeps stale runs out of them. The real grid is checked without
running anything: its seed-0 base runs are the main job's (scripts/demo.py) jobs, and its dry run writes nothing."""
import csv, hashlib, importlib.util, json, math, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
from turbotalk.core import stamp_run
from turbotalk import ablate as A

ROOT = Path(__file__).resolve().parents[1]

TOY = '''import json, os, time
from pathlib import Path
run = Path(out); run.mkdir(parents=True, exist_ok=True)
with open(run/'calls.log', 'a') as f: f.write(json.dumps(dict(seed=seed, x=x, resume=resume)) + '\\n')
time.sleep(float(os.environ.get('TOY_DELAY', '0')))
rows = [dict(name='toy 1 step', nfe=1, fid_st=x + 0.01 * seed, fvd_st=2 * x, sync_corr=0.9 - 0.01 * seed)]
(run/'results.json').write_text(json.dumps(dict(rows=rows, speed=dict(nfe_student=1, nfe_teacher=8, speedup=7.0 + seed))))
env = dict(device='toy cpu', omp=os.environ.get('OMP_NUM_THREADS'), mpl=os.environ.get('MPLBACKEND'))
(run/'config.json').write_text(json.dumps(dict(config=dict(seed=seed, x=x), env=env)))
(run/'cmd.txt').write_text(os.environ.get('TURBOTALK_CMD', '') + '\\n')
(run/'compare.csv').write_text('name,nfe,fid_st,fvd_st,sync_corr\\nteacher 8 steps,8,1.0,1.5,0.95\\n')
(run/'metrics.jsonl').write_text(''.join(json.dumps(dict(step=i, g_loss=x / i, d_loss=0.5)) + '\\n' for i in range(1, 6)))'''

PARAMS = "seed: int = 0          # seed\nx: float = 1.0         # the knob\nout: str = ''          # run folder\nresume: bool = False   # continue"

SCRIPT = '''import sys
from pathlib import Path
from turbotalk.ablate import Study, Claim, main
S = [Study('base', 'toy.ipynb', dict(x=1.0), [{}], 'toy 1 step', prefix='toy', folder='toy', seeds=(0, 1), threads=1),
     Study('knob', 'toy.ipynb', dict(x=1.0), [dict(x=1.0), dict(x=3)], 'toy 1 step', seeds=(0, 1), needs=('base',), threads=1)]
sys.exit(main(sys.argv[1:], S, [Claim('x1 beats x3', ('knob', 'x1'), ('knob', 'x3'))], [], skip=(), root=Path.cwd()))
'''
RUNS = ['toy/toy_seed0', 'toy/toy_seed1', 'knob/x3_seed0', 'knob/x3_seed1']   # the grid's 4 runs (x=1 of `knob` is the base)


def toy_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMS, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(TOY)]
    nbformat.write(nb, str(path)); return path


@pytest.fixture
def repo(tmp_path):
    "A folder standing in for the repository root: the toy notebook and the driver script over a 4-run grid."
    toy_notebook(tmp_path/'toy.ipynb'); (tmp_path/'grid.py').write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    env.pop('TOY_DELAY', None)
    return tmp_path, env


def _grid(repo, *args, check=True, **kw):
    d, env = repo
    r = subprocess.run([sys.executable, 'grid.py', *args], cwd=d, env=env | kw, capture_output=True, text=True, timeout=300)
    if check: assert r.returncode == 0, r.stdout + r.stderr
    return r


def _calls(d: Path) -> dict:
    return {r: len((d/'papermill_runs'/r/'calls.log').read_text().splitlines()) if (d/'papermill_runs'/r/'calls.log').is_file() else 0
            for r in RUNS}


def _snapshot(d: Path) -> dict:
    "Every file of the run folders (not the collector's outputs at the top)."
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob('*/*/**/*')) if p.is_file()}


def test_dry_run_lists_and_runs_nothing(repo):
    d, _ = repo
    out = _grid(repo, '--dry-run').stdout
    for r in RUNS: assert f'new      papermill_runs/{r}' in out, out
    assert 'total: 4 of 4 runs to make' in out and '$ ' not in out
    assert not (d/'papermill_runs').exists()                  # nothing run, nothing collected
    r = _grid(repo, '--dry-run', '--study', 'nope', check=False)
    assert r.returncode == 2 and "unknown studies ['nope']" in r.stderr


def test_every_point_runs_once_and_a_second_pass_does_nothing(repo):
    d, _ = repo
    out = _grid(repo).stdout
    assert _calls(d) == dict.fromkeys(RUNS, 1), out
    for r in RUNS:
        assert json.loads((d/'papermill_runs'/r/'inputs.json').read_text())['status'] == 'done'
        assert (d/'papermill_runs'/r/'toy.ipynb').is_file()   # the executed notebook, in its run folder
    cmd = (d/'papermill_runs/knob/x3_seed1/cmd.txt').read_text()
    assert cmd.startswith('papermill toy.ipynb papermill_runs/knob/x3_seed1/toy.ipynb') and '-p x 3 -p seed 1 -p resume True' in cmd
    assert (d/'papermill_runs'/'RESULTS.md').is_file() and (d/'papermill_runs'/'results.csv').is_file()
    before = _snapshot(d)
    out = _grid(repo).stdout
    assert '$ ' not in out and 'total: 0 of 4 runs to make' in out, out   # no papermill job started
    assert _snapshot(d) == before and _calls(d) == dict.fromkeys(RUNS, 1)


def test_a_killed_grid_completes_when_run_again(repo):
    d, env = repo
    p = subprocess.Popen([sys.executable, 'grid.py', '--no-collect'], cwd=d, env=env | dict(TOY_DELAY='5'),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while _calls(d)[RUNS[1]] == 0 and p.poll() is None and time.time() - t0 < 120: time.sleep(0.2)   # the 2nd run has started
    assert p.poll() is None, p.stdout.read()
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert _calls(d) == {RUNS[0]: 1, RUNS[1]: 1, RUNS[2]: 0, RUNS[3]: 0}
    st = json.loads((d/'papermill_runs'/RUNS[1]/'inputs.json').read_text())['status']
    assert st == 'running'                                   # killed: its stamp says so
    plan = _grid(repo, '--dry-run').stdout
    assert f'resume   papermill_runs/{RUNS[1]}' in plan and 'total: 3 of 4 runs to make' in plan, plan
    out = _grid(repo).stdout
    assert _calls(d) == {RUNS[0]: 1, RUNS[1]: 2, RUNS[2]: 1, RUNS[3]: 1}, out   # the killed run again, the finished one not
    assert json.loads((d/'papermill_runs'/RUNS[1]/'calls.log').read_text().splitlines()[-1])['resume'] is True
    assert all(json.loads((d/'papermill_runs'/r/'inputs.json').read_text())['status'] == 'done' for r in RUNS)
    assert 'total: 0 of 4 runs to make' in _grid(repo, '--dry-run').stdout


# ---------------------------------------------------------------- the collector on hand-made run folders
FID = {'a': [1.0, 1.2], 'b': [2.0, 2.1, 1.9], 'c': [1.05, 1.45, 1.25], 'd': [1.3]}   # the FID-ST of each variant's seeds


def _fake_run(run: Path, eff: dict, fid: float, seed: int, device='cpu (2 cores)'):
    "A finished run folder as a stage notebook leaves it (its numbers chosen here), stamped with the job's parameters."
    run.mkdir(parents=True, exist_ok=True)
    row = dict(name='toy 1 step', nfe=1, fid_st=fid, fvd_st=2 * fid, sync_corr=0.9, speedup=8.0)
    (run/'results.json').write_text(json.dumps(dict(rows=[row], speed=dict(nfe_student=1, speedup=7.0 + seed, threads=2))))
    (run/'config.json').write_text(json.dumps(dict(config={}, env=dict(device=device, git=f'{seed}' * 40))))   # made at commit 000..., 111...
    (run/'compare.csv').write_text('name,nfe,fid_st,fvd_st,sync_corr,speedup\nteacher 8 steps,8,1.0,1.5,0.95,1.0\nground truth,,0.5,0.2,0.98,\n')
    (run/'cmd.txt').write_text(f'papermill toy.ipynb {run}/toy.ipynb -p seed {seed}\n')
    (run/'metrics.jsonl').write_text(''.join(json.dumps(dict(step=i, g_loss=fid / i, d_loss=0.5)) + '\n' for i in range(1, 4)))
    stamp_run(run, eff, (), 'done')


@pytest.fixture
def collected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path); toy_notebook(tmp_path/'toy.ipynb')
    x = dict(a=1.0, b=2.0, c=3.0, d=4.0)
    S = [A.Study('v', 'toy.ipynb', {}, [dict(x=x[k]) for k in 'abcd'], 'toy 1 step', seeds=(0, 1, 2)),
         A.Study('sweep', 'toy.ipynb', {}, [dict(x=v) for v in (5.0, 6.0, 7.0)], 'toy 1 step', seeds=(0, 1)),
         A.Study('one', 'toy.ipynb', {}, [{}], 'toy 1 step')]   # the default x=1: the runs of v/x1
    pts = A.grid(S)
    for p in A.distinct(pts).values():
        p = p[0]; k = next((k for k, v in x.items() if p.knobs.get('x') == v), None)
        if (k, p.seed) == ('a', 2): _fake_run(Path(p.run), p.eff | dict(x=99.0), 50.0, 2)   # made with other parameters: stale
        elif k and p.seed < len(FID[k]): _fake_run(Path(p.run), p.eff, FID[k][p.seed], p.seed)
        if p.study == 'sweep': _fake_run(Path(p.run), p.eff, {5.0: 3.0, 6.0: 2.0, 7.0: 2.9}[p.knobs['x']] + 0.1 * p.seed, p.seed)
    claims = [A.Claim('a > b', ('v', 'x1'), ('v', 'x2')), A.Claim('a > c', ('v', 'x1'), ('v', 'x3')),
              A.Claim('b > a', ('v', 'x2'), ('v', 'x1')), A.Claim('a > d', ('v', 'x1'), ('v', 'x4'))]
    res = A.collect(pts, S, claims, [A.Optimum('sweep peaks inside', 'sweep', 'x')], out='papermill_runs', skip=(), cmd='pytest collect')
    return res, tmp_path/'papermill_runs'


def test_collector_means_spreads_and_verdicts(collected):
    res, out = collected
    st = {(r['label'], r['seed']): r['state'] for r in res['records'] if r['study'] == 'v'}
    assert st[('x1', 2)] == 'stale' and st[('x1', 0)] == 'done' and st[('x4', 1)] == 'not run'
    fid = A.values(res['records'], 'v', 'x1', 'fid_st')
    assert fid == [1.0, 1.2]                                  # the stale seed 2 (FID 50) is not counted
    m, s, n = A.mean_std(A.values(res['records'], 'v', 'x2', 'fid_st'))
    assert (n, math.isclose(m, 2.0), math.isclose(s, 0.1)) == (3, True, True)
    v = {c['name']: c for c in res['verdicts']}
    assert [r['verdict'] for r in v['a > b']['rows']] == ['holds', 'holds', 'within noise']   # FID, FVD lower; same Sync-corr
    assert v['a > b']['verdict'] == 'holds' and v['b > a']['verdict'] == 'does not hold'
    assert v['a > c']['rows'][0]['verdict'] == 'within noise'  # 1.1 vs 1.25, spreads 0.14 and 0.2
    assert v['a > d']['verdict'] == 'not yet run' and v['a > d']['rows'][0]['b'] == '1.3 (1)'   # one seed: numbers, no verdict
    assert v['a > b']['rows'][0]['a'] == '1.1 ± 0.14 (2) [stale, not counted: 50 (1)]'   # shown, never in the mean
    assert math.isclose(v['a > b']['rows'][0]['diff'], 0.9)
    assert v['sweep peaks inside']['rows'][0]['verdict'] == 'holds' and v['sweep peaks inside']['rows'][0]['a'] == 'best x = 6.0'


def test_collector_writes_results_md_csv_and_figures(collected):
    res, out = collected
    md = (out/'RESULTS.md').read_text()
    assert '- **a > b** (v/x1 vs v/x2): **holds**' in md and '- **a > d** (v/x1 vs v/x4): **not yet run**' in md
    assert '| papermill_runs/v/x1_seed2 | stale | parameter x:' in md         # listed apart, with why
    assert 'Made by `pytest collect`' in md and 'cpu (2 cores), 2 threads' in md   # the command and the device
    assert '| cpu (2 cores), 2 threads | 1111111 |' in md and '| 0000000 |' in md   # each run's commit (its config.json)
    assert '| toy 1 step | 1 | 2 | 1.1 ± 0.14 (2) |' in md and '| teacher 8 steps | 8 | 1 |' in md   # NFE table: students, baselines
    for f in ('results_quality_nfe.png', 'results_speedup_nfe.png', 'results_sweep.png', 'results_curves.png'):
        assert (out/f).stat().st_size > 5000 and f'({f})' in md, f
    rows = list(csv.DictReader(open(out/'results.csv')))
    assert len([r for r in rows if r['study'] == 'v']) == 10 and {r['state'] for r in rows if r['run'].endswith('x1_seed2')} == {'stale'}
    assert [r['row'] for r in rows if r['study'] == 'baseline'] == ['teacher 8 steps', 'ground truth']
    assert {r['git'] for r in rows if r['run'].endswith('_seed1')} == {'1' * 40}


# ---------------------------------------------------------------- the real grid, run nothing
def _demo():
    spec = importlib.util.spec_from_file_location('demo_for_ablate', ROOT/'scripts'/'demo.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_real_grid_shares_the_main_jobs_runs(monkeypatch):
    monkeypatch.chdir(ROOT); monkeypatch.delenv('SYNTHTALK', raising=False); monkeypatch.delenv('RUNS', raising=False)
    demo, pts = _demo(), A.grid(A.STUDIES)
    assert all(len(s.seeds) >= 3 for s in A.STUDIES) and len(A.distinct(pts)) == 36
    for name, nb, run, params, files, outs, threads, about in demo.STEPS:
        if name not in ('dmd1', 'dmd4', 'adv'): continue
        p = next(p for p in pts if p.run == run)              # the study's seed-0 base run is the main job's
        assert p.seed == 0 and p.eff == A.effective(nb, params) and p.files == tuple(files)
        assert p.outputs == tuple(o for o in outs if not o.endswith('.safetensors'))   # the grid asks for records, not weights
    lam = {p.knobs['lambda_sc']: p.run for p in pts if p.study == 'lambda_sc' and p.seed == 1}
    assert lam == {0: 'papermill_runs/lambda_sc/lambda_sc0_seed1', 0.25: 'papermill_runs/lambda_sc/lambda_sc0.25_seed1',
                   0.5: 'papermill_runs/adv/synth_adv_seed1', 1: 'papermill_runs/lambda_sc/lambda_sc1_seed1',
                   2: 'papermill_runs/lambda_sc/lambda_sc2_seed1'}


def test_real_dry_run_writes_nothing():
    had = {p for p in (ROOT/'papermill_runs').iterdir()}
    # seed 7: a seed no study runs, so the plan does not depend on which grid runs are made by now
    r = subprocess.run([sys.executable, '-m', 'turbotalk.ablate', '--dry-run', '--study', 'loss', '--seeds', '7'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr
    assert 'papermill_runs/loss/loss-hinge_seed7' in r.stdout and 'papermill_runs/adv/synth_adv_seed7' in r.stdout
    assert 'of 3 runs to make' in r.stdout, r.stdout
    assert {p for p in (ROOT/'papermill_runs').iterdir()} == had
