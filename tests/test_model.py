"""turbotalk.model: the DiT against diffusers' Wan reference, checkpoints, full-size shapes, codecs, CFG and the sampler."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest, torch, torch.nn as nn
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from turbotalk.core import TurboTalkError
from turbotalk.model import (PRESETS, FrameAudioAttention, PixelCodec, TalkingDiT, WanVAECodec, add_noise, audio_index,
                             cfg_velocity, cond_channels, sample, shift_sigma, step_sigmas, teacher_sigmas, v_target,
                             x0_from_v)

WAN_KEYS = ['patch_size', 'num_attention_heads', 'attention_head_dim', 'text_dim', 'freq_dim', 'ffn_dim', 'num_layers',
            'cross_attn_norm', 'qk_norm', 'eps', 'rope_max_seq_len']


def tiny(**kw):
    torch.manual_seed(kw.pop('seed', 0))
    return TalkingDiT.from_preset('tiny', **kw).eval()


def wan_like(model, in_channels, **kw):
    "A diffusers WanTransformer3DModel with `model`'s transformer dimensions."
    return WanTransformer3DModel(**{k: model.config[k] for k in WAN_KEYS}, in_channels=in_channels,
                                 out_channels=model.config.latent_channels, **kw).eval()


def inputs(B=2, C=4, T=3, H=8, r=1, W=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, T, H, H, generator=g), torch.randn(B, C, 1, H, H, generator=g),
            torch.randn(B, 1 + r * (T - 1), W, D, generator=g))


def n_params(m, audio=None):
    return sum(p.numel() for k, p in m.named_parameters() if audio is None or k.startswith('audio_') == audio)


def perturb_audio(m, std=0.1):
    for blk in m.audio_attn: nn.init.normal_(blk.attn.to_out[0].weight, std=std)


# ---- the reference test (minGPT style): our transformer path == diffusers' Wan with the same weights

@pytest.mark.parametrize('r', [1, 4])
def test_matches_diffusers_wan(r):
    m = tiny(frames_per_latent=r)
    wan = wan_like(m, 2 * 4 + r)
    missing, unexpected = m.load_state_dict(wan.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith('audio_') for k in missing)
    xt, ref, a = inputs(r=r)
    txt, t = torch.randn(2, 5, 8), torch.tensor([0.13, 0.87])
    with torch.no_grad():
        ours = m(xt, t, ref, a, txt=txt)
        theirs = wan(torch.cat([xt, cond_channels(xt, ref, r=r)], 1), t * 1000, txt).sample
    assert (ours - theirs).abs().max() < 1e-5


def test_audio_starts_inert_then_matters():
    m = tiny()
    xt, ref, a = inputs()
    with torch.no_grad():
        assert (m(xt, 0.5, ref, a) - m(xt, 0.5, ref)).abs().max() < 1e-6
        perturb_audio(m)
        assert (m(xt, 0.5, ref, a) - m(xt, 0.5, ref)).abs().max() > 1e-3


# ---- checkpoints

def test_from_wan_t2v_and_round_trip(tmp_path):
    m0 = tiny()
    torch.manual_seed(1)
    t2v = wan_like(m0, 4)
    t2v.save_pretrained(tmp_path / 't2v')
    m = TalkingDiT.from_wan(tmp_path / 't2v', frames_per_latent=1, audio_dim=8, audio_window=3, text_len=5).eval()
    assert m.patch_embedding.weight.shape[1] == 2 * 4 + 1 and len(m.audio_attn) == 2
    assert all(blk.attn.to_out[0].weight.abs().sum() == 0 for blk in m.audio_attn)
    xt, ref, a = inputs()
    txt = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert (m(xt, 0.3, ref, a, txt=txt) - t2v(xt, torch.full((2,), 300.), txt).sample).abs().max() < 1e-5
    perturb_audio(m)
    m.save_pretrained(tmp_path / 'ours')
    assert (tmp_path / 'ours' / 'diffusion_pytorch_model.safetensors').exists()
    back = TalkingDiT.from_pretrained(tmp_path / 'ours').eval()
    norm = lambda c: {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in c.items() if not k.startswith('_')}
    assert norm(back.config) == norm(m.config) and back.config.text_len == 5
    with torch.no_grad(): assert torch.equal(back(xt, 0.3, ref, a), m(xt, 0.3, ref, a))


def test_from_wan_i2v_layout_and_clip_branch(tmp_path):
    m0 = tiny(frames_per_latent=4)
    i2v = wan_like(m0, 2 * 4 + 4)
    i2v.save_pretrained(tmp_path / 'i2v')
    m = TalkingDiT.from_wan(tmp_path / 'i2v', frames_per_latent=4, audio_dim=8, audio_window=3)
    assert torch.equal(m.patch_embedding.weight, i2v.patch_embedding.weight)
    wan_like(m0, 7).save_pretrained(tmp_path / 'odd')
    with pytest.raises(TurboTalkError, match='patch embedding takes 7 channels'):
        TalkingDiT.from_wan(tmp_path / 'odd', frames_per_latent=4)
    wan_like(m0, 12, image_dim=16, added_kv_proj_dim=32).save_pretrained(tmp_path / 'clip')
    with pytest.raises(TurboTalkError, match='CLIP image branch'):
        TalkingDiT.from_wan(tmp_path / 'clip')


# ---- full sizes on the meta device

def test_wan_1_3b_exact_shapes_on_meta():
    with torch.device('meta'):
        m = TalkingDiT.from_preset('wan-1.3b')
        t2v = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
        i2v = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=36)
    assert n_params(t2v) == 1_418_996_800
    assert {k: p.shape for k, p in m.named_parameters() if not k.startswith('audio_')} == \
           {k: p.shape for k, p in i2v.named_parameters()}
    assert n_params(m, audio=False) == 1_418_996_800 + (16 + 4) * 1536 * 4
    assert 0 < n_params(m, audio=True) < 0.3 * n_params(m, audio=False)
    assert m.n_tokens((16, 21, 60, 104)) == 21 * 30 * 52


def test_wan_14b_dims_with_init_empty_weights():
    from accelerate import init_empty_weights
    with init_empty_weights():
        m = TalkingDiT.from_preset('wan-14b')
        wan = WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=36)
    assert m.blocks[0].attn1.to_q.weight.shape == (5120, 5120) and len(m.blocks) == 40
    assert m.blocks[0].ffn.net[2].weight.shape == (5120, 13824)
    assert n_params(m, audio=False) == n_params(wan)
    assert set(PRESETS) == {'tiny', 'synth', 'wan-1.3b', 'wan-14b'}


# ---- codecs

def test_pixel_codec_is_lossless():
    c = PixelCodec(2)
    v = torch.rand(2, 8, 3, 64, 64) * 2 - 1
    z = c.encode(v)
    assert z.shape == (2, 12, 8, 32, 32) and torch.equal(c.decode(z), v)
    assert c.latent_ch == 12 and c.t_down == 1 and c.s_down == 2


def test_wan_vae_codec(tmp_path):
    cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
               latents_mean=[0.5, 0.0, -0.5, 1.0], latents_std=[2.0, 1.0, 0.5, 3.0])
    torch.manual_seed(0)
    AutoencoderKLWan(**cfg).save_pretrained(tmp_path / 'vae')
    c = WanVAECodec(tmp_path / 'vae').eval()
    v = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = c.encode(v)
        raw = c.vae.encode(v.transpose(1, 2)).latent_dist.mode()
        out = c.decode(z)
    assert z.shape == (2, 4, 3, 2, 2) and (c.latent_ch, c.t_down, c.s_down) == (4, 4, 8)
    assert torch.allclose(z, (raw - torch.tensor(cfg['latents_mean']).view(1, -1, 1, 1, 1))
                          / torch.tensor(cfg['latents_std']).view(1, -1, 1, 1, 1), atol=1e-5)
    assert out.shape == v.shape and out.abs().max() <= 1
    with pytest.raises(ValueError, match='1 \\+ 4k frames'): c.encode(v[:, :8])


# ---- conditions

def test_audio_alignment_and_shape_errors():
    assert audio_index(3, 4).tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    m = tiny(frames_per_latent=4)
    xt, ref, a = inputs(r=4)                      # T' = 3 latent frames <- 9 video frames
    assert a.shape[1] == 9
    with torch.no_grad(): assert m(xt, 0.5, ref, a).shape == xt.shape
    with pytest.raises(ValueError, match='audio must be'): m(xt, 0.5, ref, a[:, :8])
    with pytest.raises(ValueError, match='ref must be'): m(xt, 0.5, ref[..., :4, :4], a)


def test_frame_aligned_attention_is_local():
    fa = FrameAudioAttention(32, 2)
    nn.init.normal_(fa.attn.to_out[0].weight)
    h, aud = torch.randn(1, 4 * 6, 32), torch.randn(1, 4, 3, 32)
    for j in range(4):
        a2 = aud.clone(); a2[:, j] += 1
        with torch.no_grad(): d = (fa(h, a2) - fa(h, aud)).abs().view(4, 6, 32).sum((1, 2))
        assert d[j] > 0 and all(d[i] == 0 for i in range(4) if i != j)


def test_dropout_flags_equal_none_and_ctx_used():
    m = tiny(); perturb_audio(m)
    xt, ref, a = inputs()
    with torch.no_grad():
        v = m(xt, 0.5, ref, a, drop_ref=torch.tensor([True, False]), drop_a=torch.tensor([True, True]))
        assert torch.allclose(v[0], m(xt[:1], 0.5, None, None)[0], atol=1e-6)
        assert torch.allclose(v[1], m(xt[1:], 0.5, ref[1:], None)[0], atol=1e-6)
        ctx = torch.randn(2, 4, 2, 8, 8)
        assert (m(xt, 0.5, ref, a, ctx=ctx) - m(xt, 0.5, ref, a)).abs().max() > 1e-4


def test_return_features_and_checkpointing():
    m = tiny(); perturb_audio(m)
    xt, ref, a = inputs()
    v, feats = m(xt, 0.5, ref, a, return_features=[1])
    assert feats[0].shape == (2, 3, 4, 4, 32)
    assert torch.allclose(m(xt, 0.5, ref, a, return_features=[0, 1], features_only=True)[1], feats[0])
    v.square().mean().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(); m.enable_gradient_checkpointing(); m.train()
    assert m.gradient_checkpointing
    m(xt, 0.5, ref, a).square().mean().backward()
    assert all(torch.allclose(p.grad, q, atol=1e-6) for p, q in zip(m.parameters(), g))


# ---- flow matching, CFG, sampler

def test_flow_matching_and_shift_matches_scheduler():
    x0, eps, s = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(x0_from_v(add_noise(x0, eps, s), s, v_target(x0, eps)), x0, atol=1e-6)
    for k in [1.0, 3.0, 5.0, 7.0]:
        sch = FlowMatchEulerDiscreteScheduler(shift=k)
        u = torch.linspace(1, 0.02, 30)
        sch.set_timesteps(sigmas=u.tolist())
        assert torch.allclose(sch.sigmas[:-1], shift_sigma(u, k), atol=1e-6)
    ts = teacher_sigmas(40, 5.0)
    assert len(ts) == 41 and ts[0] == 1 and ts[-1] == 0
    assert step_sigmas(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_cfg_unit_scales_equal_full_condition():
    m = tiny(); perturb_audio(m)
    xt, ref, a = inputs()
    cond = dict(ref=ref, a=a)
    with torch.no_grad():
        v, nfe = cfg_velocity(m, xt, 0.7, cond, (1.0, 1.0))
        assert nfe == 3 and (v - m(xt, 0.7, ref, a)).abs().max() < 1e-5
        vb, _ = cfg_velocity(m, xt, 0.7, cond, (3.0, 5.0))
        vs, _ = cfg_velocity(m, xt, 0.7, cond, (3.0, 5.0), batched=False)
        assert (vb - vs).abs().max() < 1e-5


class Counter(nn.Module):
    def __init__(self, m): super().__init__(); self.m, self.calls = m, 0
    def forward(self, *a, **kw): self.calls += 1; return self.m(*a, **kw)


def test_teacher_costs_120_nfe():
    cm = Counter(tiny())
    xt, ref, a = inputs()
    with torch.no_grad(): x, info = sample(cm, torch.randn_like(xt), dict(ref=ref, a=a), guidance=(2.0, 4.0))
    assert info['nfe'] == 120 and info['steps'] == 40 and cm.calls == 40 and torch.isfinite(x).all()
    with torch.no_grad(): _, info = sample(cm, xt, dict(ref=ref, a=a), step_sigmas(4), mode='x0')
    assert info['nfe'] == 4


def test_grad_last_only_through_final_evaluation():
    m = tiny(); perturb_audio(m)
    xt, ref, a = inputs()
    noise = torch.randn_like(xt).requires_grad_()
    sched = step_sigmas(4)
    out, info = sample(m, noise, dict(ref=ref, a=a), sched, mode='x0', grad='last', generator=torch.Generator().manual_seed(0))
    m.zero_grad(); out.square().mean().backward()
    g_last = [p.grad.clone() for p in m.parameters()]
    assert noise.grad is None                                     # nothing before the last step is differentiable
    m.zero_grad()
    x0 = x0_from_v(info['x_last'], info['s_last'], m(info['x_last'], info['s_last'], ref, a))
    assert torch.allclose(x0, out, atol=1e-6)
    x0.square().mean().backward()
    assert all(torch.allclose(p.grad, q, atol=1e-7) for p, q in zip(m.parameters(), g_last))
    m.zero_grad()
    out_all, _ = sample(m, noise, dict(ref=ref, a=a), sched, mode='x0', grad='all', generator=torch.Generator().manual_seed(0))
    out_all.square().mean().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    assert any((p.grad - q).abs().max() > 1e-6 for p, q in zip(m.parameters(), g_last))


def test_euler_last_grad_and_bad_args():
    m = tiny()
    xt, ref, a = inputs()
    out, info = sample(m, xt, dict(ref=ref), [1.0, 0.5, 0.0], grad='last')
    assert out.requires_grad and info['nfe'] == 2 and info['s_last'] == 0.5
    with pytest.raises(ValueError, match='grad must be'): sample(m, xt, None, [1.0, 0.0], grad='first')
    with pytest.raises(ValueError, match='at least one level'): sample(m, xt, None, [0.0])
    with torch.no_grad():
        assert torch.equal(sample(m, xt, None, [1.0, 0.5])[0], sample(m, xt, None, [1.0, 0.5, 0.0])[0])
    with pytest.raises(TurboTalkError, match='unknown preset'): TalkingDiT.from_preset('wan-2b')
