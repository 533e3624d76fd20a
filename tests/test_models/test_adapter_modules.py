"""ViT-Adapter building blocks: kiv's fast paths against the references.

- ``MSDeformAttn`` (kiv's sampling core) vs mmcv's
  ``MultiScaleDeformableAttention`` (pure-PyTorch path), outputs and
  gradients, every option of mmcv's forward;
- the sampling core in float64 (``gradcheck``) and against mmcv's
  ``multi_scale_deformable_attn_pytorch``;
- the sampling core always runs in float32 under bf16 / fp16 autocast
  (mmcv 2.1's CUDA kernel dispatches float and half only), on the CPU path
  and on the kernel path (kernel faked on CPU);
- the folded latent attention pool vs timm's ``AttentionPoolLatent``;
- channels-last spatial prior and ConvFFN vs plain NCHW computations.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import \
    multi_scale_deformable_attn_pytorch
from timm.layers import AttentionPoolLatent

import kiv  # noqa: F401  registers kiv.*
from kiv.models.backbones import adapter_modules as am
from kiv.models.layers import attention_pool as ap
from kiv.models.layers import deform_attention as da

EMBED, HEADS, POINTS = 32, 4, 3
QUERY_SHAPES = [(6, 5)]
VALUE_SHAPES = [(9, 7), (5, 4), (3, 2)]


def _pair(levels: int, ratio: float = 0.5, **kwargs):
    """mmcv's module and kiv's with the same (non-trivial) weights."""
    torch.manual_seed(0)
    ref = MultiScaleDeformableAttention(EMBED, HEADS, levels, POINTS,
                                        dropout=0.0, value_proj_ratio=ratio,
                                        **kwargs)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    new = da.MSDeformAttn(EMBED, HEADS, levels, POINTS, dropout=0.0,
                          value_proj_ratio=ratio, **kwargs)
    new.load_state_dict(ref.state_dict())
    return ref, new


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = a.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= rtol * scale, \
        f'max diff {(a - b).abs().max().item():.3g} (scale {scale:.3g})'


@pytest.mark.parametrize('direction', ['injector', 'extractor'])
def test_msdeformattn_matches_mmcv(direction):
    """Outputs and every gradient equal mmcv's module (float rounding)."""
    q_shapes, v_shapes = (QUERY_SHAPES, VALUE_SHAPES) \
        if direction == 'injector' else (VALUE_SHAPES, QUERY_SHAPES)
    ref, new = _pair(len(v_shapes), batch_first=True)
    assert list(new.state_dict()) == list(ref.state_dict())
    inputs = am.make_deform_inputs(q_shapes, v_shapes, torch.device('cpu'))
    n_q = sum(h * w for h, w in q_shapes)
    n_v = sum(h * w for h, w in v_shapes)
    query = torch.randn(2, n_q, EMBED, requires_grad=True)
    value = torch.randn(2, n_v, EMBED, requires_grad=True)
    kwargs = dict(spatial_shapes=inputs.spatial_shapes,
                  level_start_index=inputs.level_start_index)
    levels = len(v_shapes)
    expected = ref(query, value=value,
                   reference_points=inputs.reference_points.expand(
                       2, -1, levels, -1), **kwargs)
    got = new(query, value=value, reference_points=inputs.reference_points,
              **kwargs)
    _close(expected, got)
    params = [query, value] + list(ref.parameters())
    grads_ref = torch.autograd.grad(expected.square().sum(), params)
    grads_new = torch.autograd.grad(
        got.square().sum(), [query, value] + list(new.parameters()))
    for a, b in zip(grads_ref, grads_new):
        _close(a, b, 1e-4)


def test_msdeformattn_mmcv_options():
    """Sequence-first layout, query_pos, key_padding_mask, identity, boxes."""
    ref, new = _pair(len(VALUE_SHAPES), batch_first=False)
    inputs = am.make_deform_inputs(QUERY_SHAPES, VALUE_SHAPES,
                                   torch.device('cpu'))
    n_q = QUERY_SHAPES[0][0] * QUERY_SHAPES[0][1]
    n_v = sum(h * w for h, w in VALUE_SHAPES)
    query = torch.randn(n_q, 2, EMBED)
    value = torch.randn(n_v, 2, EMBED)
    pos = torch.randn(n_q, 2, EMBED)
    identity = torch.randn(n_q, 2, EMBED)
    mask = torch.rand(2, n_v) < 0.3
    boxes = torch.cat((torch.rand(2, n_q, len(VALUE_SHAPES), 2),
                       torch.rand(2, n_q, len(VALUE_SHAPES), 2) * 0.5), -1)
    for points in (inputs.reference_points.expand(2, -1, 3, -1), boxes):
        kwargs = dict(value=value, identity=identity, query_pos=pos,
                      key_padding_mask=mask, reference_points=points,
                      spatial_shapes=inputs.spatial_shapes,
                      level_start_index=inputs.level_start_index)
        _close(ref(query, **kwargs), new(query, **kwargs))
    with pytest.raises(ValueError, match='spatial_shapes'):
        new(query, value=value[:-1], reference_points=boxes,
            spatial_shapes=inputs.spatial_shapes,
            level_start_index=inputs.level_start_index)


