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
from kiv.testing.paths import TINY_DISTILL_CFG as TINY_CFG


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


@pytest.mark.slow
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
    # measured every 5th iteration, each measurement with its iteration
    # (the logger repeats a scalar's latest value at every logging step)
    assert _history(trained, 'grad_share_iter').tolist() == [5, 10, 15, 20]
    assert len(_history(trained, 'grad_share/clip')) == 4


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_round_trip_gives_identical_features(trained, distill_workdir):
    from kiv.apis.export import export_student
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


@pytest.mark.slow
def test_inherited_backbone_gives_the_distillers_teacher_space(
        trained, distill_workdir):
    """``kiv.InheritedBackbone`` on an exported student = the distiller's
    own inherited maps (student -> s2t head -> inverse standardisation) of
    the teacher, at the student maps' grids, contiguous; it builds from
    mmdet and mmseg configs and names the file on a bad teacher or level
    list."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS

    from kiv.apis.export import export_student
    from kiv.models import InheritedBackbone, InheritedPathError
    out = osp.join(distill_workdir, 'student_heads.pth')
    export_student(osp.join(trained.work_dir, 'iter_20.pth'), out,
                   keep_heads=True)
    student_cfg = copy.deepcopy(trained.cfg.model.student).to_dict()
    student_cfg['base']['checkpoint'] = None
    student_cfg['init_cfg'] = dict(type='Pretrained', checkpoint=out)
    levels = trained.cfg.model.latent.teachers.detector.student_levels
    cfg = dict(type='kiv.InheritedBackbone', backbone=student_cfg,
               checkpoint=out, teacher='detector', student_levels=levels)
    with DefaultScope.overwrite_default_scope('mmseg'):
        assert isinstance(SEG_MODELS.build(copy.deepcopy(cfg)),
                          InheritedBackbone)
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = DET_MODELS.build(copy.deepcopy(cfg))
    assert isinstance(backbone, InheritedBackbone)
    backbone.init_weights()
    backbone.eval()
    model = trained.model.eval()
    x = torch.rand(2, 3, 56, 70) * 255
    # in a detector the student runs its pyramid only (no summaries)
    assert backbone.backbone.out_type == 'pyramid'
    full = []
    forward_features = backbone.backbone.forward_features
    backbone.backbone.forward_features = \
        lambda *a: full.append(1) or forward_features(*a)
    with torch.no_grad():
        maps = backbone(x)
        assert not full
        student = model.student.forward_features(x)
        sizes = [tuple(student.features[lv].shape[-2:]) for lv in levels]
        ref = model.latent.to_teacher_space(
            model.latent.project(student, 'detector', sizes), 'detector')
        got = backbone.forward_features(x)
    assert len(maps) == len(ref.features) == len(levels)
    for a, b, c in zip(maps, ref.features, got.features):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    assert backbone.out_channels == tuple(m.shape[1] for m in maps)
    torch.testing.assert_close(got.summary, student.summary)
    # the wrapper's paths are fixed; the student is the exported one
    assert not any(p.requires_grad for p in backbone.paths.parameters())
    # layer-wise lr decay: the student's depths under the wrapper's prefix
    block = 'base.model.blocks.0.attn.qkv.weight'
    depth = backbone.backbone.get_layer_depth(f'backbone.{block}',
                                              'backbone.')
    assert depth[0] == 1
    assert backbone.get_layer_depth(f'backbone.backbone.{block}',
                                    'backbone.') == depth
    assert backbone.get_layer_depth('backbone.paths.0.head.fc1.weight',
                                    'backbone.') == (depth[1] - 1, depth[1])
    kwargs = {k: v for k, v in cfg.items() if k != 'type'}
    # a teacher level at another stride (e.g. P6 from the stride-32 map):
    # the s2t head reads the student map at that grid, as in distillation
    halved = InheritedBackbone(**dict(kwargs, scale_factors=[1, 1, 0.5]))
    halved.init_weights()
    halved.eval()
    with torch.no_grad():
        last = halved(x)[-1]
        sizes[-1] = tuple((n + 1) // 2 for n in sizes[-1])
        ref = model.latent.to_teacher_space(
            model.latent.project(student, 'detector', sizes), 'detector')
    assert last.shape[-2:] == sizes[-1] != maps[-1].shape[-2:]
    torch.testing.assert_close(last, ref.features[-1], rtol=1e-5, atol=1e-5)
    # out_indices: only those levels are built and given
    some = InheritedBackbone(**dict(kwargs, out_indices=[0, -1]))
    some.init_weights()
    some.eval()
    assert len(some.paths) == 2 and some.student_levels == (
        levels[0], levels[-1])
    with torch.no_grad():
        got = some(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], maps[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], maps[-1], rtol=1e-5, atol=1e-5)
    assert some.out_channels == (maps[0].shape[1], maps[-1].shape[1])
    with pytest.raises(InheritedPathError, match=r'out_indices=\[3\]'):
        InheritedBackbone(**dict(kwargs, out_indices=[3]))
    with pytest.raises(InheritedPathError, match="'sam'.*'detector'"):
        InheritedBackbone(**dict(kwargs, teacher='sam'))
    with pytest.raises(InheritedPathError, match=r'student_levels=\[0, 1\]'):
        InheritedBackbone(**dict(kwargs, student_levels=[0, 1]))
    with pytest.raises(InheritedPathError, match=r'scale_factors=\[1.0\]'):
        InheritedBackbone(**dict(kwargs, scale_factors=[1]))


@pytest.mark.slow
def test_inherited_heads_are_calibrated_from_the_end_of_distillation(
        trained, distill_workdir):
    """``kiv.InheritedCalibrationHook`` (base runtime) measures the
    inherited outputs after the last step, before that step's checkpoint:
    the checkpoint and a ``--keep-heads`` export carry the statistics, and
    ``kiv.InheritedBackbone(calibrate=True)`` gives the distiller's own
    calibrated path. A file without them is refused, naming it."""
    from kiv.apis.export import export_student
    from kiv.models import InheritedBackbone, InheritedPathError
    assert 'InheritedCalibrationHook' in {
        type(h).__name__ for h in trained.hooks}
    model = trained.model.eval()
    assert model.latent.calibration_ready
    # what the hook sums: the inherited outputs (student -> s2t head ->
    # inverse standardisation), at every teacher's own grids
    batch = torch.rand(3, 3, 56, 70) * 255
    sums = model.calibration_sums(batch)
    student = model.extract_student(batch)
    ref = model.latent.calibration_sums({
        name: model.inherit(batch, name, student)[0]
        for name in model.teachers})
    assert sums.keys() == ref.keys() == set(
        model.latent.calibration_keys())
    for key, value in ref.items():
        torch.testing.assert_close(sums[key], value, rtol=1e-5, atol=1e-4)
    ckpt = osp.join(trained.work_dir, 'iter_20.pth')
    state = safe_torch_load(ckpt)['state_dict']
    for key in model.latent.state_dict():
        if 'calibrations' in key:
            torch.testing.assert_close(state[f'latent.{key}'],
                                       model.latent.state_dict()[key])
    assert int(state['latent.feature_calibrations.detector.0.num_updates'])
    out = osp.join(distill_workdir, 'student_calibrated.pth')
    export_student(ckpt, out, keep_heads=True)
    student_cfg = copy.deepcopy(trained.cfg.model.student).to_dict()
    student_cfg['base']['checkpoint'] = None
    student_cfg['init_cfg'] = dict(type='Pretrained', checkpoint=out)
    levels = trained.cfg.model.latent.teachers.detector.student_levels
    kwargs = dict(backbone=student_cfg, checkpoint=out, teacher='detector',
                  student_levels=levels)
    backbone = InheritedBackbone(**kwargs, calibrate=True)
    backbone.init_weights()
    backbone.eval()
    x = torch.rand(2, 3, 56, 70) * 255
    with torch.no_grad():
        maps = backbone(x)
        student = model.student.forward_features(x)
        sizes = [tuple(student.features[lv].shape[-2:]) for lv in levels]
        pred = model.latent.project(student, 'detector', sizes)
        ref = model.latent.to_teacher_space(pred, 'detector', calibrated=True)
        plain = model.latent.to_teacher_space(pred, 'detector')
    for a, b, c in zip(maps, ref.features, plain.features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, c, rtol=1e-3, atol=1e-3)
    # the same heads without calibration statistics: refused
    exported = safe_torch_load(out)
    exported['inherited_heads'] = {
        k: v for k, v in exported['inherited_heads'].items()
        if 'calibrations' not in k}
    bare = osp.join(distill_workdir, 'student_uncalibrated.pth')
    torch.save(exported, bare)
    with pytest.raises(InheritedPathError,
                       match='student_uncalibrated.pth.*calibration'):
        InheritedBackbone(**dict(kwargs, checkpoint=bare), calibrate=True)
    InheritedBackbone(**dict(kwargs, checkpoint=bare))  # plain: fine


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


@pytest.mark.slow
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


# --------------------------------------------------- real training steps ---
STEPS = 8


def _labelled_batch() -> dict:
    """Three images as the dataloader gives them (uint8 BGR), one labelled
    for each task head: classification, segmentation, detection."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData, PixelData
    from mmpretrain.structures import DataSample
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, 56, 56), generator=gen,
                            dtype=torch.uint8) for _ in range(3)]
    cls_sample = DataSample().set_gt_label(1)
    seg_sample = SegDataSample(
        gt_sem_seg=PixelData(
            data=torch.randint(0, 2, (1, 56, 56), generator=gen)),
        metainfo=dict(img_shape=(56, 56), pad_shape=(56, 56)))
    det_sample = DetDataSample(metainfo=dict(img_shape=(56, 56),
                                             pad_shape=(56, 56)))
    det_sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[4., 4., 30., 40.]]), labels=torch.tensor([1]))
    return dict(inputs=inputs,
                data_samples=[cls_sample, seg_sample, det_sample])


