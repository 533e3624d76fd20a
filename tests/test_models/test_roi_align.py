"""kiv's CPU RoIAlign (one weighted gather) against mmcv's kernel, and
``kiv.SingleRoIExtractor`` building it inside mmdet's RoI heads.

Every test compares with ``mmcv.ops.RoIAlign`` on the same inputs: outputs
and input gradients must agree to float rounding, so a change of sampling
(the half-pixel shift, the adaptive grid, the clamping at the borders, the
average's divisor) fails here.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from mmcv.ops import RoIAlign as MMCVRoIAlign

import kiv  # noqa: F401  registers kiv.*
from kiv.models.layers import RoIAlign, roi_align, weighted_gather


def _rois(num: int, batch: int, size: float, seed: int = 0) -> torch.Tensor:
    """Boxes of every kind: inside, across and beyond the image's borders,
    thinner than a pixel, larger than a bin grid of 3 x 3."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, batch, (num, 1), generator=g).float()
    xy = torch.rand(num, 2, generator=g) * (size * 1.3) - 0.15 * size
    wh = torch.rand(num, 2, generator=g) * (size * 0.8) + 0.2
    return torch.cat([idx, xy, xy + wh], 1)


def _both(x, rois, **kwargs):
    """Outputs and input gradients of mmcv's and kiv's RoIAlign."""
    results = []
    for cls in (MMCVRoIAlign, RoIAlign):
        inp = x.detach().clone().requires_grad_()
        out = cls(**kwargs)(inp, rois)
        grad = torch.linspace(-1, 1, out.numel()).view_as(out)
        out.backward(grad)
        results.append((out.detach(), inp.grad))
    return results


@pytest.mark.parametrize('output_size', [7, 14, (5, 3)])
@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_matches_mmcv(output_size, aligned, sampling_ratio):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16, 20)
    rois = _rois(60, 3, 64.0)
    (ref, ref_grad), (out, grad) = _both(
        x, rois, output_size=output_size, spatial_scale=0.25,
        sampling_ratio=sampling_ratio, aligned=aligned)
    assert out.shape == ref.shape
    assert ref.abs().sum() > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=5e-5)


def test_matches_mmcv_float64_channels_last_and_scales():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64).to(
        memory_format=torch.channels_last)
    for scale in (1.0, 0.5, 1 / 32):
        rois = _rois(40, 2, 9.0 / scale, seed=3).double()
        (ref, ref_grad), (out, grad) = _both(
            x.contiguous(), rois, output_size=4, spatial_scale=scale)
        # kiv reads channels-last maps as they are (mmcv needs NCHW)
        inp = x.detach().clone().requires_grad_()
        out_cl = RoIAlign(4, spatial_scale=scale)(inp, rois)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_cl, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_grouped_sample_grids_match_mmcv(monkeypatch):
    """RoIs of very different sizes are padded per group of similar grids
    (sorted, then put back in order) once one padded gather would exceed
    the entry budget; same result."""
    module = importlib.import_module('kiv.models.layers.roi_align')
    monkeypatch.setattr(module, '_MAX_PADDED', 3000)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    rois = _rois(40, 2, 128.0, seed=5)
    rois[::7, 3:] = rois[::7, 1:3] + 120  # large grids among small ones
    order, groups = module._groups(torch.tensor([3, 1, 9, 1, 2]), 4 * 49)
    assert order.tolist() == [1, 3, 4, 0, 2]
    assert groups == [(0, 3), (3, 4), (4, 5)]
    (ref, ref_grad), (out, grad) = _both(x, rois, output_size=7,
                                         spatial_scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=5e-5)


def test_degenerate_rois():
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([
        [0, 10.0, 10.0, 10.0, 10.0],   # zero size (aligned: grid 0)
        [0, -30.0, -30.0, -20.0, -20.0],  # beyond the top-left border
        [0, 30.0, 30.0, 40.0, 40.0],   # beyond the bottom-right border
        [0, 0.0, 0.0, 24.0, 24.0],     # the whole map
    ])
    for aligned in (True, False):
        (ref, ref_grad), (out, grad) = _both(
            x, rois, output_size=3, spatial_scale=0.25, aligned=aligned)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grad, ref_grad)


