"""Shared latent space: standardisers, PHI-S rotations, s2t heads, the neck."""
import logging
import os.path as osp

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from kiv.utils.checkpoint import safe_torch_load
from kiv.models.connectors import (ChannelStandardizer, DenseS2THead,
                                   IdentityStandardizer, PHISStandardizer,
                                   S2THead, SharedLatentSpace,
                                   build_standardizer, equalizing_rotation,
                                   hadamard_matrix)
from kiv.registry import MODELS
from kiv.structures import FeatureOutput

DTYPE = torch.float64


def gaussian(dim: int, seed: int = 0):
    """A known mean vector and a non-diagonal covariance, plus a sampler."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen, dtype=DTYPE) * 3
    a = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    cov = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=DTYPE)
    chol = torch.linalg.cholesky(cov)

    def sample(n: int) -> torch.Tensor:
        z = torch.randn(n, dim, generator=gen, dtype=DTYPE)
        return mean + z @ chol.T

    return mean, cov, sample


def to_maps(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, C) rows -> (batch, C, H, W) maps holding the same vectors."""
    n, c = x.shape
    side = int((n // batch)**0.5)
    assert batch * side * side == n
    return x.view(batch, side, side, c).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------- rotations
@pytest.mark.parametrize('n', [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 384, 768])
def test_hadamard_matrix_orthogonal(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=DTYPE))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5,
                                                   dtype=DTYPE))


@pytest.mark.parametrize('n', [3, 6, 10, 52])
def test_hadamard_matrix_missing(n):
    assert hadamard_matrix(n) is None


@pytest.mark.parametrize('dim', [5, 6, 10])
def test_equalizing_rotation(dim):
    eigvals = torch.rand(dim, dtype=DTYPE) * torch.logspace(0, 3, dim,
                                                            dtype=DTYPE)
    rot = equalizing_rotation(eigvals)
    torch.testing.assert_close(rot @ rot.T, torch.eye(dim, dtype=DTYPE))
    diag = (rot @ torch.diag(eigvals) @ rot.T).diagonal()
    torch.testing.assert_close(diag, eigvals.mean().expand(dim))


# ------------------------------------------------------------ standardisers
@pytest.mark.parametrize('cls', [PHISStandardizer, ChannelStandardizer])
def test_statistics_converge(cls):
    mean, cov, sample = gaussian(6)
    std = cls(6, momentum=0.98)
    for _ in range(150):
        std.update(to_maps(sample(4 * 64), batch=4).float())
    assert int(std.num_updates) == 150
    torch.testing.assert_close(std.mean, mean, atol=0.05, rtol=0)
    torch.testing.assert_close(std.variance, cov.diagonal(), atol=0,
                               rtol=0.06)
    if cls is PHISStandardizer:
        err = (std.covariance - cov).abs().max() / cov.abs().max()
        assert err < 0.06


@pytest.mark.parametrize('cls', [PHISStandardizer, ChannelStandardizer])
def test_first_update_is_batch_statistics(cls):
    """Bias-corrected EMA: after one update the estimate is the batch's."""
    _, _, sample = gaussian(5, seed=1)
    x = sample(300)
    std = cls(5, momentum=0.9)
    std.update(x)
    torch.testing.assert_close(std.mean, x.mean(0))
    torch.testing.assert_close(std.variance, x.var(0, unbiased=False))
    if cls is PHISStandardizer:
        centered = x - x.mean(0)
        torch.testing.assert_close(std.covariance,
                                   centered.T @ centered / len(x))
    # a second batch is weighted m/(1+m) : 1/(1+m) against the first
    y = sample(300) + 1
    std.update(y)
    torch.testing.assert_close(
        std.mean, (0.9 * x.mean(0) + y.mean(0)) / 1.9)