def _core_inputs(dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(2, 26, 2, 3, dtype=dtype, requires_grad=True)
    # some points fall outside [0, 1]: zero padding
    locations = (torch.rand(2, 5, 2, 2, 3, 2, dtype=dtype) * 1.4 -
                 0.2).requires_grad_()
    weights = torch.rand(2, 5, 2, 2, 3, dtype=dtype, requires_grad=True)
    return value, shapes, starts, locations, weights


def test_sampling_core_gradcheck_and_reference():
    value, shapes, starts, locations, weights = _core_inputs(torch.float64)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: da.ms_deform_attn_sampling(v, shapes, starts, loc,
                                                     w),
        (value, locations, weights))
    expected = multi_scale_deformable_attn_pytorch(value, shapes, locations,
                                                   weights)
    got = da.ms_deform_attn(value, shapes, starts, locations, weights)
    assert got.dtype == torch.float64
    _close(expected, got, 1e-12)


def _spy(monkeypatch, name: str) -> list:
    """Record dtypes and the autocast state where ``da.<name>`` is called.
    """
    seen = []
    real = getattr(da, name)

    def spy(value, shapes, starts, locations, weights, *args):
        seen.append(dict(dtypes={value.dtype, locations.dtype,
                                 weights.dtype},
                         autocast=torch.is_autocast_enabled('cpu')))
        return real(value, shapes, starts, locations, weights, *args)

    monkeypatch.setattr(da, name, spy)
    return seen


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_core_runs_fp32_under_autocast(monkeypatch, dtype):
    """The CPU path: the points-major core sees float32, autocast off; the
    projections around it stay in the autocast dtype."""
    seen = _spy(monkeypatch, 'deform_sampling_points_major')
    _, attn = _pair(len(VALUE_SHAPES), batch_first=True)
    inputs = am.make_deform_inputs(QUERY_SHAPES, VALUE_SHAPES,
                                   torch.device('cpu'))
    query = torch.randn(2, 30, EMBED)
    value = torch.randn(2, sum(h * w for h, w in VALUE_SHAPES), EMBED)
    with torch.autocast('cpu', dtype=dtype):
        out = attn.attend(query, value, *inputs)
    assert seen == [dict(dtypes={torch.float32}, autocast=False)]
    assert out.dtype == dtype  # output_proj ran under autocast
    _close(attn.attend(query, value, *inputs), out.float(), 0.05)


def test_kernel_path_gets_fp32_under_bf16(monkeypatch):
    """The GPU path (mmcv's kernel, faked on CPU): mmcv's layout, float32
    inputs, autocast off, and the same result as the CPU path."""
    seen = []

    class FakeKernel:

        @staticmethod
        def apply(value, shapes, starts, locations, weights, im2col_step):
            seen.append(dict(dtypes={value.dtype, locations.dtype,
                                     weights.dtype},
                             autocast=torch.is_autocast_enabled('cpu'),
                             locations=tuple(locations.shape)))
            return multi_scale_deformable_attn_pytorch(
                value, shapes, locations, weights)

    _, attn = _pair(len(VALUE_SHAPES), batch_first=True)
    inputs = am.make_deform_inputs(QUERY_SHAPES, VALUE_SHAPES,
                                   torch.device('cpu'))
    query = torch.randn(2, 30, EMBED)
    value = torch.randn(2, sum(h * w for h, w in VALUE_SHAPES), EMBED)
    cpu_path = attn.attend(query, value, *inputs)
    monkeypatch.setattr(da, '_has_mmcv_kernel', lambda value: True)
    monkeypatch.setattr(da, 'MultiScaleDeformableAttnFunction', FakeKernel)
    _close(cpu_path, attn.attend(query, value, *inputs))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        attn.attend(query, value, *inputs)
    assert seen[-1] == dict(dtypes={torch.float32}, autocast=False,
                            locations=(2, 30, HEADS, 3, POINTS, 2))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_ms_deform_attn_casts(monkeypatch, dtype):
    """The mmcv-layout entry point casts too (and float64 is kept)."""
    seen = _spy(monkeypatch, 'ms_deform_attn_sampling')
    value, shapes, starts, locations, weights = _core_inputs()
    with torch.autocast('cpu', dtype=dtype):
        out = da.ms_deform_attn(value.to(dtype), shapes, starts,
                                locations.to(dtype), weights)
    assert seen == [dict(dtypes={torch.float32}, autocast=False)]
    assert out.dtype == torch.float32