def test_no_rois_keeps_the_graph():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), (7, 7), 0.25)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert x.grad is not None and not x.grad.any()


def test_negative_aligned_roi_is_an_error():
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 9.0, 2.0, 4.0, 6.0]])
    with pytest.raises(ValueError, match='RoI 1 has x2 < x1'):
        roi_align(x, rois, (2, 2), 1.0, aligned=True)
    # not aligned: at least one pixel wide, as mmcv
    (ref, _), (out, _) = _both(x, rois, output_size=2, aligned=False)
    torch.testing.assert_close(out, ref)


def test_non_finite_roi_gives_nan_not_an_error():
    """A NaN / Inf box (a diverged head) gives NaN for that RoI only, so
    the loss is non-finite and the step is skipped, as with any NaN; the
    other RoIs and the gradient are the ones without it."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    good = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 1.0, 2.0, 4.0, 6.0]])
    bad = torch.tensor([[0, 1.0, float('nan'), 4.0, 6.0],
                        [float('nan'), 0.0, 0.0, float('inf'), 8.0]])
    out = roi_align(x, torch.cat([good[:1], bad[:1], good[1:], bad[1:]]),
                    (2, 2), 1.0)
    assert out[[1, 3]].isnan().all()
    ref = roi_align(x, good, (2, 2), 1.0)
    torch.testing.assert_close(out[[0, 2]], ref)
    out[[0, 2]].sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    torch.testing.assert_close(grad, x.grad)


def test_other_modes_use_mmcv(monkeypatch):
    calls = []
    module = importlib.import_module('kiv.models.layers.roi_align')
    monkeypatch.setattr(module, 'roi_align', lambda *a, **k: calls.append(1))
    x = torch.randn(1, 2, 8, 8)
    rois = _rois(5, 1, 8.0)
    ref = MMCVRoIAlign(3, pool_mode='max')(x, rois)
    torch.testing.assert_close(RoIAlign(3, pool_mode='max')(x, rois), ref)
    assert not calls
    RoIAlign(3)(x, rois)
    assert calls == [1]


def test_weighted_gather_gradient_and_arguments():
    torch.manual_seed(0)
    table = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 10, (6, 4))
    weights = torch.rand(6, 4, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda t: weighted_gather(t, index, weights), (table, ))
    # a flat index with offsets, one bag empty
    flat, w = index.flatten()[:9], weights.flatten()[:9]
    offsets = torch.tensor([0, 4, 4, 7])
    torch.autograd.gradcheck(
        lambda t: weighted_gather(t, flat, w, offsets), (table, ))
    with pytest.raises(ValueError, match='a flat index needs offsets'):
        weighted_gather(table, flat, w)


def test_roi_extractor_builds_kiv_layers_in_mmdet():
    pytest.importorskip('mmdet')
    import mmdet.models  # noqa: F401  registers mmdet's modules
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope

    def extractor(kind, layer):
        return dict(type=kind, out_channels=8, featmap_strides=[4, 8],
                    roi_layer=dict(type=layer, output_size=7,
                                   sampling_ratio=0))

    with DefaultScope.overwrite_default_scope('mmdet'):
        ours = DET_MODELS.build(
            extractor('kiv.SingleRoIExtractor', 'kiv.RoIAlign'))
        ref = DET_MODELS.build(extractor('SingleRoIExtractor', 'RoIAlign'))
        plain = DET_MODELS.build(
            extractor('kiv.SingleRoIExtractor', 'RoIAlign'))
        with pytest.raises(KeyError, match="'kiv.NoSuchLayer'"):
            DET_MODELS.build(
                extractor('kiv.SingleRoIExtractor', 'kiv.NoSuchLayer'))
    assert all(type(m) is RoIAlign for m in ours.roi_layers)
    assert all(type(m) is MMCVRoIAlign for m in plain.roi_layers)
    torch.manual_seed(0)
    feats = (torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8))
    rois = _rois(30, 2, 64.0)
    rois[:, 3:] = rois[:, 1:3] + (rois[:, 3:] - rois[:, 1:3]) * 3
    torch.testing.assert_close(ours(feats, rois), ref(feats, rois),
                               rtol=1e-5, atol=1e-5)
