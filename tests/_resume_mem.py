"""Launch target of tests/test_fsdp.py::test_sharded_resume_reads_on_process0_only: a wide toy flow (ToyFlow whose MLP has
4 hidden layers of 2048: 12.6 M parameters, 50 MB of float32 weights) trained by `turbotalk.stage.fit` with shard='fsdp2'
(and meta_init) on 2 CPU processes, a checkpoint every 2 steps. Every process writes <out>/rank<r>.json: its history,
the checkpoint files it read (load_weights, torch.load) or hashed (the integrity check) during `fit`, and the resident
memory (MB) it added at its peak inside `resume_ckpt` (the kernel's high-water mark, reset just before: clear_refs 5)."""
import argparse, json, os
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from turbotalk import stage
from turbotalk.core import RunDir
from turbotalk.stage import StageConfig, ToyData, ToyFlow, build_ctx, fit, mlp

READ = []   # (how, file name) in call order

def spy(fn, how:str):
    "`fn` that first records the name of the file it is given."
    def f(p, *a, **kw): READ.append((how, Path(str(getattr(p, 'name', p))).name)); return fn(p, *a, **kw)
    return f

def status_mb(key:str) -> float:
    "VmRSS or VmHWM (the peak since the last reset) of this process, in MB."
    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))
    return int(line.split()[1]) / 1e3

def measured(resume):
    "`resume_ckpt` that records the peak resident memory it adds."
    def f(st):
        with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')   # VmHWM <- VmRSS now
        r0 = status_mb('VmRSS'); out = resume(st)
        REC['resume_mb'] = status_mb('VmHWM') - r0
        return out
    return f

REC = {}

class Wide(ToyFlow):
    "The toy flow with a wide, deep velocity MLP (what it learns does not matter, only its size)."
    def __init__(self, h:int=2048, n:int=4): super().__init__(8); self.teacher.net = mlp(3, 2, h, n)

def main():
    p = argparse.ArgumentParser(); p.add_argument('out'); p.add_argument('--resume', action='store_true')
    a = p.parse_args()
    stage.load_weights, stage._sha256 = spy(stage.load_weights, 'read'), spy(stage._sha256, 'hash')
    torch.load, stage.resume_ckpt = spy(torch.load, 'read'), measured(stage.resume_ckpt)
    cfg = StageConfig(max_steps=4, bs=64, lr_g=1e-3, ema=.9, log_every=1, ckpt_every=2, cpu=True, shard='fsdp2',
                      resume=a.resume, out=a.out)
    torch.manual_seed(0)
    with build_ctx(cfg): m = Wide()
    REC['model_mb'] = 4 * sum(p.numel() for p in m.parameters()) / 1e6
    REC['history'] = fit(m, DataLoader(ToyData(256), batch_size=64, shuffle=True), cfg, RunDir(a.out))
    REC['read'] = READ
    (RunDir(a.out).path/f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(REC))

if __name__ == '__main__': main()