@pytest.mark.parametrize('dim', [8, 12, 6, 7])
def test_phis_equal_variance(dim):
    """8: Sylvester, 12: Paley, 6 and 7: Givens fallback."""
    _, cov, sample = gaussian(dim, seed=dim)
    x = to_maps(sample(2 * 32 * 32), batch=2).float()
    std = PHISStandardizer(dim)
    assert (std.hadamard is None) == (dim in (6, 7))
    std.update(x)
    y = std(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    rows = y.permute(0, 2, 3, 1).reshape(-1, dim).double()
    torch.testing.assert_close(rows.mean(0), torch.zeros(dim, dtype=DTYPE),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.var(0, unbiased=False),
                               torch.ones(dim, dtype=DTYPE), atol=1e-4,
                               rtol=0)
    # a scaled rotation, not a whitening: correlations survive
    out_cov = torch.cov(rows.T)
    assert (out_cov - torch.diag(out_cov.diagonal())).abs().max() > 0.05
    # (N, C) input gives the same result as the maps
    torch.testing.assert_close(
        std(x.permute(0, 2, 3, 1).reshape(-1, dim)),
        y.permute(0, 2, 3, 1).reshape(-1, dim), atol=1e-5, rtol=1e-5)


def test_channel_unit_variance():
    _, _, sample = gaussian(7, seed=3)
    x = sample(1000).float()
    std = ChannelStandardizer(7)
    std.update(x)
    y = std(x).double()
    torch.testing.assert_close(y.mean(0), torch.zeros(7, dtype=DTYPE),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False),
                               torch.ones(7, dtype=DTYPE), atol=1e-4, rtol=0)


@pytest.mark.parametrize('mode', ['phis', 'channel', 'none'])
@pytest.mark.parametrize('maps', [False, True])
def test_inverse_is_exact(mode, maps):
    _, _, sample = gaussian(12, seed=4)
    std = build_standardizer(mode, 12, momentum=0.5)
    for _ in range(3):
        std.update(sample(256).float())
    x = sample(4 * 16).float()
    if maps:
        x = to_maps(x, batch=4)
    y = std(x)
    torch.testing.assert_close(std.inverse(y), x, atol=1e-4, rtol=1e-5)
    if mode == 'none':
        assert y is x
    else:
        assert not torch.allclose(y, x)