@pytest.mark.parametrize('latents', [1, 3])
def test_latent_attention_pool_matches_timm(latents):
    torch.manual_seed(2)
    pool = AttentionPoolLatent(EMBED, num_heads=HEADS, latent_len=latents,
                               pool_type='avg', norm_layer=am.TokenNorm)
    for p in pool.parameters():
        p.data.normal_(0, 0.2)
    parts = [torch.randn(2, 7, EMBED, requires_grad=True),
             torch.randn(2, 11, EMBED, requires_grad=True)]
    expected = pool(torch.cat(parts, 1))
    got = ap.latent_attention_pool(pool, parts)
    _close(expected, got)
    params = parts + list(pool.parameters())
    for a, b in zip(
            torch.autograd.grad(expected.square().sum(), params),
            torch.autograd.grad(got.square().sum(), params)):
        _close(a, b, 1e-4)


def test_latent_attention_pool_falls_back():
    """Query/key norms cannot be folded: the module's own forward runs."""
    pool = AttentionPoolLatent(EMBED, num_heads=HEADS, qk_norm=True)
    parts = [torch.randn(1, 5, EMBED), torch.randn(1, 4, EMBED)]
    assert not ap._folds_keys(pool)
    assert torch.equal(ap.latent_attention_pool(pool, parts),
                       pool(torch.cat(parts, 1)))


def test_spatial_prior_channels_last_matches_nchw():
    torch.manual_seed(3)
    spm = am.SpatialPriorModule(inplanes=8, embed_dim=EMBED).eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        maps = spm(x)
        c = spm.stem(x)
        expected = [c]
        for conv in (spm.conv2, spm.conv3, spm.conv4):
            expected.append(conv(expected[-1]))
        for fc, ref, got in zip((spm.fc1, spm.fc2, spm.fc3, spm.fc4),
                                expected, maps):
            assert got.is_contiguous(memory_format=torch.channels_last)
            _close(fc(ref), got)
    assert [tuple(m.shape[-2:]) for m in maps] == [(12, 10), (6, 5), (3, 3),
                                                   (2, 2)]


def test_conv_ffn_matches_nchw():
    torch.manual_seed(4)
    ffn = am.ConvFFN(EMBED, 8)
    shapes = [(6, 5), (3, 3), (2, 1)]
    x = torch.randn(2, sum(h * w for h, w in shapes), EMBED,
                    requires_grad=True)
    hidden = ffn.fc1(x)
    maps = [t.transpose(1, 2).reshape(2, 8, h, w) for t, (h, w) in zip(
        hidden.split([h * w for h, w in shapes], 1), shapes)]
    expected = ffn.fc2(F.gelu(torch.cat(
        [ffn.dwconv(m).flatten(2) for m in maps], 2).transpose(1, 2)))
    got = ffn(x, shapes)
    _close(expected, got)
    _close(*(torch.autograd.grad(y.square().sum(), x)[0]
             for y in (expected, got)), 1e-4)


def test_non_finite_locations_give_nan_not_an_error():
    """A diverged run: NaN / inf locations make NaN outputs for their own
    (query, head) only (the nonfinite-loss handling sees a NaN loss), never
    an out-of-range gather."""
    value, shapes, starts, locations, weights = _core_inputs()
    locations = locations.detach().clone()
    locations[0, 0, 0, 0, 0, 0] = float('nan')
    locations[1, 2, 1, 1, 2, 1] = float('inf')
    out = da.ms_deform_attn_sampling(value, shapes, starts, locations,
                                     weights)
    nan = out.isnan().view(2, 5, 2, 3).any(-1)
    assert nan.nonzero().tolist() == [[0, 0, 0], [1, 2, 1]]
