"""Knowledge inheritance end to end on tiny teachers (CPU)."""
import copy
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import kiv  # noqa: F401
from kiv.utils.checkpoint import safe_torch_load
from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from conftest import TINY_DISTILL_CFG as TINY_CFG


def _cfg(work_dir: str, **model_overrides) -> Config:
    cfg = Config.fromfile(TINY_CFG)
    cfg.work_dir = work_dir
    cfg.model.update(model_overrides)
    cfg.default_hooks.logger.interval = 1
    return cfg


def _history(runner: Runner, key: str) -> np.ndarray:
    return runner.message_hub.get_scalar(f'train/{key}').data[0]


@pytest.fixture(scope='module')
def trained(distill_workdir):
    """The tiny recipe: 20 iterations, validation at the end."""
    runner = Runner.from_cfg(_cfg(osp.join(distill_workdir, 'wd')))
    runner.train()
    return runner


def test_twenty_iterations_lower_every_teacher_loss(trained):
    """Purpose-specific teachers' losses fall; the base teacher's starts at
    0 (the student is the knowledge base) and stays small."""
    for teacher, outs in (('clip', ('summary', 'features')),
                          ('detector', ('features', ))):
        for out in outs:
            hist = _history(trained, f'loss_{teacher}_{out}')
            assert len(hist) == 20
            assert hist[-5:].mean() < hist[:5].mean(), (teacher, out, hist)
    for out in ('summary', 'features'):
        hist = _history(trained, f'loss_dinov2_{out}')
        assert hist[0] < 1e-6 and hist.max() < 0.05, (out, hist)
    shares = [_history(trained, f'grad_share/{t}')[-1]
              for t in ('dinov2', 'clip', 'detector')]
    assert abs(sum(shares) - 1) < 1e-4


def test_checkpoint_has_no_teachers_and_keeps_latent_statistics(trained):
    ckpt = safe_torch_load(osp.join(trained.work_dir, 'iter_20.pth'))
    keys = ckpt['state_dict'].keys()
    assert not any(k.startswith('teachers.') for k in keys)
    assert any(k.startswith('student.base.') for k in keys)
    stats = [k for k in keys if k.startswith('latent.')
             and 'standardizer' in k]
    assert stats, 'standardiser buffers must be saved'
    # and it loads back into a fresh distiller (teachers from their files)
    model = MODELS.build(copy.deepcopy(trained.cfg.model))
    model.load_state_dict(ckpt['state_dict'], strict=True)


def test_export_round_trip_gives_identical_features(trained, distill_workdir):
    from kiv.engine.export import export_student
    out = osp.join(distill_workdir, 'student.pth')
    meta = export_student(osp.join(trained.work_dir, 'iter_20.pth'), out,
                          keep_heads=True)
    assert meta['base_teacher'] == 'dinov2'
    assert meta['teachers'] == ['clip', 'detector', 'dinov2']
    exported = torch.load(out, weights_only=True)
    assert 'inherited_heads' in exported
    student_cfg = copy.deepcopy(trained.cfg.model.student)
    student_cfg.base.checkpoint = None  # all weights from the export
    student_cfg.init_cfg = dict(type='Pretrained', checkpoint=out)
    backbone = MODELS.build(student_cfg)
    backbone.init_weights()
    backbone.eval()
    distilled = trained.model.student.eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        a, b = backbone.forward_features(x), distilled.forward_features(x)
    torch.testing.assert_close(a.summary, b.summary, rtol=0, atol=0)
    for fa, fb in zip(a.features, b.features):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def _grad_shares(distill_workdir, name, standardize, scale):
    """Train 6 iterations with the shipped default losses (MSE), one
    teacher's outputs x scale."""
    cfg = _cfg(osp.join(distill_workdir, name), grad_share_interval=1)
    cfg.model.latent.standardize = standardize
    cfg.train_cfg.max_iters = 6
    cfg.train_cfg.val_interval = 100
    runner = Runner.from_cfg(cfg)

    def scale_outputs(module, args, out):
        return FeatureOutput(out.summary * scale,
                             tuple(f * scale for f in out.features))

    runner.model.teachers['clip'].register_forward_hook(scale_outputs)
    runner.train()
    return {t: float(np.mean(_history(runner, f'grad_share/{t}')))
            for t in ('dinov2', 'clip', 'detector')}


def test_imbalanced_transfer_and_its_fix(distill_workdir):
    """With the shipped default losses: without standardisation a teacher
    whose features are 100x larger takes almost all the adapter's gradient
    ("imbalanced transfer"); the shared latent space (PHI-S) restores
    balance between the purpose-specific teachers. The base teacher
    (dinov2) sends almost nothing at first by design: the student starts as
    it (knowledge preservation)."""
    raw = _grad_shares(distill_workdir, 'wd_none', 'none', 100.0)
    assert raw['clip'] > 0.95, raw
    fixed = _grad_shares(distill_workdir, 'wd_phis', 'phis', 100.0)
    assert fixed['clip'] < 0.8, fixed
    assert fixed['detector'] > 0.2, fixed


def test_multi_task_heads_train_on_labelled_samples(distill_workdir):
    """mmpretrain / mmseg / mmdet heads learn jointly with distillation,
    each only on the samples that carry its labels."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData, PixelData
    from mmpretrain.structures import DataSample
    from mmseg.structures import SegDataSample
    cfg = Config.fromfile(TINY_CFG)
    cfg.model.task_heads = dict(
        cls=dict(head=dict(type='mmpretrain.LinearClsHead', num_classes=3,
                           in_channels=64),
                 inputs='summary', gt_field='gt_label'),
        seg=dict(head=dict(type='mmseg.FCNHead', in_channels=64, channels=16,
                           num_convs=1, in_index=0, num_classes=2,
                           norm_cfg=dict(type='BN')),
                 inputs='pyramid', gt_field='gt_sem_seg',
                 loss_kwargs=dict(train_cfg=dict()), weight=0.5),
        det=dict(head=dict(type='mmdet.FCOSHead', num_classes=2,
                           in_channels=64, feat_channels=32, stacked_convs=1,
                           strides=[4, 8, 16, 32],
                           regress_ranges=((-1, 16), (16, 32), (32, 64),
                                           (64, 1e8))),
                 inputs='pyramid', gt_field='gt_instances'))
    model = MODELS.build(cfg.model)
    images = torch.rand(3, 3, 56, 56) * 255
    cls_sample = DataSample().set_gt_label(1)
    seg_sample = SegDataSample(
        gt_sem_seg=PixelData(data=torch.randint(0, 2, (1, 56, 56))),
        metainfo=dict(img_shape=(56, 56), pad_shape=(56, 56)))
    det_sample = DetDataSample(metainfo=dict(img_shape=(56, 56),
                                             pad_shape=(56, 56)))
    det_sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[4., 4., 30., 40.]]), labels=torch.tensor([1]))
    losses = model.loss(images, [cls_sample, seg_sample, det_sample])
    assert 'cls.loss' in losses
    assert 'seg.loss_ce' in losses
    assert {'det.loss_cls', 'det.loss_bbox'} <= set(losses)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    total.backward()
    for name in ('cls', 'seg', 'det'):
        grads = [p.grad for p in model.task_heads[name].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # unlabelled batches: distillation losses only
    losses = model.loss(images, [None, None, None])
    assert not any(k.startswith(('cls.', 'seg.', 'det.')) for k in losses)
