"""Launch target of tests/test_stage.py: a toy method trained by `turbotalk.stage.fit`.

Runs under plain `python` (one process) or `accelerate launch` (N processes). Every process writes
<out>/rank<r>.json: its history (process-mean logs per step), the dataset indices it loaded, and the
process count Accelerate saw.
"""
import argparse, json, os
import torch
from torch.utils.data import DataLoader
from turbotalk.core import RunDir
from turbotalk.stage import Callback, StageConfig, ToyData, ToyFlow, ToyGAN, build_ctx, fit


class Recorded(ToyData):
    "ToyData that records the indices this process loads."
    seen = []
    def __getitem__(self, i): Recorded.seen.append(int(i)); return super().__getitem__(i)


class World(Callback):
    "Remember how many processes Accelerate saw."
    n = 0
    def on_fit_start(self, st): World.n = st.acc.num_processes


def main():
    p = argparse.ArgumentParser()
    p.add_argument('out')                                   # run directory
    p.add_argument('--method', default='flow', choices=['flow', 'gan'])
    p.add_argument('--steps', type=int, default=8)          # cfg.max_steps
    p.add_argument('--bs', type=int, default=64)            # GLOBAL batch
    p.add_argument('--n', type=int, default=320)            # dataset size (320 / 64 = 5 batches per epoch)
    p.add_argument('--d_per_g', type=int, default=1)
    p.add_argument('--ckpt_every', type=int, default=0)
    p.add_argument('--resume', action='store_true')
    p.add_argument('--cpu', action='store_true')
    p.add_argument('--shard', default='none', choices=['none', 'fsdp2'])
    a = p.parse_args()
    cfg = StageConfig(max_steps=a.steps, bs=a.bs, lr_g=1e-2, lr_d=1e-2, d_per_g=a.d_per_g, ema=.9, log_every=1,
                      ckpt_every=a.ckpt_every, cpu=a.cpu, out=a.out, resume=a.resume, shard=a.shard)
    torch.manual_seed(0)
    with build_ctx(cfg): method = ToyFlow() if a.method == 'flow' else ToyGAN()   # fsdp2: processes > 0 on meta
    hist = fit(method, DataLoader(Recorded(a.n), batch_size=a.bs, shuffle=True), cfg, RunDir(a.out), callbacks=[World()])
    rank = int(os.environ.get('RANK', 0))
    rec = dict(history=hist, indices=Recorded.seen, num_processes=World.n)
    (RunDir(a.out).path/f'rank{rank}.json').write_text(json.dumps(rec))


if __name__ == '__main__': main()