def _task_heads() -> dict:
    return dict(
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


def _fixed_statistics(model, batch: dict) -> None:
    """What StatisticsWarmupHook does before step 0, on ``batch``."""
    data = model.data_preprocessor(batch, False)
    model.load_statistics(model.statistic_sums(data['inputs']))
    assert model.latent.statistics_ready


def _train(model, optim_wrapper, batch: dict, steps: int = STEPS):
    """``steps`` x ``model.train_step``: the logged values of every step
    and, per parameter, whether a non-zero gradient was accumulated into
    it at step 0 and at any step."""
    grads: dict[str, list[bool]] = {}
    handles = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = []

            def hook(param, name=name):
                grads[name].append(bool(param.grad.abs().sum() > 0))

            handles.append(p.register_post_accumulate_grad_hook(hook))
    logs = []
    try:
        for _ in range(steps):
            logs.append({k: float(v) for k, v in
                         model.train_step(batch, optim_wrapper).items()})
    finally:
        for handle in handles:
            handle.remove()
    return logs, grads


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture
def fresh(distill_workdir):
    """The tiny recipe's model with task heads (initialised and statistics
    fixed as the Runner does) and its own optimiser."""
    from mmengine.optim import build_optim_wrapper
    torch.manual_seed(0)
    cfg = Config.fromfile(TINY_CFG)
    cfg.model.task_heads = _task_heads()
    model = MODELS.build(cfg.model)
    model.init_weights()
    batch = _labelled_batch()
    _fixed_statistics(model, batch)
    model.train()
    return model, cfg, batch, build_optim_wrapper


def test_train_steps_train_adapter_heads_and_task_heads_only(fresh):
    """Eight real ``train_step`` s (the tiny recipe's optimiser: AdamW,
    clipping, param-wise decay) on one labelled batch: every trainable
    parameter gets gradients and moves, the purpose-specific teachers' and
    task heads' losses fall, the gates get gradients from the first step,
    and the frozen knowledge base, the teachers and the fixed statistics do
    not change at all."""
    model, cfg, batch, build_optim_wrapper = fresh
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    student = {k: v.detach().clone() for k, v in
               model.student.named_parameters() if v.requires_grad}
    latent = {k: v.detach().clone() for k, v in
              model.latent.named_parameters() if v.requires_grad}
    base, teachers = _state(model.student.base), _state(model.teachers)
    statistics = {k: v for k, v in _state(model.latent).items()
                  if 'standardizer' in k}
    assert student and latent and base and teachers and statistics
    assert not any(p.requires_grad for p in model.student.base.parameters())
    assert all(p.requires_grad for n, p in model.student.named_parameters()
               if not n.startswith('base.'))  # the whole adapter trains
    assert not any(p.requires_grad for p in model.teachers.parameters())

    logs, grads = _train(model, wrapper, batch)

    # the losses the step optimises fall on this batch (the total by a
    # quarter; the purpose-specific teachers' dense losses by several per
    # cent; the summary and task-head losses more slowly: their last
    # layers start near zero)
    def history(key):
        return [round(log[key], 5) for log in logs]

    assert logs[-1]['loss'] < 0.75 * logs[0]['loss'], history('loss')
    for key in ('loss_clip_features', 'loss_detector_features'):
        assert logs[-1][key] < 0.97 * logs[0][key], (key, history(key))
    for key in ('loss_clip_summary', 'cls.loss', 'seg.loss_ce',
                'det.loss_cls', 'det.loss_bbox'):
        assert logs[-1][key] < logs[0][key], (key, history(key))
    # the student starts as the knowledge base: its own losses start at 0
    assert logs[0]['loss_dinov2_summary'] < 1e-6
    assert logs[0]['loss_dinov2_features'] < 1e-6
    # gradients reach the gates from the first step, and every trainable
    # parameter (adapter behind the gates, s2t heads, task heads) after
    gates = [n for n in grads if n.startswith('student.') and (
        n.endswith('.gamma') or 'pyramid_gammas.' in n)]
    assert len([n for n in gates if 'pyramid_gammas.' in n]) == 4
    assert len([n for n in gates if 'injector.gamma' in n]) == 4
    assert [n for n in gates if 'token' in n]  # the summary gate(s)
    no_first = [n for n in gates if not grads[n] or not grads[n][0]]
    assert not no_first, f'no gradient at step 0: {no_first}'
    never = [n for n, g in grads.items() if not any(g)
             and n.startswith(('student.', 'latent.'))]
    assert not never, f'never a gradient: {never}'
    for head in model.task_heads:  # (FCOS: not every level has targets)
        assert any(any(g) for n, g in grads.items()
                   if n.startswith(f'task_heads.{head}.')), head
    # ... and every one of them moved
    params = dict(model.named_parameters())
    still = [n for n, v in student.items()
             if torch.equal(params[f'student.{n}'], v)]
    still += [n for n, v in latent.items()
              if torch.equal(params[f'latent.{n}'], v)]
    assert not still, f'unchanged after {STEPS} steps: {still}'
    # the frozen knowledge base, the teachers and the statistics: untouched
    for before, module in ((base, model.student.base),
                           (teachers, model.teachers)):
        after = module.state_dict()
        assert before.keys() == after.keys()
        changed = [k for k, v in before.items() if not torch.equal(
            after[k], v)]
        assert not changed, changed
    after = model.latent.state_dict()
    assert all(torch.equal(after[k], v) for k, v in statistics.items())


def test_task_heads_read_labelled_samples_only(distill_workdir):
    """Each head's losses come only from the samples carrying its labels;
    an unlabelled batch gives distillation losses only."""
    cfg = Config.fromfile(TINY_CFG)
    cfg.model.task_heads = _task_heads()
    model = MODELS.build(cfg.model)
    batch = _labelled_batch()
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert 'cls.loss' in losses
    assert 'seg.loss_ce' in losses
    assert {'det.loss_cls', 'det.loss_bbox'} <= set(losses)
    losses = model.loss(data['inputs'], [None, None, None])
    assert not any(k.startswith(('cls.', 'seg.', 'det.')) for k in losses)
