"""Launch target of tests/test_fsdp.py::test_meta_init_*: a Method of two TalkingDiT denoisers (one trained with an EMA,
one frozen; ~23 M parameters each) built under `build_ctx` and set up by `turbotalk.stage.setup` with shard='fsdp2' on 2
CPU processes. Every process writes <out>/rank<r>.json: the share of its parameters on the meta device before `setup`,
its resident memory (MB) added by the build and at its peak during `setup`, and whether every buffer, weight and EMA
shadow after `setup` equals a model built on the CPU from the same seed."""
import argparse, json, os, resource
import torch
from torch.utils.data import DataLoader
from turbotalk.core import RunDir
from turbotalk.model import TalkingDiT
from turbotalk.stage import Method, StageConfig, ToyData, build_ctx, setup
from turbotalk.teacher import Denoiser

SIZE = dict(num_attention_heads=8, attention_head_dim=64, latent_channels=4, frames_per_latent=1, text_dim=8, text_len=1,
            freq_dim=64, ffn_dim=2048, num_layers=4, audio_dim=8, audio_window=3, audio_tokens=2, audio_hidden=64)

class Pair(Method):
    "A trained student and a frozen teacher: the roles DMD and Stage 2 shard."
    g_roles = ('student',)
    def __init__(self):
        super().__init__()
        self.student, self.teacher = (Denoiser(TalkingDiT(**SIZE), torch.linspace(-1, 1, 8), torch.linspace(1, 2, 8)) for _ in range(2))

def rss_mb() -> float: return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6
def peak_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3   # Linux: kB

def full(t): return t.full_tensor() if hasattr(t, 'full_tensor') else t   # a collective for a sharded tensor

def main():
    p = argparse.ArgumentParser(); p.add_argument('out'); p.add_argument('--meta_init', default='true')
    a = p.parse_args()
    cfg = StageConfig(max_steps=1, bs=4, ema=.9, cpu=True, shard='fsdp2', meta_init=a.meta_init == 'true', out=a.out)
    r0 = rss_mb(); torch.manual_seed(0)
    with build_ctx(cfg): m = Pair()
    ps = list(m.parameters()); n = sum(p.numel() for p in ps)
    rec = dict(meta_before=sum(p.numel() for p in ps if p.is_meta) / n, model_mb=4 * n / 1e6, build_mb=rss_mb() - r0)
    st = setup(m, DataLoader(ToyData(8), batch_size=4), cfg, RunDir(a.out))
    rec['setup_peak_mb'] = peak_mb() - r0
    torch.manual_seed(0); ref = Pair()   # what process 0 built (same seed)
    rec['buffers'] = {k: torch.equal(b, dict(ref.named_buffers())[k]) for k, b in m.named_buffers()}
    rec['weights'] = all(torch.equal(full(v), dict(ref.named_parameters())[k]) for k, v in m.named_parameters())
    rec['ema'] = all(torch.equal(full(v), dict(ref.student.named_parameters())[k]) for k, v in st.ema.roles['student'].named_parameters())
    rec['ema_buffers'] = all(torch.equal(b, dict(ref.student.named_buffers())[k]) for k, b in st.ema.roles['student'].named_buffers())
    rec['local_mb'] = 4 * sum(p.to_local().numel() for p in m.parameters()) / 1e6
    (RunDir(a.out).path/f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(rec))

if __name__ == '__main__': main()
