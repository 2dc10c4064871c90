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
