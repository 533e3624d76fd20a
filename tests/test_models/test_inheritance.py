"""Inheritance that works: losses that learn scale, statistics that do not
move, knowledge preserved from step 0, inherited heads that agree."""
import copy
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import kiv  # noqa: F401
from kiv.evaluation import TeacherAgreementMetric
from kiv.models.distillers.knowledge_inheritance import DEFAULT_LOSSES
from kiv.models.connectors.standardizers import (PHISStandardizer,
                                                 StatisticsStandardizer)
from kiv.registry import MODELS
from kiv.testing.paths import TINY_DISTILL_CFG as TINY_CFG
from kiv.testing.tiny_classifier import (colour_classifier_teacher,
                                         save_colour_classifier)


def _model(**overrides):
    cfg = Config.fromfile(TINY_CFG)
    cfg.model.update(overrides)
    return MODELS.build(cfg.model)


def _images(n=4, seed=0, size=56):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


def _standardizers(model):
    return [m for m in model.latent.modules()
            if isinstance(m, StatisticsStandardizer)]


# ------------------------------------------------------------------ losses
def test_default_losses_are_mse_on_standardised_targets(distill_workdir):
    """Cosine-only losses leave the norm free (the 0 % agreement bug): the
    defaults must be MSE, which penalises a prediction of the right
    direction but the wrong scale."""
    for key in ('summary', 'features'):
        assert DEFAULT_LOSSES[key]['cosine_weight'] == 0
        assert DEFAULT_LOSSES[key]['mse_weight'] > 0
    model = _model()
    target = torch.randn(8, 64)
    for name in model.teachers:
        for losses in (model.summary_losses, model.feature_losses):
            loss = losses[name]
            assert float(loss(0.4 * target, target)) > 0.3, name
            assert float(loss(target, target)) == 0
    assert 'loss_detector_summary' not in model.loss(_images())


def test_logit_distillation_through_the_kept_head(distill_workdir):
    """Optional KL between the teacher head on its own summary and on the
    de-standardised prediction; gradients reach the student."""
    from kiv.models.losses import LogitDistillationLoss
    kd = LogitDistillationLoss(temperature=2.0)
    logits = torch.randn(4, 7)
    assert float(kd(logits, logits)) == pytest.approx(0, abs=1e-6)
    assert float(kd(logits.flip(0), logits)) > 0
    kd_cfg = dict(type='kiv.LogitDistillationLoss', temperature=2.0)
    model = _head_distiller(distill_workdir, losses=dict(logits=kd_cfg))
    model.train()
    images = _images()
    model.load_statistics(model.statistic_sums(images))
    losses = model.loss(images)
    assert 'loss_cls_logits' in losses
    assert 'loss_dinov2_logits' not in losses  # no kept head
    losses['loss_cls_logits'].backward()
    grads = [p.grad for p in model.latent.summary_heads['cls'].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# -------------------------------------------------------------- statistics
def test_warmup_statistics_are_exact_and_fixed(distill_workdir):
    """Summed batch sums give exactly the statistics of all samples; once
    loaded they never move, whatever training does."""
    model = _model()
    batches = [_images(4, seed) for seed in range(3)]
    sums = None
    for images in batches:
        s = model.statistic_sums(images)
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    model.load_statistics(sums)
    assert model.latent.statistics_ready
    outs = [model.teachers['clip'](b) for b in batches]
    summary = torch.cat([o.summary for o in outs]).double()
    std = model.latent.summary_standardizers['clip']
    torch.testing.assert_close(std.mean, summary.mean(0))
    torch.testing.assert_close(
        std.covariance, torch.cov(summary.T, correction=0), atol=1e-6,
        rtol=1e-5)
    dense = torch.cat([o.features[0] for o in outs]).double()
    dense = dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1])
    torch.testing.assert_close(
        model.latent.feature_standardizers['clip'][0].mean, dense.mean(0))
    before = {k: v.clone() for k, v in model.latent.state_dict().items()
              if 'standardizer' in k}
    model.train()
    model.loss(_images(4, 9))
    after = model.latent.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_runner_fixes_statistics_once_and_no_eigh_per_step(distill_workdir,
                                                           monkeypatch):
    """The warm-up hook fixes the statistics before the first step; PHI-S
    computes one eigendecomposition per standardiser for the whole run."""
    calls = []
    eigh = torch.linalg.eigh

    def counting_eigh(*args, **kwargs):
        calls.append(1)
        return eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, 'eigh', counting_eigh)
    cfg = Config.fromfile(TINY_CFG)
    cfg.work_dir = osp.join(distill_workdir, 'wd_fixed')
    cfg.train_cfg.max_iters = 4
    cfg.train_cfg.val_interval = 100
    cfg.default_hooks.checkpoint.interval = 100
    runner = Runner.from_cfg(cfg)
    runner.train()
    stds = _standardizers(runner.model)
    assert stds and all(s.frozen and int(s.num_updates) == 1 for s in stds)
    assert all(bool(s.fixed) for s in stds)
    phis = [s for s in stds if isinstance(s, PHISStandardizer)]
    assert len(calls) == len(phis)


