#!/usr/bin/env python
"""Which committed runs are stale: a run (a folder of papermill_runs/ with a cmd.txt) is stale when the code cells of the
chapter its cmd.txt names (nbs/<chapter>.ipynb) changed in git between the commit its record names (results.json or
config.json: env.git, without '-dirty') and HEAD.  A chapter whose prose (markdown) alone changed leaves its runs current:
prose does not run.  `python scripts/stale_runs.py [REPO]` prints a table of every run; it never fails on stale runs."""
import json, re, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def _git(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True)

def _record(run:Path) -> str|None:
    "env.git of results.json, else of config.json (with its '-dirty' suffix, if any)."
    for f in ('results.json', 'config.json'):
        try: sha = (json.loads((run/f).read_text()).get('env') or {}).get('git')
        except (OSError, ValueError, AttributeError): continue
        if sha: return sha
    return None

def _chapter(run:Path) -> str|None:
    "The nbs/ notebook the run's cmd.txt executes."
    m = re.search(r'\bnbs/[\w.-]+\.ipynb', (run/'cmd.txt').read_text()) if (run/'cmd.txt').is_file() else None
    return m.group(0) if m else None

def code_cells(text:str) -> list[str]:
    "The sources of a notebook's code cells (trailing whitespace dropped): what a papermill run of it executes."
    return [''.join(c.get('source', '')).rstrip() for c in json.loads(text).get('cells', []) if c.get('cell_type') == 'code']

def _code_at(root, rev:str, nb:str) -> list[str]|None:
    r = _git(root, 'show', f'{rev}:{nb}')
    try: return code_cells(r.stdout) if r.returncode == 0 else None
    except ValueError: return None

def run_status(root=REPO) -> list[dict]:
    "One row per run: run, notebook, commit (as recorded), status (current / stale / no record / unknown commit / no chapter), commits."
    root = Path(root); rows = []
    for cmd in sorted((root/'papermill_runs').glob('**/cmd.txt')):
        if any(p.startswith('stale-') for p in cmd.relative_to(root).parts): continue   # a set-aside record (git-ignored)
        run, nb, rec = cmd.parent, _chapter(cmd.parent), _record(cmd.parent)
        row = dict(run=str(run.relative_to(root)), notebook=nb or '', commit=rec or '', status='', commits=0)
        sha = rec.removesuffix('-dirty') if rec else None
        if nb is None: row['status'] = 'no chapter in cmd.txt'
        elif sha is None: row['status'] = 'no record'
        elif _git(root, 'cat-file', '-e', f'{sha}^{{commit}}').returncode: row['status'] = 'unknown commit'
        else:
            changed = _git(root, 'diff', '--quiet', sha, 'HEAD', '--', nb).returncode == 1
            row['commits'] = int(_git(root, 'rev-list', '--count', f'{sha}..HEAD', '--', nb).stdout.strip() or 0)
            row['status'] = ('current' if not changed else
                             'current (prose changed)' if _code_at(root, sha, nb) == _code_at(root, 'HEAD', nb) else 'stale')
        rows.append(row)
    return rows

def stale_runs(root=REPO) -> list[dict]:
    "The rows of run_status whose chapter changed since the recorded commit."
    return [r for r in run_status(root) if r['status'] == 'stale']

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else REPO
    if _git(root, 'rev-parse', '--git-dir').returncode: print(f'{root} is not a git checkout'); return 0
    rows, cols = run_status(root), ('status', 'commits', 'notebook', 'commit', 'run')
    w = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    print('  '.join(c.ljust(w[c]) for c in cols))
    for r in rows: print('  '.join(str(r[c]).ljust(w[c]) for c in cols))
    print(f"{sum(r['status'] == 'stale' for r in rows)} of {len(rows)} runs are stale "
          '(commits: commits to the chapter since the recorded one)')
    return 0

if __name__ == '__main__': sys.exit(main())
