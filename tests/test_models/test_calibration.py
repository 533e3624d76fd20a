"""Label-free calibration of inherited outputs (shared latent space)."""
import pytest
import torch

from kiv.models.connectors import (InheritedStatistics, SharedLatentSpace,
                                   calibrate, calibration_affine)
from kiv.structures import FeatureOutput

TEACHERS = dict(
    clip=dict(summary_dim=6, feature_dims=[5], student_levels=[1]),
    det=dict(summary_dim=None, feature_dims=[4, 3], student_levels=[0, 1]),
)


def _latent(standardize: str = 'phis') -> SharedLatentSpace:
    return SharedLatentSpace(8, [8, 8], TEACHERS, standardize=standardize,
                             hidden_dim=16)


def _teacher_outputs(seed: int = 0) -> dict[str, FeatureOutput]:
    """Raw teacher outputs with their own per-channel means and scales."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, ch=1):
        scale = torch.rand(shape[ch], generator=gen) * 5 + 0.5
        shift = torch.randn(shape[ch], generator=gen) * 3
        view = [1] * len(shape)
        view[ch] = -1
        return torch.randn(*shape, generator=gen) * scale.view(view) + \
            shift.view(view)

    return dict(clip=FeatureOutput(draw(64, 6), (draw(8, 5, 4, 4), )),
                det=FeatureOutput(None, (draw(8, 4, 6, 6), draw(8, 3, 3, 3))))


def _shrunk(out: FeatureOutput, factor: float = 0.3) -> FeatureOutput:
    """What an MSE-trained student gives: every channel pulled towards its
    mean (and shifted a little)."""

    def pull(x):
        dims = (0, 2, 3) if x.dim() == 4 else (0, )
        mean = x.mean(dims, keepdim=True)
        return (x - mean) * factor + mean * 0.9 + 0.2

    return FeatureOutput(None if out.summary is None else pull(out.summary),
                         tuple(pull(f) for f in out.features))


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3) if x.dim() == 4 else (0, )
    return x.double().mean(dims), x.double().std(dims, unbiased=False)


def _calibrated_latent(teachers: dict) -> SharedLatentSpace:
    latent = _latent()
    latent.load_statistics(latent.statistic_sums(teachers))
    latent.load_calibration(latent.calibration_sums(
        {t: _shrunk(o) for t, o in teachers.items()}))
    return latent


def test_calibration_gives_the_teachers_channel_statistics():
    """Inherited outputs shrunk towards the mean come back with the
    teacher's per-channel mean and standard deviation; uncalibrated they
    keep the shrunk spread."""
    teachers = _teacher_outputs()
    latent = _calibrated_latent(teachers)
    assert latent.calibration_ready
    assert latent.calibration_keys() == [
        'clip.summary', 'clip.features.0', 'det.features.0',
        'det.features.1']
    for name, out in teachers.items():
        inherited = _shrunk(out)
        got = latent.calibrate(inherited, name)
        pairs = list(zip(got.features, inherited.features, out.features))
        if out.summary is not None:
            pairs.append((got.summary, inherited.summary, out.summary))
        for cal, raw, ref in pairs:
            assert cal.shape == raw.shape and cal.is_contiguous()
            mean, std = _moments(cal)
            ref_mean, ref_std = _moments(ref)
            torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(std, ref_std, rtol=1e-3, atol=1e-4)
            assert (_moments(raw)[1] < 0.5 * ref_std).all()


def test_to_teacher_space_calibrated_is_calibrate_of_the_inverse():
    teachers = _teacher_outputs()
    latent = _calibrated_latent(teachers).eval()
    student = FeatureOutput(torch.randn(2, 8),
                            (torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)))
    pred = latent.project(student, 'det', [(6, 6), (3, 3)])
    plain = latent.to_teacher_space(pred, 'det')
    cal = latent.to_teacher_space(pred, 'det', calibrated=True)
    ref = latent.calibrate(plain, 'det')
    for a, b, c in zip(cal.features, ref.features, plain.features):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)


def test_calibration_state_is_saved_and_old_checkpoints_load():
    """The statistics are in the state dict (an export with --keep-heads
    carries them); a state dict written before calibration existed loads
    strictly, as "not calibrated"."""
    teachers = _teacher_outputs()
    latent = _calibrated_latent(teachers)
    state = latent.state_dict()
    keys = [k for k in state if 'calibrations' in k]
    assert 'summary_calibrations.clip.ema_mean' in keys
    assert 'feature_calibrations.det.1.ema_moment2' in keys
    fresh = _latent()
    fresh.load_state_dict(state, strict=True)
    assert fresh.calibration_ready
    x = _shrunk(teachers['clip'])
    torch.testing.assert_close(fresh.calibrate(x, 'clip').summary,
                               latent.calibrate(x, 'clip').summary)
    old = {k: v for k, v in state.items() if 'calibrations' not in k}
    fresh = _latent()
    fresh.load_state_dict(old, strict=True)
    assert fresh.statistics_ready and not fresh.calibration_ready
    with pytest.raises(RuntimeError, match='InheritedCalibrationHook'):
        fresh.calibrate(x, 'clip')


def test_calibration_needs_keys_and_teacher_statistics():
    teachers = _teacher_outputs()
    latent = _latent()
    sums = latent.calibration_sums(teachers)
    with pytest.raises(RuntimeError, match='statistics'):
        latent.load_calibration(sums)
    latent.load_statistics(latent.statistic_sums(teachers))
    with pytest.raises(KeyError, match=r"missing keys \['det.features.1'\]"):
        latent.load_calibration({k: v for k, v in sums.items()
                                 if k != 'det.features.1'})
    none = _latent('none')
    assert none.calibration_keys() == [] and not none.calibration_ready
    with pytest.raises(RuntimeError, match="standardize='none'"):
        none.calibrate(teachers['det'], 'det')


def test_calibration_affine_checks_both_sides():
    from kiv.models.connectors import ChannelStandardizer
    student, teacher = InheritedStatistics(3), ChannelStandardizer(3)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match='inherited output'):
        calibration_affine(student, teacher)
    student.load_sums(student.batch_sums(x))
    with pytest.raises(RuntimeError, match='teacher'):
        calibration_affine(student, teacher)
    teacher.load_sums(teacher.batch_sums(x * 2 + 1))
    scale, shift = calibration_affine(student, teacher)
    torch.testing.assert_close(calibrate(x, scale, shift), x * 2 + 1,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='3 channels'):
        calibrate(torch.randn(4, 5), scale, shift)