# -------------------------------------------------- knowledge preservation
def test_knowledge_preserved_at_step_zero(distill_workdir):
    """At iteration 0 the student *is* the base teacher: same summary, the
    base teacher's loss is 0 (its heads start as its standardiser and its
    dense target is read at its own grid) and it sends no gradient into the
    adapter."""
    model = _model(grad_share_interval=1)
    model.init_weights()
    model.train()
    images = _images()
    model.load_statistics(model.statistic_sums(images))
    student = model.extract_student(images)
    teacher = model.teachers['dinov2'](images)
    torch.testing.assert_close(student.summary, teacher.summary, rtol=0,
                               atol=0)
    losses = model.loss(images)
    assert float(losses['loss_dinov2_summary']) < 1e-9
    assert float(losses['loss_dinov2_features']) < 1e-9
    assert float(losses['loss_clip_summary']) > 0.1
    assert float(losses['grad_share/dinov2']) < 1e-3


def test_preservation_survives_init_weights_after_loading(distill_workdir):
    """Statistics loaded before the Runner's init_weights (e.g. from a
    cache) still give exact base heads."""
    model = _model()
    images = _images()
    model.load_statistics(model.statistic_sums(images))
    model.init_weights()
    model.train()
    losses = model.loss(images)
    assert float(losses['loss_dinov2_summary']) < 1e-9


# --------------------------------------------------------- inherited heads
def _head_distiller(distill_workdir, **overrides):
    cfg = Config.fromfile(TINY_CFG)
    path, _ = save_colour_classifier(distill_workdir)
    cfg.model.teachers = dict(dinov2=cfg.model.teachers.dinov2,
                              cls=colour_classifier_teacher(path))
    cfg.model.student.summary_names = ['dinov2', 'cls']
    cfg.model.latent.teachers = dict()
    cfg.model.update(overrides)
    return MODELS.build(cfg.model)


def test_inherited_head_exact_when_student_is_teacher(distill_workdir):
    """Student -> s2t head -> inverse standardisation -> the teacher's own
    head, through the real path: when the student is the teacher (base
    teacher with a kept head, preserved heads) agreement is 100 %."""
    import timm
    from kiv.testing.tiny_teachers import DINOV2_TINY
    from kiv.utils.checkpoint import safe_torch_load
    cfg = Config.fromfile(TINY_CFG)
    torch.manual_seed(0)
    net = timm.create_model(DINOV2_TINY['model_name'], pretrained=False,
                            num_classes=5, **DINOV2_TINY['model_kwargs'])
    state = safe_torch_load('data/tiny_teachers/dinov2_tiny.pth')
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ['head.bias', 'head.weight'] and not unexpected
    teacher = copy.deepcopy(cfg.model.teachers.dinov2)
    teacher.source = net
    teacher.head = dict(layer='head', input='summary')
    student = dict(cfg.model.student, summary_names=['dinov2'])
    model = MODELS.build(dict(
        cfg.model, teachers=dict(dinov2=teacher), student=student,
        latent=dict(type='kiv.SharedLatentSpace', hidden_dim=64)))
    model.load_statistics(model.statistic_sums(_images(8, 1)))
    model.eval()
    metric = TeacherAgreementMetric()
    metric.process(None, model.predict(_images(8, 2)))
    result = metric.compute_metrics(metric.results)
    assert result['dinov2/top1_agreement'] == 100.0
    assert result['dinov2/summary_cos'] > 0.9999


def test_agreement_cosines_are_in_standardised_space(distill_workdir):
    """A large teacher mean would inflate raw-space cosines; predict()
    reports the cosine between projection and standardised target."""
    model = _model()
    model.load_statistics(model.statistic_sums(_images(8, 3)))
    model.eval()
    images = _images(4, 4)
    out = model.predict(images)
    raw = model.teachers['clip'](images)
    pred = model.latent.project(model.extract_student(images), 'clip',
                                [f.shape[-2:] for f in raw.features])
    target = model.latent.standardize_targets(raw, 'clip')
    cos = torch.nn.functional.cosine_similarity(pred.summary,
                                                target.summary)
    got = torch.tensor([o['clip']['summary_cos'] for o in out])
    torch.testing.assert_close(got, cos, atol=1e-5, rtol=1e-5)
    assert all(o['detector']['summary_cos'] is None for o in out)


