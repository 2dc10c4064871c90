"""turbotalk.scale: the memory plan and the Accelerate configs.

Parameter counts against real instances and diffusers' own Wan model; the meta-device activation measurement against
the same measurement on a real CPU model; the plan's arithmetic (sharding, checkpointing, LoRA); the four config files
through Accelerate's own loader and launch validation; a real 2-process launch with cpu_2proc.yaml; the CLI; and the
committed plan (papermill_runs/scale) recomputed from its own measurements.
"""
import csv, json, os, re, socket, subprocess, sys, textwrap
from pathlib import Path
from unittest import mock
import pytest, torch
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from turbotalk.model import TalkingDiT
from turbotalk.scale import (CKPTS, CONFIGS, GPUS, NS, PARTS, SIZES, STEPS, FlashSDPA, build, configs_for, inputs, launch_args,
                             measure, min_gpus, nograd_peak, numel, param_counts, plan_rows, saved_bytes, set_ckpt,
                             stage_bytes, step_bytes, wan_latent, wan_reference)

ROOT = Path(__file__).resolve().parent.parent
CFG_DIR = ROOT/'configs'/'accelerate'
RUN = ROOT/'papermill_runs'/'scale'
torch.set_num_threads(1)

def _cfg(name): return next(c for c in CONFIGS if c.name == name)

@pytest.fixture(scope='module')
def tiny():
    "A measured tiny model (rank-4 LoRA): the real numbers the arithmetic tests run on."
    return measure('tiny', rank=4, log=lambda *_: None)


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize('size', ['tiny', 'synth'])
def test_meta_count_equals_real_instance(size):
    torch.manual_seed(0); real = TalkingDiT.from_preset(size)
    assert numel(build(size)) == sum(p.numel() for p in real.parameters())
    assert param_counts(build(size)) == param_counts(real)

def test_wan_sizes_match_diffusers():
    assert numel(wan_reference('wan-1.3b')) == 1_418_996_800                     # Wan 2.1 T2V 1.3B
    for size in ('wan-1.3b', 'wan-14b'):                                           # our Wan part = diffusers' I2V layout without CLIP
        c = param_counts(build(size))
        D = {'wan-1.3b': 1536, 'wan-14b': 5120}[size]                              # 20 more input channels x D x patch (1, 2, 2)
        assert c['wan'] == numel(wan_reference(size, 36)) == numel(wan_reference(size, 16)) + 20 * D * 4
    assert wan_latent() == (16, 21, 60, 104) and build('wan-14b').n_tokens(wan_latent()) == 32_760


