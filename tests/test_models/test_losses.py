"""Distillation losses."""
import pytest
import torch

from kiv.models.losses import FeatureMatchingLoss
from kiv.registry import MODELS

ALL_TERMS = dict(cosine_weight=0.9, smooth_l1_weight=0.1, mse_weight=0.5)


@pytest.mark.parametrize('shape', [(4, 8), (2, 8, 5, 3)])
def test_zero_for_identical_positive_otherwise(shape):
    loss = FeatureMatchingLoss(**ALL_TERMS)
    target = torch.randn(shape)
    assert loss(target.clone(), target).item() == pytest.approx(0, abs=1e-6)
    assert loss(target + 0.1 * torch.randn(shape), target).item() > 1e-4


@pytest.mark.parametrize('shape', [(4, 8), (2, 8, 5, 3)])
def test_cosine_invariant_to_positive_scaling(shape):
    loss = FeatureMatchingLoss()
    pred, target = torch.randn(shape), torch.randn(shape)
    torch.testing.assert_close(loss(3.5 * pred, target), loss(pred, target))
    torch.testing.assert_close(loss(pred, 0.2 * target), loss(pred, target))
    # a negative scale flips every cosine: (1 + cos) + (1 - cos) = 2
    assert (loss(-pred, target) + loss(pred, target)).item() == \
        pytest.approx(2.0)


def test_hand_computed_summary():
    pred = torch.tensor([[3., 0.], [1., 1.]])
    target = torch.tensor([[0., 1.], [1., 1.]])
    # cosine: rows give 0 and 1 -> mean(1 - cos) = 0.5
    assert FeatureMatchingLoss()(pred, target).item() == pytest.approx(0.5)
    # smooth-L1, beta 2: |3| -> 3 - 1 = 2, |1| -> 0.5 * 1 / 2 = 0.25; / 4
    sl1 = FeatureMatchingLoss(cosine_weight=0, smooth_l1_weight=1, beta=2.)
    assert sl1(pred, target).item() == pytest.approx(0.5625)
    # MSE: (9 + 1) / 4
    mse = FeatureMatchingLoss(cosine_weight=0, mse_weight=1)
    assert mse(pred, target).item() == pytest.approx(2.5)
    full = FeatureMatchingLoss(**ALL_TERMS, beta=2., loss_weight=2.)
    assert full(pred, target).item() == pytest.approx(
        2 * (0.9 * 0.5 + 0.1 * 0.5625 + 0.5 * 2.5))


def test_hand_computed_dense_cosine_over_channels():
    # (1, 2, 1, 2): positions (1, 0) vs (0, 1) and (1, 1) vs (2, 2)
    pred = torch.tensor([[1., 1.], [0., 1.]]).view(1, 2, 1, 2)
    target = torch.tensor([[0., 2.], [1., 2.]]).view(1, 2, 1, 2)
    assert FeatureMatchingLoss()(pred, target).item() == pytest.approx(0.5)
    # the same vectors as a batch of summaries give the same value
    rows = FeatureMatchingLoss()(
        pred.permute(0, 2, 3, 1).reshape(2, 2),
        target.permute(0, 2, 3, 1).reshape(2, 2))
    assert rows.item() == pytest.approx(0.5)


def test_gradient_and_registry():
    loss = MODELS.build(
        dict(type='kiv.FeatureMatchingLoss', cosine_weight=0.9,
             smooth_l1_weight=0.1))
    assert isinstance(loss, FeatureMatchingLoss)
    pred = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.randn(2, 4, 3, 3)
    value = loss(pred, target)
    assert value.dim() == 0
    value.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_bad_config_and_input():
    with pytest.raises(ValueError, match='at least one of'):
        FeatureMatchingLoss(cosine_weight=0)
    with pytest.raises(ValueError, match='mse_weight must be >= 0'):
        FeatureMatchingLoss(mse_weight=-1)
    with pytest.raises(ValueError, match='same'):
        FeatureMatchingLoss()(torch.randn(2, 4), torch.randn(2, 5))