@pytest.mark.slow
def test_tiny_distillation_inherits_a_working_classifier(distill_workdir):
    """A short distillation (default losses: MSE on PHI-S targets) next to
    the knowledge base gives an inherited head that agrees with the
    teacher's classifier on at least 90 % of held-out images of the same
    distribution, and predictions of the teacher's scale (de-standardised,
    they land on the teacher's features, not near its mean).

    The knowledge base stays a teacher (preserved heads): each teacher reads
    a summary of its own. With one shared summary the knowledge base's
    preserved head pins that summary to its CLS token and the classifier's
    head competes with it: 77.1 % agreement at this budget (97.9 % with the
    classifier as the only teacher). With the old default (cosine-only
    summary loss) the norm ratio is about 0.28: the de-standardised
    prediction sits near the teacher's mean.

    Measured on 2 CPU cores (200 iterations, batch 16, 56 px, 48 held-out
    images): see the printed line.
    """
    from kiv.testing.tiny_classifier import make_colour_images
    path, train_dir = save_colour_classifier(distill_workdir)
    val_dir = osp.join(distill_workdir, 'colour', 'val')
    make_colour_images(val_dir, 48, seed=123)
    cfg = Config.fromfile(TINY_CFG)
    cfg.work_dir = osp.join(distill_workdir, 'wd_colour')
    # the knowledge base and the classifier, a summary each
    cfg.model.teachers = dict(dinov2=cfg.model.teachers.dinov2,
                              cls=colour_classifier_teacher(path))
    cfg.model.student.summary_names = ['dinov2', 'cls']
    cfg.model.latent.teachers = dict()
    cfg.model.grad_share_interval = 0
    for split, folder in (('train', train_dir), ('val', val_dir)):
        loader = cfg[f'{split}_dataloader']
        loader.dataset = dict(type='kiv.UnlabeledImageDataset',
                              data_root=folder,
                              pipeline=loader.dataset.pipeline)
    cfg.train_dataloader.batch_size = 16
    cfg.val_dataloader.batch_size = 16
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg.max_iters = 200
    cfg.train_cfg.val_interval = 1000
    cfg.default_hooks.checkpoint.interval = 1000
    cfg.default_hooks.logger.interval = 50
    cfg.param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=False,
                                begin=0, end=200, eta_min=1e-5)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    agreement = metrics['agreement/cls/top1_agreement']
    # majority rate of the teacher's own predictions on the held-out set
    model = runner.model.eval()
    classes = []
    for batch in runner.val_dataloader:
        data = model.data_preprocessor(batch, False)
        summary = model.teachers['cls'](data['inputs']).summary
        classes += model.teachers['cls'].forward_head(summary).argmax(
            1).tolist()
    majority = 100.0 * np.bincount(classes).max() / len(classes)
    # scale: the projection's norm matches the standardised target's
    batch = next(iter(runner.val_dataloader))
    with torch.no_grad():
        images = model.data_preprocessor(batch, False)['inputs']
        raw = model.teachers['cls'](images)
        pred = model.latent.project(model.extract_student(images), 'cls',
                                    [f.shape[-2:] for f in raw.features])
        target = model.latent.standardize_targets(raw, 'cls')
    ratio = float((pred.summary.norm(dim=1) /
                   target.summary.norm(dim=1)).mean())
    print(f'inherited-head top-1 agreement {agreement:.1f} % '
          f'(top-5 {metrics["agreement/cls/top5_agreement"]:.1f} %), '
          f'majority-class rate {majority:.1f} %, norm ratio {ratio:.2f}')
    assert agreement >= 90.0, (agreement, majority)
    assert agreement >= majority + 40, (agreement, majority)
    assert 0.7 < ratio < 1.3, ratio
    # the knowledge base's summary is still its own CLS token's direction
    kb = metrics['agreement/dinov2/summary_cos']
    assert kb > 0.9, kb


def test_teacher_without_summary_end_to_end(distill_workdir):
    """summary=dict(type='none'): no summary head, loss, standardiser or
    cosine; dense features still distilled and reported."""
    model = _model()
    det = model.teachers['detector']
    assert det.summary_dim is None and det(_images(1)).summary is None
    assert 'detector' not in model.latent.summary_heads
    assert 'detector.summary' not in model.latent.statistic_keys()
    model.load_statistics(model.statistic_sums(_images()))
    model.train()
    losses = model.loss(_images())
    assert 'loss_detector_features' in losses
    assert 'loss_detector_summary' not in losses
    model.eval()
    metric = TeacherAgreementMetric()
    metric.process(None, model.predict(_images()))
    result = metric.compute_metrics(metric.results)
    assert 'detector/summary_cos' not in result
    assert 'detector/level0_cos' in result


def test_task_heads_are_initialised(distill_workdir):
    """task_heads is mmengine's ModuleDict: init_weights reaches an mmdet
    head and sets its classification bias prior."""
    import math
    model = _model(task_heads=dict(det=dict(
        head=dict(type='mmdet.RetinaHead', num_classes=2, in_channels=64,
                  stacked_convs=1, feat_channels=16,
                  anchor_generator=dict(type='AnchorGenerator',
                                        octave_base_scale=4,
                                        scales_per_octave=1, ratios=[1.0],
                                        strides=[4, 8, 16, 32]),
                  bbox_coder=dict(type='DeltaXYWHBBoxCoder',
                                  target_means=[.0, .0, .0, .0],
                                  target_stds=[1.0, 1.0, 1.0, 1.0])),
        inputs='pyramid', gt_field='gt_instances')))
    bias = model.task_heads['det'].retina_cls.bias
    prior = -math.log((1 - 0.01) / 0.01)
    assert not torch.allclose(bias, torch.full_like(bias, prior))
    model.init_weights()
    torch.testing.assert_close(bias.detach(), torch.full_like(bias, prior))