# ---------------------------------------------------------------- activations
def _loss_grads(m, x, mode=None):
    m.zero_grad()
    if mode is None: m(**x).square().mean().backward()
    else:
        with mode: m(**x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

def test_flash_route_and_checkpointing_keep_the_gradients():
    torch.manual_seed(0); m = TalkingDiT.from_preset('tiny')
    for p in m.parameters(): torch.nn.init.normal_(p, std=0.1)
    x = inputs(m, SIZES['tiny'], 2, device='cpu', dtype=torch.float32)
    g = _loss_grads(m, x)
    torch.testing.assert_close(_loss_grads(m, x, FlashSDPA()), g, atol=1e-5, rtol=1e-4)
    for mode in ('wan-blocks-only', 'grad-ckpt'): torch.testing.assert_close(_loss_grads(set_ckpt(m, mode), x), g, atol=1e-5, rtol=1e-4)
    assert '_unit' not in vars(set_ckpt(m, 'grad-ckpt')) and m.gradient_checkpointing   # the plan's mode is the model's own switch

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_meta_measurement_equals_real_cpu_model(dtype):
    """Equal to the byte in float32. In bf16 the CPU kernel of nn.LayerNorm keeps its mean / rstd in bf16 where the meta kernel
    (like CUDA's) keeps float32: the audio projection's LayerNorm over B x T x n_tok = 2 x 3 x 2 rows makes the only difference."""
    torch.manual_seed(0); real = TalkingDiT.from_preset('tiny').to(dtype); meta = build('tiny', dtype=dtype)
    ln_stats = 0 if dtype == torch.float32 else 2 * (4 - 2) * 2 * 3 * 2               # (mean, rstd) x (fp32 - bf16) x rows
    for ck in CKPTS:
        for grad in ('params', 'input'):
            a = saved_bytes(real, SIZES['tiny'], 2, ck, grad, device='cpu', dtype=dtype)
            b = saved_bytes(meta, SIZES['tiny'], 2, ck, grad, device='meta', dtype=dtype)
            gap = ln_stats if grad == 'params' else 0                                    # frozen: the audio branch keeps nothing
            assert a['total'] > 0 and b['total'] - a['total'] == gap, (ck, grad, a['total'], b['total'])
            assert {k: v for k, v in a['per_unit'].items() if k != 'other'} == {k: v for k, v in b['per_unit'].items() if k != 'other'}
    assert nograd_peak(real, SIZES['tiny'], 3, device='cpu', dtype=dtype) == nograd_peak(meta, SIZES['tiny'], 3, dtype=dtype) > 0

def test_measured_checkpointing_lowers_activations(tiny):
    a = {k: tiny['act'][f'{k}/1/params']['saved'] for k in CKPTS}
    assert a['none'] > a['wan-blocks-only'] > a['grad-ckpt'] > 0
    assert tiny['act']['none/1/input']['saved'] < a['none']                        # a frozen net keeps fewer tensors
    assert tiny['act']['grad-ckpt/6/params']['saved'] > 5 * tiny['act']['grad-ckpt/1/params']['saved']

def test_plan_measures_what_grad_ckpt_trains():
    "The plan's 'grad-ckpt' is the switch StageConfig.grad_ckpt=True throws; under it no audio attention saves tensors of its own."
    from turbotalk.stage import grad_ckpt
    trained, planned = build('tiny', dtype=torch.float32), set_ckpt(build('tiny', dtype=torch.float32), 'grad-ckpt')
    grad_ckpt(torch.nn.ModuleDict(dict(net=trained)))
    assert trained.gradient_checkpointing and planned.gradient_checkpointing and '_unit' not in vars(planned)
    per = {ck: saved_bytes(planned, SIZES['tiny'], 1, ck, dtype=torch.float32)['per_unit'] for ck in CKPTS}
    audio = {ck: sum(v for k, v in p.items() if k.startswith('audio_attn.')) for ck, p in per.items()}
    assert audio['none'] == audio['wan-blocks-only'] > 0 and audio['grad-ckpt'] == 0
    assert not any(k.startswith('blocks.') for k in per['grad-ckpt'])


# ---------------------------------------------------------------- the plan's arithmetic
@pytest.mark.parametrize('stage', list(STEPS))
def test_sharding_divides_states_not_activations(tiny, stage):
    for cfg in configs_for(stage):
        _, one = stage_bytes(tiny, stage, cfg, 1)
        for n in NS[1:]:
            _, b = stage_bytes(tiny, stage, cfg, n)
            for k in ('params', 'grads', 'optim', 'ema', 'frozen'): assert b[k] == pytest.approx(one[k] / n)
            assert (b['activations'], b['buffers']) == (one['activations'], one['buffers'])

def test_checkpointing_and_lora_lower_the_right_parts(tiny):
    for stage in STEPS:
        acts = [stage_bytes(tiny, stage, _cfg(c), 1)[1]['activations'] for c in ('plain', 'ckpt-wan-blocks-only', 'grad-ckpt')]
        assert acts[0] > acts[1] > acts[2], (stage, acts)
    states = lambda b: b['params'] + b['grads'] + b['optim']
    for stage in ('dmd', 'adv'):
        full, lora = (step_bytes(tiny, stage, list(STEPS[stage])[1], _cfg(c), 1) for c in ('grad-ckpt', 'grad-ckpt+lora'))
        assert states(lora) < states(full)                                            # trainable states shrink ...
        assert lora['frozen'] >= full['frozen'] and lora['activations'] == full['activations']   # ... the frozen base stays
        off = step_bytes(tiny, stage, list(STEPS[stage])[1], _cfg('grad-ckpt+lora+offload'), 1)
        assert off['frozen'] == 0
    c = tiny['counts']                                                                  # DMD's LoRA critic step, by hand
    b = step_bytes(tiny, 'dmd', 'F', _cfg('grad-ckpt+lora'), 1)
    assert (b['grads'], b['frozen']) == (4 * c['lora'], 2 * c['total'])

def test_min_gpus_is_the_first_count_that_fits(tiny):
    for stage in STEPS:
        for cfg in configs_for(stage):
            tot = [sum(stage_bytes(tiny, stage, cfg, n)[1].values()) for n in NS]
            cap = tot[2] / 0.9 + 1                                                     # fits from the third count on
            assert min_gpus(tiny, stage, cfg, cap) == next(n for n, t in zip(NS, tot) if t <= 0.9 * cap)
            assert min_gpus(tiny, stage, cfg, 1.0) is None
    assert len(plan_rows([tiny])) == sum(len(configs_for(s)) for s in STEPS) * len(NS)


# ---------------------------------------------------------------- the Accelerate configs
def test_configs_parse_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    got = {f.stem: load_config_from_file(str(f)) for f in sorted(CFG_DIR.glob('*.yaml'))}
    assert sorted(got) == ['1gpu', 'cpu_2proc', 'deepspeed_zero3_multinode', 'fsdp2_8gpu']
    assert all(type(c) is ClusterConfig for c in got.values())
    want = {'1gpu': ('NO', 1, 1, 'bf16', False), 'cpu_2proc': ('MULTI_GPU', 2, 1, 'no', False),
            'fsdp2_8gpu': ('FSDP', 8, 1, 'bf16', False), 'deepspeed_zero3_multinode': ('DEEPSPEED', 16, 2, 'bf16', False)}
    for k, c in got.items(): assert (c.distributed_type.value, c.num_processes, c.num_machines, c.mixed_precision, c.use_cpu) == want[k], k
    f = got['fsdp2_8gpu'].fsdp_config
    assert (f['fsdp_version'], f['fsdp_reshard_after_forward'], f['fsdp_auto_wrap_policy']) == (2, True, 'TRANSFORMER_BASED_WRAP')
    assert f['fsdp_transformer_layer_cls_to_wrap'] == 'WanTransformerBlock,FrameAudioAttention'
    d = got['deepspeed_zero3_multinode'].deepspeed_config
    assert (d['zero_stage'], d['offload_param_device'], d['gradient_clipping']) == (3, 'none', 1.0)

def test_fsdp2_config_wraps_our_blocks():
    from accelerate.commands.launch import prepare_multi_gpu_env
    from accelerate.utils import FullyShardedDataParallelPlugin
    args, _ = launch_args(CFG_DIR/'fsdp2_8gpu.yaml')
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == 'bf16'
    env = prepare_multi_gpu_env(args)
    assert (env['FSDP_VERSION'], env['FSDP_SHARDING_STRATEGY'], env['ACCELERATE_USE_FSDP']) == ('2', 'FULL_SHARD', 'true')
    m = TalkingDiT.from_preset('tiny')
    with mock.patch.dict(os.environ, env):
        fp = FullyShardedDataParallelPlugin(); fp.set_auto_wrap_policy(m)
    assert fp.fsdp_version == 2 and fp.reshard_after_forward is True
    assert fp.auto_wrap_policy.keywords['transformer_layer_cls'] == {type(m.blocks[0]), type(m.audio_attn[0])}

def test_deepspeed_config_gives_a_zero3_plugin_without_deepspeed():
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    args, _ = launch_args(CFG_DIR/'deepspeed_zero3_multinode.yaml', '--main_process_ip', '10.0.0.1')
    assert args.use_deepspeed and (args.num_processes, args.num_machines) == (16, 2)
    _, env = prepare_deepspeed_cmd_env(args)
    assert (env['ACCELERATE_DEEPSPEED_ZERO_STAGE'], env['ACCELERATE_MIXED_PRECISION']) == ('3', 'bf16')
    with mock.patch.dict(os.environ, env): ds = DeepSpeedPlugin()
    z = ds.deepspeed_config['zero_optimization']
    assert (ds.zero_stage, z['offload_param']['device'], z['offload_optimizer']['device']) == (3, 'none', 'none')

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    t = torch.tensor([acc.process_index + 1.0]); s = acc.reduce(t, 'sum')
    print(json.dumps(dict(rank=acc.process_index, n=acc.num_processes, sum=s.item(), mp=acc.mixed_precision)))
    acc.end_training()   # destroys the process group: left to interpreter exit, gloo's teardown can abort (seen in CI)
""")

def test_cpu_2proc_config_really_launches_two_processes(tmp_path):
    (tmp_path/'s.py').write_text(SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    r = subprocess.run([sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(CFG_DIR/'cpu_2proc.yaml'),
                        '--main_process_port', str(port), str(tmp_path/'s.py')], cwd=ROOT, env=env | {'OMP_NUM_THREADS': '1'},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # the two processes share one pipe: a record can land on the other's line, so read every {...} wherever it is
    recs = sorted((json.loads(m) for m in re.findall(r'\{[^{}]*\}', r.stdout)), key=lambda d: d['rank'])
    assert recs == [dict(rank=0, n=2, sum=3.0, mp='no'), dict(rank=1, n=2, sum=3.0, mp='no')]


# ---------------------------------------------------------------- the CLI and the committed plan
def test_cli_writes_the_plan(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'turbotalk.scale', 'memory-plan', '--out', str(tmp_path), '--sizes', 'tiny', '--rank', '4'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    md, rows = (tmp_path/'memory_plan.md').read_text(), list(csv.DictReader(open(tmp_path/'memory_plan.csv')))
    assert md.startswith('# Memory plan') and '`python -m turbotalk.scale memory-plan --out' in md and '## Notes' in md
    assert '| tiny | dmd | grad-ckpt+lora | ' in md
    assert list(rows[0]) == ['size', 'stage', 'config', 'n_gpu', 'step', *PARTS, 'total']
    assert len(rows) == sum(len(configs_for(s)) for s in STEPS) * len(NS)
    measured = json.loads((tmp_path/'measured.json').read_text())
    assert measured[0]['counts'] == param_counts(build('tiny'), 4)

def test_cli_rejects_unknown_sizes(capsys):
    from turbotalk.scale import main
    with pytest.raises(SystemExit) as e: main(['memory-plan', '--out', 'unused', '--sizes', 'synth,wan-70b'])
    assert e.value.code == 2 and "unknown sizes ['wan-70b']" in capsys.readouterr().err

def test_committed_plan_follows_from_its_measurements():
    if not (RUN/'measured.json').is_file(): pytest.skip('no committed plan')
    measured = json.loads((RUN/'measured.json').read_text())
    rows = list(csv.DictReader(open(RUN/'memory_plan.csv')))
    assert [r['size'] for r in measured] == ['synth', 'wan-1.3b', 'wan-14b'] and measured[1]['tokens'] == 32_760
    assert len(rows) == len(plan_rows(measured))
    for a, b in zip(rows, plan_rows(measured)):
        assert {k: str(v) for k, v in b.items()} == a
    c = measured[2]['counts']
    assert c == param_counts(build('wan-14b'), measured[2]['rank'])                    # the counts are today's model
    assert (RUN/'cmd.txt').read_text().startswith('papermill nbs/08_scale.ipynb papermill_runs/scale/08_scale.ipynb')