def test_half_precision_input_keeps_dtype():
    _, _, sample = gaussian(8, seed=5)
    std = PHISStandardizer(8)
    std.update(sample(256).to(torch.bfloat16))
    x = sample(32).to(torch.bfloat16)
    assert std(x).dtype == torch.bfloat16
    assert std.inverse(std(x)).dtype == torch.bfloat16
    # under AMP the statistics and the transform stay in float32
    x = sample(256).float()
    ref = PHISStandardizer(8)
    ref.update(x)
    amp = PHISStandardizer(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp.update(x)
        y = amp(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(amp.covariance, ref.covariance)
    torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize('cls', [PHISStandardizer, ChannelStandardizer])
def test_identity_before_first_update(cls):
    std = cls(4)
    x = torch.randn(3, 4)
    assert not std.initialized
    torch.testing.assert_close(std(x), x)
    with pytest.raises(RuntimeError, match='no statistics'):
        std.mean


@pytest.mark.parametrize('cls', [PHISStandardizer, ChannelStandardizer])
def test_state_dict_roundtrip(cls, tmp_path):
    _, _, sample = gaussian(12, seed=6)
    std = cls(12, momentum=0.9)
    for _ in range(4):
        std.update(sample(128).float())
    assert set(std.state_dict()) == {'num_updates', 'ema_mean',
                                     'ema_moment2', 'fixed'}
    path = osp.join(tmp_path, 'std.pth')
    torch.save(std.state_dict(), path)
    fresh = cls(12, momentum=0.9)
    x = sample(64).float()
    fresh(x)  # caches the identity transform; loading must invalidate it
    fresh.load_state_dict(safe_torch_load(path))
    assert int(fresh.num_updates) == 4
    torch.testing.assert_close(fresh(x), std(x), atol=0, rtol=0)
    torch.testing.assert_close(fresh.inverse(x), std.inverse(x), atol=0,
                               rtol=0)


def test_transform_is_lazy():
    _, _, sample = gaussian(8, seed=7)
    std = PHISStandardizer(8)
    calls = []
    compute = std._compute_transform
    std._compute_transform = lambda: calls.append(1) or compute()
    std.update(sample(64))
    x = sample(16).float()
    std(x), std(x), std.inverse(x)
    assert len(calls) == 1
    std.update(sample(64))
    std(x), std(x)
    assert len(calls) == 2


def test_max_updates_freezes_statistics():
    _, _, sample = gaussian(4, seed=8)
    std = ChannelStandardizer(4, max_updates=2)
    std.update(sample(64))
    std.update(sample(64))
    mean = std.mean.clone()
    std.update(sample(64) + 10)
    assert std.frozen and int(std.num_updates) == 2
    torch.testing.assert_close(std.mean, mean)


def test_standardizer_bad_input():
    std = PHISStandardizer(4)
    with pytest.raises(ValueError, match='expected 4 channels'):
        std.update(torch.randn(8, 5))
    with pytest.raises(ValueError, match=r'\(N, C\) vectors'):
        std(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match='momentum'):
        ChannelStandardizer(4, momentum=1.0)
    with pytest.raises(ValueError, match="standardize='pca'"):
        build_standardizer('pca', 4)


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world_size)
    torch.manual_seed(0)
    data = torch.randn(2, 96, 6, dtype=DTYPE) * torch.arange(1, 7) + 5
    neck = _neck('phis')
    student = _student()
    # each rank sees its own half (different sizes) of every teacher map
    per_rank = [slice(0, 40), slice(40, 96)][rank]
    torch.manual_seed(rank)  # different teacher outputs on each rank
    targets = _targets()
    std = PHISStandardizer(6)
    std.update(data[0, per_rank])
    std.update(data[1, per_rank])
    neck.train()(student, {'dino': targets['dino']})
    torch.save(
        dict(std=std.state_dict(), neck=neck.state_dict()),
        osp.join(out_dir, f'rank{rank}.pth'))
    dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_all_reduced_across_ranks(tmp_path):
    """2 gloo processes: every rank ends with the statistics of all data."""
    mp.spawn(_dist_worker,
             args=(2, osp.join(tmp_path, 'init'), str(tmp_path)),
             nprocs=2, join=True)
    states = [
        safe_torch_load(osp.join(tmp_path, f'rank{r}.pth')) for r in (0, 1)
    ]
    for key, value in states[0]['neck'].items():
        torch.testing.assert_close(states[1]['neck'][key], value)
    torch.manual_seed(0)
    data = torch.randn(2, 96, 6, dtype=DTYPE) * torch.arange(1, 7) + 5
    ref = PHISStandardizer(6)
    ref.update(data[0])
    ref.update(data[1])
    for r in (0, 1):
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(states[r]['std'][key], value)


# ------------------------------------------------------------------ heads
@pytest.mark.parametrize('size', [(5, 7), (12, 12), (20, 16)])
def test_dense_head_matches_resize_then_mlp(size):
    head = DenseS2THead(8, 6, hidden_dim=16)
    head.init_weights()
    x = torch.randn(2, 8, 12, 12)
    out = head(x, size)
    assert out.shape == (2, 6, *size)
    resized = F.interpolate(x, size, mode='bilinear', align_corners=False)
    ref = head.fc2(
        F.gelu(head.norm(head.fc1(resized.permute(0, 2, 3, 1)))))
    torch.testing.assert_close(out, ref.permute(0, 3, 1, 2), atol=1e-5,
                               rtol=1e-5)


def test_summary_head():
    head = S2THead(8, 6, hidden_dim=16)
    assert head(torch.randn(3, 8)).shape == (3, 6)
    with pytest.raises(ValueError, match='expected 8 channels'):
        head(torch.randn(3, 7))


# ------------------------------------------------------------------- neck
STUDENT_DIMS = [8, 12, 16, 20]
TEACHERS = dict(
    dino=dict(summary_dim=6, feature_dims=[6]),
    sam=dict(summary_dim=None, feature_dims=[10, 12], student_levels=[0, 3]),
)


def _neck(standardize='phis', **kwargs):
    return MODELS.build(
        dict(type='kiv.SharedLatentSpace', student_summary_dim=16,
             student_feature_dims=STUDENT_DIMS, teachers=TEACHERS,
             standardize=standardize, hidden_dim=32, momentum=0.9, **kwargs))


def _student(requires_grad=False):
    feats = tuple(
        torch.randn(2, c, 32 // 2**i, 32 // 2**i, requires_grad=requires_grad)
        for i, c in enumerate(STUDENT_DIMS))
    return FeatureOutput(torch.randn(2, 16, requires_grad=requires_grad),
                         feats)


def _targets():
    return dict(
        dino=FeatureOutput(
            torch.randn(2, 6, dtype=torch.float32) * 4 + 1,
            (torch.randn(2, 6, 6, 6) * 10 - 3, )),
        sam=FeatureOutput(
            None, (torch.randn(2, 10, 48, 48) * 0.1,
                   torch.randn(2, 12, 3, 5) + 2)))


@pytest.mark.parametrize('standardize', ['phis', 'channel', 'none'])
def test_neck_shapes_and_statistics(standardize):
    neck = _neck(standardize)
    assert isinstance(neck, SharedLatentSpace)
    neck.init_weights()
    targets = _targets()
    out = neck.train()(_student(), targets)
    assert set(out) == {'dino', 'sam'}
    for teacher, target in targets.items():
        pred, std_target = out[teacher]['pred'], out[teacher]['target']
        for t in (pred, std_target):
            assert isinstance(t, FeatureOutput)
            assert [f.shape for f in t.features] == \
                [f.shape for f in target.features]
        if target.summary is None:
            assert pred.summary is None and std_target.summary is None
        else:
            assert pred.summary.shape == std_target.summary.shape == (2, 6)
    big = out['sam']['target'].features[0]
    if standardize == 'none':
        assert torch.equal(big, targets['sam'].features[0])
    else:  # standardised from this very batch: unit variance
        assert big.var().item() == pytest.approx(1.0, rel=0.05)
        assert int(neck.feature_standardizers['sam'][0].num_updates) == 1
        assert int(neck.summary_standardizers['dino'].num_updates) == 1


def test_neck_gradients_reach_heads_not_targets():
    neck = _neck()
    student = _student(requires_grad=True)
    targets = _targets()
    for t in targets.values():
        for f in t.features:
            f.requires_grad_(True)
    out = neck.train()(student, targets)
    loss = sum(((o['pred'].features[i] - o['target'].features[i])**2).mean()
               for o in out.values()
               for i in range(len(o['pred'].features)))
    loss = loss + (out['dino']['pred'].summary -
                   out['dino']['target'].summary).pow(2).mean()
    for o in out.values():
        assert all(not f.requires_grad for f in o['target'].features)
    loss.backward()
    for name, p in neck.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    used = {0, 2, 3}  # sam: levels 0 and 3, dino: default level 2
    for i, f in enumerate(student.features):
        assert (f.grad is not None) == (i in used)
    assert student.summary.grad is not None
    assert all(f.grad is None for t in targets.values() for f in t.features)


def test_neck_eval_does_not_update_statistics():
    neck = _neck()
    neck.train()(_student(), _targets())
    before = {k: v.clone() for k, v in neck.state_dict().items()}
    neck.eval()(_student(), _targets())
    for key, value in neck.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_neck_subset_project_and_inverse(tmp_path):
    neck = _neck()
    targets = _targets()
    neck.train()(_student(), targets)
    out = neck.eval()(_student(), {'sam': targets['sam']})
    assert set(out) == {'sam'}
    # inherited heads: standardised space -> teacher space is exact
    back = neck.to_teacher_space(out['sam']['target'], 'sam')
    for a, b in zip(back.features, targets['sam'].features):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    pred = neck.project(_student(), 'dino', sizes=[(9, 4)])
    assert pred.summary.shape == (2, 6)
    assert pred.features[0].shape == (2, 6, 9, 4)
    # the dense s2t heads work channels-last; the teacher's own head (an
    # mmcv RoI head reads raw NCHW memory) gets contiguous maps
    assert not pred.features[0].is_contiguous()
    back = neck.to_teacher_space(pred, 'dino').features[0]
    assert back.shape == (2, 6, 9, 4) and back.is_contiguous()
    # a fresh neck restored from a checkpoint gives identical targets
    path = osp.join(tmp_path, 'neck.pth')
    torch.save(neck.state_dict(), path)
    fresh = _neck()
    fresh.load_state_dict(safe_torch_load(path))
    again = fresh.eval()(_student(), {'sam': targets['sam']})
    for a, b in zip(again['sam']['target'].features,
                    out['sam']['target'].features):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_neck_bad_config_and_input():
    with pytest.raises(ValueError, match='student level 4 does not exist'):
        _neck(default_student_level=4)
    with pytest.raises(ValueError, match='student_levels has 1 entries'):
        SharedLatentSpace(16, STUDENT_DIMS,
                          dict(t=dict(summary_dim=4, feature_dims=[4, 4],
                                      student_levels=[0])))
    with pytest.raises(ValueError, match='expected keys'):
        SharedLatentSpace(16, STUDENT_DIMS, dict(t=dict(summary=4)))
    neck = _neck()
    with pytest.raises(KeyError, match="unknown teacher 'clip'"):
        neck(_student(), {'clip': _targets()['dino']})
    with pytest.raises(ValueError, match="teacher 'dino' has summary dim"):
        neck(_student(), {'dino': _targets()['sam']})
    bad_student = FeatureOutput(torch.randn(2, 16),
                                _student().features[:3])
    with pytest.raises(ValueError, match='student_feature_dims'):
        neck.project(bad_student, 'dino', [(4, 4)])
    with pytest.raises(ValueError, match='got 2 sizes'):
        neck.project(_student(), 'dino', [(4, 4), (2, 2)])


def test_identity_mode_has_no_statistics():
    neck = _neck('none')
    assert all(
        isinstance(s, IdentityStandardizer)
        for s in neck.summary_standardizers.values())
    assert not [k for k in neck.state_dict() if 'standardizers' in k]


def _preserved_neck(**kwargs) -> SharedLatentSpace:
    """The base teacher 'kb' preserved: student dims equal teacher dims."""
    return SharedLatentSpace(
        8, [8], dict(kb=dict(summary_dim=8, feature_dims=[8],
                             student_levels=[0], preserve=True),
                     other=dict(summary_dim=4, feature_dims=[])),
        hidden_dim=16, **kwargs)


def _kb_outputs(seed: int) -> FeatureOutput:
    gen = torch.Generator().manual_seed(seed)
    return FeatureOutput(torch.randn(6, 8, generator=gen) * 3 + 1,
                         (torch.randn(6, 8, 4, 4, generator=gen) * 2 - 1, ))


def _preservation_error(neck: SharedLatentSpace, out: FeatureOutput) -> float:
    """Largest |head(teacher output) - standardised teacher output|."""
    neck.eval()
    target = neck.standardize_targets(out, 'kb')
    pred = neck.project(out, 'kb', [out.features[0].shape[-2:]])
    return max(float((p - t).abs().max()) for p, t in zip(
        (pred.summary, ) + pred.features,
        (target.summary, ) + target.features))


def test_ema_statistics_initialise_the_preserved_heads_when_they_freeze():
    """statistics='ema' with max_stat_updates: when the EMA freezes, the
    base teacher's heads become its (final) standardiser, so the student
    that is the base teacher predicts its targets exactly."""
    neck = _preserved_neck(statistics='ema', max_stat_updates=3)
    other = FeatureOutput(torch.randn(6, 4), ())
    for step in range(3):
        kb = _kb_outputs(step)
        neck.train()(kb, dict(kb=kb, other=other))
        # heads start as the standardiser once statistics first exist ...
        if step == 0:
            assert _preservation_error(neck, kb) < 1e-4
        # ... while the EMA moves, the heads are trained, not re-set
        if step == 1:
            assert _preservation_error(neck, kb) > 0.01
        if step < 2:  # training moves the head
            with torch.no_grad():
                neck.summary_heads['kb'].skip.weight.add_(0.1)
    assert neck.statistics_ready
    assert _preservation_error(neck, _kb_outputs(7)) < 1e-4
    # frozen: later steps neither move the statistics nor re-set the heads
    with torch.no_grad():
        neck.summary_heads['kb'].skip.weight.add_(0.1)
    kb = _kb_outputs(8)
    neck.train()(kb, dict(kb=kb, other=other))
    assert _preservation_error(neck, kb) > 0.01


def test_evaluating_before_statistics_exist_warns_once():
    from mmengine.logging import MMLogger
    neck = _preserved_neck()
    kb = _kb_outputs(0)
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        neck.eval()
        neck.standardize_targets(kb, 'kb')
        neck.to_teacher_space(neck.project(kb, 'kb', [(4, 4)]), 'kb')
        warned = [r for r in records if 'no standardiser statistics' in r]
        assert len(warned) == 1 and "'kb.summary'" in warned[0]
        other = FeatureOutput(torch.randn(6, 4), ())
        neck.train()(kb, dict(kb=kb, other=other))  # fixed from this batch
        records.clear()
        fresh = _preserved_neck()
        fresh.load_state_dict(neck.state_dict())
        fresh.eval().standardize_targets(kb, 'kb')
        assert not [r for r in records if 'no standardiser statistics' in r]
    finally:
        logger.removeHandler(handler)
