"House rules that are cheap to check on every notebook."
import json, re
from pathlib import Path

NBS = sorted((Path(__file__).parent.parent/'nbs').glob('*.ipynb'))
# `Cls.attr = func` / `Cls.attr = lambda self: ...` in exported code: methods are attached one way only, fastcore's @patch
ATTACH = re.compile(r'^[A-Z]\w*\.\w+(\s*,\s*[A-Z]\w*\.\w+)*\s*=\s*(lambda\s+self\b|_?[a-z]\w*\s*(,\s*_?[a-z]\w*\s*)*$)', re.M)

def exported(nb):
    for c in json.loads(nb.read_text())['cells']:
        s = ''.join(c['source'])
        if c['cell_type'] == 'code' and s.startswith('#|export'): yield c.get('id'), s

def test_methods_are_attached_with_patch():
    bad = [(nb.name, cid, m.group(0)) for nb in NBS for cid, s in exported(nb) for m in ATTACH.finditer(s)]
    assert not bad, f'attach methods with fastcore @patch, not by assignment: {bad}'

def test_the_rule_sees_assignments():
    assert ATTACH.search('Foo.g_loss = _foo_g_loss') and ATTACH.search('A.x, A.y = _f, _g') and ATTACH.search('T.__len__ = lambda self: 1')
    assert not ATTACH.search('Foo.version = 3') and not ATTACH.search("Cfg.name = 'x'")


# ---------------------------------------------------------------- portable set-up (issue 15)
ROOT = Path(__file__).parent.parent
SETUP_FILES = ('settings.ini', 'setup.py', 'constraints.txt', 'Makefile', 'scripts/setup.sh', 'scripts/test.sh', 'scripts/demo.sh')

def test_setup_names_no_host():
    "No package index, docs host or repository URL is baked into the set-up: an index comes from an environment variable."
    hits = [(f, l.strip()) for f in SETUP_FILES for l in (ROOT/f).read_text().splitlines() if re.search(r'https?://|\.invalid\b', l)]
    assert not hits, f'set-up files name hosts: {hits}'

def _lower(spec:str|None) -> tuple:
    m = re.search(r'>=\s*(\d+)\.(\d+)', spec or ''); return (int(m[1]), int(m[2])) if m else (0, 0)

def test_min_python_covers_the_pins():
    "settings.ini's min_python is at least every installed requirement's Requires-Python lower bound."
    import configparser, importlib.metadata as md
    c = configparser.ConfigParser(delimiters=['=']); c.read(ROOT/'settings.ini'); d = c['DEFAULT']
    mine = tuple(map(int, d['min_python'].split('.')))
    names = [re.split(r'[<>=!\[ ]', r)[0] for r in d['requirements'].split()]
    need = {n: _lower(md.metadata(n).get('Requires-Python')) for n in names}
    assert need and all(v <= mine for v in need.values()), f"min_python {d['min_python']} < {[(n, v) for n, v in need.items() if v > mine]}"
    assert _lower('>=3.11.0') == (3, 11) and _lower(None) == (0, 0)
