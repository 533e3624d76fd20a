"""``tools/demo.py`` end to end at toy size, plus its building blocks
(the package ``kiv_demo`` in ``projects/kiv_demo``, beside kiv)."""
from __future__ import annotations

import glob
import io
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from kiv.testing.paths import REPO


@pytest.fixture(autouse=True)
def _demo_importable(kiv_demo):
    """``kiv_demo`` importable in every test here, as ``tools/demo.py``
    makes it."""


# ------------------------------------------------------------ the world ---
def test_world_scenes_have_consistent_annotations():
    from kiv_demo.world import CLASSES, WorldConfig, _Backgrounds, draw_scene
    rng = np.random.default_rng(0)
    cfg = WorldConfig(size=48)
    backgrounds = _Backgrounds()
    for _ in range(20):
        scene = draw_scene(rng, cfg, backgrounds)
        assert scene.image.shape == (48, 48, 3)
        assert scene.image.dtype == np.uint8
        assert len(scene.labels) == len(scene.masks) == len(scene.boxes) > 0
        union = np.zeros((48, 48), bool)
        for cls, mask, (x, y, w, h) in zip(scene.labels, scene.masks,
                                           scene.boxes):
            assert 0 <= cls < len(CLASSES)
            assert mask.sum() >= cfg.min_area
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - x + 1,
                                    ys.max() - y + 1)
            assert (scene.semantic[mask > 0] == cls + 1).all()
            assert not (union & (mask > 0)).any(), 'visible masks overlap'
            union |= mask > 0
        assert (scene.semantic[~union] == 0).all()
        areas = [m.sum() for m in scene.masks]
        assert scene.label == scene.labels[int(np.argmax(areas))]


def test_world_layouts_are_read_by_the_toolboxes(tmp_path):
    from mmdet.datasets import CocoDataset
    from mmpretrain.datasets import ImageNet
    from mmseg.datasets import BaseSegDataset

    from kiv_demo.world import CLASSES, WorldConfig, write_world
    write_world(str(tmp_path), WorldConfig(num_train=6, num_val=3), seed=1)
    meta = dict(classes=CLASSES)
    coco = CocoDataset(data_root=str(tmp_path / 'coco'), metainfo=meta,
                       ann_file='annotations/instances_val2017.json',
                       data_prefix=dict(img='val2017/'), pipeline=[])
    assert len(coco) == 3
    seg = BaseSegDataset(
        data_root=str(tmp_path / 'ade' / 'ADEChallengeData2016'),
        metainfo=meta, img_suffix='.jpg', seg_map_suffix='.png',
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'))
    assert len(seg) == 3
    cls = ImageNet(data_root=str(tmp_path / 'imagenet'), metainfo=meta,
                   ann_file='meta/train.txt', data_prefix='train')
    labels = cls.get_gt_labels()
    assert len(cls) == 6 and ((labels >= 0) & (labels < len(CLASSES))).all()


def test_world_classification_only_validation_scenes(tmp_path, monkeypatch):
    """``num_val_cls`` lengthens only the ImageNet layout's val split: its
    first ``num_val`` images are the COCO / ADE20K validation scenes, and
    every other split is the one drawn without them (they are drawn
    last), so the same seed gives the same scenes everywhere else."""
    from mmpretrain.datasets import ImageNet

    from kiv_demo.world import (CLASSES, WorldConfig, world_cls_images,
                                world_cls_only_images, world_images,
                                world_labels, write_world)
    base = dict(num_train=3, num_val=2, num_teachers=3, num_unlabelled=2)
    plain, extra = str(tmp_path / 'plain'), str(tmp_path / 'extra')
    write_world(plain, WorldConfig(**base), seed=4)
    summary = write_world(extra, WorldConfig(**base, num_val_cls=5), seed=4)
    assert summary['splits']['val']['images'] == 2
    assert summary['splits']['val']['cls_images'] == 7
    assert sum(summary['splits']['val']['image_labels']) == 7

    def read(path):
        with open(path, 'rb') as f:
            return f.read()

    # every file of the world without them is in the world with them,
    # byte for byte, except ImageNet's val meta file (5 more lines)
    for root, _, files in os.walk(plain):
        for name in files:
            rel = osp.relpath(osp.join(root, name), plain)
            if rel in ('imagenet/meta/val.txt', 'world.json'):
                continue
            assert read(osp.join(plain, rel)) == read(osp.join(extra, rel))
    with open(osp.join(plain, 'imagenet/meta/val.txt')) as f:
        first = f.read()
    with open(osp.join(extra, 'imagenet/meta/val.txt')) as f:
        lines = f.read()
    assert lines.startswith(first) and lines.count('\n') == 7
    paths = world_cls_images(extra, 'val')
    assert len(paths) == 7 and len(world_images(extra, 'val')) == 2
    assert [read(p) for p in paths[:2]] == \
        [read(p) for p in world_images(extra, 'val')]
    assert len({read(p) for p in paths}) == 7  # 5 new scenes
    assert world_cls_only_images(extra) == paths[2:]
    assert world_cls_only_images(plain) == []
    cls = ImageNet(data_root=osp.join(extra, 'imagenet'),
                   metainfo=dict(classes=CLASSES), ann_file='meta/val.txt',
                   data_prefix='val')
    assert len(cls) == 7
    os.rename(extra, tmp_path / 'world')
    monkeypatch.chdir(tmp_path)
    assert world_labels('world', 'val') == cls.get_gt_labels().tolist()


def test_world_teachers_split_and_unlabelled_scenes(tmp_path):
    """The teachers' split is a third labelled split in every layout, the
    unlabelled scenes have images only, and every split has its own
    scenes."""
    import hashlib

    from mmdet.datasets import CocoDataset
    from mmseg.datasets import BaseSegDataset

    from kiv_demo.transforms import WorldViewLabels
    from kiv_demo.world import CLASSES, WorldConfig, write_world
    summary = write_world(str(tmp_path), WorldConfig(
        num_train=3, num_val=2, num_teachers=5, num_unlabelled=4), seed=2)
    assert summary['splits']['teachers']['images'] == 5
    assert summary['splits']['unlabelled'] == dict(images=4)
    meta = dict(classes=CLASSES)
    coco = CocoDataset(data_root=str(tmp_path / 'coco'), metainfo=meta,
                       ann_file='annotations/instances_teachers2017.json',
                       data_prefix=dict(img='teachers2017/'), pipeline=[])
    assert len(coco) == 5
    seg = BaseSegDataset(
        data_root=str(tmp_path / 'ade' / 'ADEChallengeData2016'),
        metainfo=meta, img_suffix='.jpg', seg_map_suffix='.png',
        data_prefix=dict(img_path='images/teachers',
                         seg_map_path='annotations/teachers'))
    assert len(seg) == 5
    assert len(os.listdir(tmp_path / 'imagenet' / 'teachers')) > 0
    unlabelled = sorted((tmp_path / 'unlabelled').iterdir())
    assert len(unlabelled) == 4
    assert all(WorldViewLabels.label_path(str(p)) is None
               for p in unlabelled)
    teachers = sorted((tmp_path / 'coco' / 'teachers2017').iterdir())
    assert all(osp.isfile(WorldViewLabels.label_path(str(p)))
               for p in teachers)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in
               unlabelled + teachers +
               sorted((tmp_path / 'coco' / 'train2017').iterdir())]
    assert len(set(digests)) == len(digests), 'splits share a scene'


def test_labelled_share_sampler_fixes_labelled_views_per_batch(tmp_path):
    """Every batch holds exactly ``labelled_per_batch`` labelled views, the
    labelled pool is cycled evenly, the stream repeats with its seed and
    ranks take disjoint batches of it."""
    from kiv_demo.samplers import LabelledShareSampler
    from kiv_demo.world import WorldConfig, write_world
    write_world(str(tmp_path), WorldConfig(num_train=3, num_val=1,
                                           num_unlabelled=5), seed=0)
    paths = [str(p) for p in sorted((tmp_path / 'unlabelled').iterdir())]
    paths += [str(p) for p in
              sorted((tmp_path / 'coco' / 'train2017').iterdir())]

    class Views:  # two views per image, image-major like the cache
        def __len__(self):
            return 2 * len(paths)

        def sample_info(self, idx):
            return dict(img_path=paths[idx // 2])

    labelled = set(range(10, 16))
    sampler = LabelledShareSampler(Views(), batch_size=4,
                                   labelled_per_batch=3, seed=7)
    assert set(sampler.labelled.tolist()) == labelled
    it = iter(sampler)
    stream = [next(it) for _ in range(4 * 12)]
    batches = [stream[i:i + 4] for i in range(0, len(stream), 4)]
    assert all(sum(i in labelled for i in b) == 3 for b in batches)
    lab = [i for i in stream if i in labelled]
    for k in range(0, len(lab), 6):  # every pass sees each labelled view
        assert sorted(lab[k:k + 6]) == sorted(labelled)
    again = iter(LabelledShareSampler(Views(), 4, 3, seed=7))
    assert [next(again) for _ in range(len(stream))] == stream
    other = iter(LabelledShareSampler(Views(), 4, 3, seed=8))
    assert [next(other) for _ in range(len(stream))] != stream
    with pytest.raises(ValueError, match='labelled_per_batch'):
        LabelledShareSampler(Views(), 4, 5, seed=0)


def test_world_labels_follow_the_view(tmp_path):
    """A crop + flip of a scene: the packed instances, semantic map and
    image label are those of the same crop + flip of the label map."""
    import cv2

    from kiv.datasets.teacher_cache import ReplayView, ViewParams
    from kiv.registry import TRANSFORMS
    from kiv_demo.transforms import SEG_IGNORE
    from kiv_demo.world import WorldConfig, label_map_path, write_world
    write_world(str(tmp_path), WorldConfig(num_train=4, num_val=1), seed=3)
    img_path = str(tmp_path / 'coco' / 'train2017' / '000000000002.jpg')
    view = TRANSFORMS.build(dict(type='kiv.ReplayView', scale=64,
                                 crop_ratio_range=(0.4, 1.0), flip_prob=1))
    labels_tf = TRANSFORMS.build(dict(type='kiv_demo.WorldViewLabels',
                                      min_area=1))
    pack = TRANSFORMS.build(dict(type='kiv_demo.PackWorldInputs'))
    params = ViewParams((8, 4, 40, 48), True, (64, 64))
    img = cv2.imread(img_path)
    results = view(dict(img=img, img_path=img_path,
                        view_params=params.to_dict()))
    packed = pack(labels_tf(results))
    sample = packed['data_samples']
    raw = cv2.imread(label_map_path(str(tmp_path), 'train', 2),
                     cv2.IMREAD_UNCHANGED)
    expect = ReplayView(64, interpolation='nearest').apply(
        raw, ViewParams((8, 4, 40, 48), True, (64, 64)))
    semantic = expect[..., 1].astype(int) - 1
    semantic[expect[..., 1] == 0] = SEG_IGNORE
    assert torch.equal(sample.gt_sem_seg.data[0], torch.from_numpy(semantic))
    inst = sample.gt_instances
    ids = [i for i in np.unique(expect[..., 0]) if i > 0]
    assert len(inst) == len(ids) > 0
    areas = [int(m.sum()) for m in inst.masks.masks]
    for box, mask in zip(inst.bboxes, inst.masks.masks):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1,
                                ys.max() + 1]
    assert int(sample.gt_label) == int(inst.labels[int(np.argmax(areas))])
    assert packed['inputs'].shape == (3, 64, 64)
    # a photo (no label map) stays unlabelled
    photo = dict(img=img, img_path=str(tmp_path / 'photo.jpg'))
    unlabelled = pack(labels_tf(view(photo)))['data_samples']
    assert 'gt_instances' not in unlabelled and 'gt_label' not in unlabelled


# -------------------------------------------------------- the plain ViT ---
def test_plain_vit_student_pyramid_and_toolbox_outputs():
    from kiv.registry import MODELS
    base = dict(type='timm', model_name='vit_small_patch14_reg4_dinov2',
                model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2))
    student = MODELS.build(dict(type='kiv_demo.PlainViTStudent', base=base))
    out = student.forward_features(torch.randn(2, 3, 64, 48))
    assert out.summary.shape == (2, 32)
    assert [tuple(f.shape[-2:]) for f in out.features] == [
        (16, 12), (8, 6), (4, 3), (2, 2)]
    out.summary.sum().backward()
    assert student.base.model.cls_token.grad is not None
    frozen = MODELS.build(dict(type='kiv_demo.PlainViTStudent', base=base,
                               frozen=True, out_type='global'))
    frozen.train()
    assert not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    (summary, ) = frozen(torch.randn(1, 3, 30, 32))  # any size: padded
    assert summary.shape == (1, 32)


# ------------------------------------------------------ task heads ---
def _det_sample(h=32, w=32):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData, PixelData
    s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                    scale_factor=(1.0, 1.0)))
    mask = np.zeros((1, h, w), np.uint8)
    mask[0, 4:20, 6:22] = 1
    s.gt_instances = InstanceData(
        bboxes=torch.tensor([[6., 4., 22., 20.]]),
        labels=torch.tensor([2]), masks=BitmapMasks(mask, h, w))
    seg = torch.full((1, h, w), 255, dtype=torch.long)
    seg[0, 4:20, 6:22] = 2
    s.gt_sem_seg = PixelData(data=seg)
    s.set_field(torch.tensor([2]), 'gt_label')
    return s


@pytest.mark.slow
def test_multitask_model_trains_every_head_from_the_probe_configs():
    """The rivals' model: one backbone, the demo's cls / Mask R-CNN /
    Semantic FPN heads (built from the probe configs), finite losses and
    gradients into the backbone; unlabelled samples feed no head."""
    from kiv.registry import MODELS
    from kiv_demo.recipes import _task_models, load_cfg
    cfg = load_cfg('rival')
    backbone = cfg.model.backbone.to_dict()
    backbone['base']['model_kwargs'].update(depth=4)
    backbone['interaction_indexes'] = [[0, 0], [1, 1], [2, 2], [3, 3]]
    model = MODELS.build(dict(type='kiv_demo.MultiTaskModel',
                              backbone=backbone, tasks=_task_models(cfg)))
    model.init_weights()
    from mmdet.structures import DetDataSample
    samples = [_det_sample(), _det_sample(),
               DetDataSample(metainfo=dict(img_shape=(32, 32)))]
    data = model.data_preprocessor(
        dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
                     for _ in samples], data_samples=samples), True)
    losses = model(**data, mode='loss')
    tasks = {k.split('.')[0] for k in losses}
    assert tasks == {'cls', 'det', 'seg'}
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.base.model.blocks[0].attn.qkv.weight.grad is not None


def test_adapter_gates_get_the_same_fast_lr_on_both_sides():
    """The adapter's zero-initialised gates (injector / global-token /
    summary-token ``gamma`` s, pyramid gates) train at 10x the learning
    rate without decay, in the inherited student's and the rivals'
    optimizer alike; every other weight keeps the base lr. No weight decay
    on the gates, the ViT's LayerScale ``gamma`` s, norms, biases, other
    1-d parameters, the level embedding, position embedding and tokens,
    the attention pools' latent queries and the knowledge base's preserved
    skip paths; the base decay on every other weight. At the base lr the
    gates ended the demo's inheritance run at ~0.02, so the adapter added
    ~2 % to the frozen knowledge base's maps."""
    from mmengine.optim import build_optim_wrapper
    from torch.nn.modules.batchnorm import _BatchNorm

    from kiv.registry import MODELS
    from kiv_demo.recipes import load_cfg
    inherit, rival = load_cfg('inherit'), load_cfg('rival')
    assert inherit.optim_wrapper.paramwise_cfg == \
        rival.optim_wrapper.paramwise_cfg
    base_lr = rival.optim_wrapper.optimizer.lr
    decay = rival.optim_wrapper.optimizer.weight_decay
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, _BatchNorm)
    seen = set()
    for cfg in (rival, inherit):
        backbone = (cfg.model.backbone if cfg is rival else
                    cfg.model.student).to_dict()
        backbone['base']['model_kwargs'].update(depth=4)
        backbone['base']['checkpoint'] = None
        backbone['interaction_indexes'] = [[0, 0], [1, 1], [2, 2], [3, 3]]
        student = MODELS.build(backbone)
        # the rivals train their ViT
        if cfg is rival:
            assert not student.freeze_base
        model = torch.nn.ModuleDict(dict(student=student))
        # a preserved s2t head as the inherited student's latent space has
        model['latent'] = torch.nn.ModuleDict(dict(
            summary_heads=torch.nn.ModuleDict(dict(kb=torch.nn.ModuleDict(
                dict(fc1=torch.nn.Linear(4, 4),
                     skip=torch.nn.Linear(4, 4)))))))
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        owner = {id(p): m for m in model.modules()
                 for p in m.parameters(recurse=False)}
        names = {id(p): n for n, p in model.named_parameters()}
        grouped = set()
        for group in wrapper.optimizer.param_groups:
            for p in group['params']:
                name = names[id(p)]
                grouped.add(name)
                gate = 'pyramid_gammas' in name or (
                    name.endswith('.gamma') and '.ls' not in name
                    and not name.startswith('student.base.'))
                no_decay = gate or name.endswith((
                    '.gamma', '.bias', 'level_embed', 'pool.latent',
                    '.pos_embed', '.cls_token', '.reg_token')) \
                    or '.skip.' in name or p.ndim == 1 \
                    or isinstance(owner[id(p)], norms)
                assert group['lr'] == pytest.approx(
                    base_lr * (10 if gate else 1)), name
                assert group['weight_decay'] == pytest.approx(
                    0 if no_decay else decay), name
                seen.add('gate' if gate else 'ls' if '.ls' in name
                         else 'skip' if '.skip.' in name
                         else 'latent' if name.endswith('pool.latent')
                         else 'no_decay' if no_decay else 'decay')
        assert grouped == {n for n, p in model.named_parameters()
                           if p.requires_grad}
    assert seen == {'gate', 'ls', 'skip', 'latent', 'no_decay', 'decay'}


# ------------------------------------------------------------ probes ---
def test_logistic_and_knn_probes_choose_on_train_only():
    from kiv_demo.probes import cls_probe
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=g)
    val_y = torch.arange(60) % 3
    val_x = centres[val_y] + torch.randn(60, 16, generator=g)
    out = cls_probe(x, y, val_x, 3)
    for key in ('logreg_pred', 'knn_pred'):
        acc = (torch.tensor(out[key]) == val_y).float().mean()
        assert acc > 0.95, (key, acc)
    assert out['weight_decay'] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def test_probe_choices_are_cross_validated_on_every_training_image():
    """The L2 penalty and k are chosen by the accuracy of a 5-fold
    cross-validation (every training image held out once), not on one
    20 % hold-out (32 of the user's 160 scenes)."""
    from kiv_demo.probes import (CV_FOLDS, DECAYS, _folds, _standardise,
                                 cls_probe, knn_predict, logistic_path,
                                 logistic_predict)
    folds = _folds(23, CV_FOLDS, seed=0)
    held = torch.cat([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(23))
    for fit, hold in folds:
        assert not set(fit.tolist()) & set(hold.tolist())
        assert len(fit) + len(hold) == 23
    g = torch.Generator().manual_seed(2)
    y = torch.arange(90) % 3
    x = torch.randn(3, 12, generator=g)[y] + \
        2 * torch.randn(90, 12, generator=g)
    out = cls_probe(x, y, x[:10], 3, seed=0)
    logreg = dict.fromkeys(DECAYS, 0)
    knn = dict.fromkeys((1, 5, 10, 20, 50), 0)
    for fit, hold in _folds(90, CV_FOLDS, seed=0):
        xs = _standardise(x[fit], x[hold])
        for wd, w in logistic_path(xs[0], y[fit], 3, DECAYS).items():
            pred = logistic_predict(w, xs[1]).argmax(1)
            logreg[wd] += int((pred == y[hold]).sum())
        for k in knn:
            pred = knn_predict(x[fit], y[fit], x[hold], 3, k).argmax(1)
            knn[k] += int((pred == y[hold]).sum())
    assert out['cv_logreg'] == {str(d): c / 90 for d, c in logreg.items()}
    assert out['cv_knn'] == {str(k): c / 90 for k, c in knn.items()}
    assert out['weight_decay'] == max(DECAYS, key=lambda d: (logreg[d], d))
    assert out['k'] == max(knn, key=lambda k: (knn[k], -k))


def test_logistic_path_warm_starts_to_the_converged_solutions(monkeypatch):
    """The regularisation path reaches every penalty's optimum (no entry of
    the penalised gradient above ``GRAD_TOL``, the cold start's solution)
    in fewer loss evaluations than cold starts: each fit starts from the
    previous, stronger penalty's solution."""
    from kiv_demo import probes
    g = torch.Generator().manual_seed(3)
    y = torch.arange(120) % 3
    x = torch.randn(3, 100, generator=g)[y] + \
        2 * torch.randn(120, 100, generator=g)
    (xs, ) = probes._standardise(x)
    evals = [0]
    cross_entropy = probes.F.cross_entropy

    def counted(*args, **kwargs):
        evals[0] += 1
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(probes.F, 'cross_entropy', counted)
    path = probes.logistic_path(xs, y, 3, probes.DECAYS)
    warm = evals[0]
    evals[0] = 0
    cold = {wd: probes.fit_logistic(xs, y, 3, wd) for wd in probes.DECAYS}
    assert list(path) == list(probes.DECAYS)
    assert warm < evals[0], (warm, evals[0])
    x1 = torch.cat([xs.double(), torch.ones(120, 1).double()], 1)

    def objective(w: torch.Tensor, wd: float) -> torch.Tensor:
        return cross_entropy(x1 @ w, y) + 0.5 * wd * w[:-1].pow(2).sum()

    for wd, w in path.items():
        w = w.clone().requires_grad_(True)
        objective(w, wd).backward()
        assert w.grad.abs().max() <= probes.GRAD_TOL, wd
        # the same optimum (a flat one at weak penalties: the weights may
        # differ where the objective does not)
        assert abs(objective(w, wd) - objective(cold[wd], wd)) < 1e-6, wd
        assert torch.equal((x1 @ w).argmax(1), (x1 @ cold[wd]).argmax(1))


def test_linear_classifier_is_the_standardised_logistic_regression():
    """The folded ``(weight, bias)`` on raw features give the logits of the
    logistic regression fitted on standardised features."""
    from kiv_demo.probes import (_standardise, fit_linear_classifier,
                                 fit_logistic, logistic_predict)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(120) % 3
    x = torch.randn(3, 8, generator=g)[y] * 2 + \
        torch.randn(120, 8, generator=g) + torch.linspace(-5, 50, 8)
    out = fit_linear_classifier(x, y, 3, seed=0)
    assert out['weight'].shape == (3, 8) and out['bias'].shape == (3, )
    (xs, ) = _standardise(x)
    ref = logistic_predict(fit_logistic(xs, y, 3, out['weight_decay']), xs)
    got = x @ out['weight'].T + out['bias']
    assert torch.allclose(got.double(), ref, atol=1e-3)
    assert (got.argmax(1) == y).float().mean() > 0.9


def test_segmentation_against_ground_truth_maps(tmp_path):
    """Logits resized to the label map and scored like mmseg: background
    (raw 0) ignored, a perfect prediction is 100 mIoU, a half-wrong one
    the exact IoUs."""
    import cv2

    from kiv_demo.agreement import seg_vs_ground_truth
    raw = np.zeros((8, 8), np.uint8)
    raw[:, :4] = 1  # class 0
    raw[:, 4:6] = 2  # class 1, then background
    path = str(tmp_path / 'gt.png')
    cv2.imwrite(path, raw)
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0, :, :2] = 5  # class 0 on the left half
    logits[0, 1, :, 2:] = 5  # class 1 on the right half
    out = seg_vs_ground_truth(logits, [path], str(tmp_path / 'a.npz'))
    assert out['miou'][0] == pytest.approx(100.0)
    logits[0, 1, :, 2:] = 0
    logits[0, 0, :, 2:] = 5  # everything class 0
    out = seg_vs_ground_truth(logits, [path], str(tmp_path / 'b.npz'))
    # class 0: 32 / 48 pixels, class 1: 0 / 16
    assert out['miou'][0] == pytest.approx(100 * (32 / 48 + 0) / 2)


def test_detections_to_coco_keep_masks():
    """Inherited detections become COCO results with RLE masks that decode
    to the predicted masks."""
    from mmengine.structures import InstanceData
    from pycocotools import mask as mask_utils

    from kiv_demo.agreement import _to_coco
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 8:, 8:] = True
    res = InstanceData(bboxes=torch.tensor([[3., 2., 9., 6.],
                                            [8., 8., 16., 16.]]),
                       labels=torch.tensor([0, 4]),
                       scores=torch.tensor([0.9, 0.2]), masks=masks)
    out = _to_coco([res], [7], masks=True)
    assert [o['category_id'] for o in out] == [1, 5]
    assert out[0]['bbox'] == [3.0, 2.0, 6.0, 4.0]
    for o, m in zip(out, masks):
        rle = dict(o['segmentation'], counts=o['segmentation']['counts']
                   .encode('ascii'))
        assert (mask_utils.decode(rle) == m.numpy()).all()


def _exact_bootstrap_means(scores) -> np.ndarray:
    """Every one of the ``n ** n`` equally likely resamples' means."""
    import itertools
    s = np.asarray(scores, np.float64)
    return np.array([s[list(idx)].mean() for idx in
                     itertools.product(range(len(s)), repeat=len(s))])


def test_bootstrap_ci_is_the_percentile_bootstrap():
    """``bootstrap_ci`` on a known vector = the 2.5 / 97.5 % quantiles of
    the exact bootstrap distribution of the mean (all ``n ** n``
    resamples enumerated), up to Monte-Carlo error."""
    from kiv_demo.probes import bootstrap_ci
    scores = [0.0, 10.0, 40.0, 100.0, 100.0]
    exact = _exact_bootstrap_means(scores)  # 3125 resamples
    v, lo, hi = bootstrap_ci(scores, num=40000, seed=5)
    assert v == pytest.approx(50.0)
    # the sampled 2.5 % quantile lies between the exact 1.5 % and 3.5 %
    # quantiles (Monte-Carlo sd of the level: ~0.001)
    for got, q in ((lo, 0.025), (hi, 0.975)):
        low = np.quantile(exact, q - 0.01, method='lower')
        high = np.quantile(exact, q + 0.01, method='higher')
        assert low <= got <= high, (q, got, low, high)
    # the same seed gives the same interval; the level is honoured
    assert bootstrap_ci(scores, num=40000, seed=5) == (v, lo, hi)
    _, lo50, hi50 = bootstrap_ci(scores, num=40000, seed=5, level=0.5)
    assert lo < lo50 < v < hi50 < hi
    assert lo50 == pytest.approx(np.quantile(exact, 0.25), abs=2.0)


@pytest.mark.parametrize('n', [50, 200, 800])
def test_bootstrap_ci_of_a_rate_is_the_binomial_interval(n):
    """For 0/100 scores (correct or not) the bootstrap distribution of the
    mean is 100 x Binomial(n, p) / n: the interval's ends are its
    quantiles, and widths shrink as 1 / sqrt(n)."""
    from scipy.stats import binom
    from kiv_demo.probes import bootstrap_ci
    p = 0.3
    k = int(round(p * n))
    scores = [100.0] * k + [0.0] * (n - k)
    v, lo, hi = bootstrap_ci(scores, num=20000, seed=n)
    assert v == pytest.approx(100 * k / n)
    for got, q in ((lo, 0.025), (hi, 0.975)):
        bracket = [100 * binom.ppf(q + d, n, k / n) / n for d in (-.01, .01)]
        assert bracket[0] <= got <= bracket[1], (q, got, bracket)
    normal = 2 * 1.96 * 100 * np.sqrt(p * (1 - p) / n)
    assert hi - lo == pytest.approx(normal, rel=0.2)


def test_trivial_agreements_are_the_majority_shares():
    """The image-blind rows of the inherited-head table: always the
    teacher's most frequent class (top-5: its five most frequent) agrees on
    exactly that class's share; the head on the mean summary on the share
    of its own arg-max class."""
    from kiv_demo.agreement import trivial_cls_agreement
    counts = {3: 6, 1: 5, 0: 4, 7: 3, 2: 2, 5: 1}  # 21 images, 10 classes
    labels = [c for c, k in counts.items() for _ in range(k)]
    ref = torch.nn.functional.one_hot(torch.tensor(labels), 10).float()
    ref = ref + 0.01 * torch.rand(ref.shape, generator=torch.Generator()
                                  .manual_seed(0))
    mean_logits = torch.zeros(10)
    mean_logits[1] = 1.0
    out = trivial_cls_agreement(ref, mean_logits, seed=0)
    n = len(labels)
    assert out['majority']['n'] == n
    assert out['majority']['top1'][0] == pytest.approx(100 * 6 / n)
    assert out['majority']['top5'][0] == pytest.approx(100 * 20 / n)
    assert out['mean']['top1'][0] == pytest.approx(100 * 5 / n)
    for row in out.values():
        for key in ('top1', 'top5'):
            v, lo, hi = row[key]
            assert lo <= v <= hi


def _coco_toy(n: int = 20, seed: int = 0) -> tuple[list, list, list]:
    """Images, annotations and detections (3 categories, boxes jittered
    from the ground truth, one spurious detection per image)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n + 1):
        images.append(dict(id=i, width=64, height=64))
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 40, 2)
            w, h = rng.uniform(8, 24, 2)
            c = int(rng.integers(1, 4))
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=c,
                             bbox=[x, y, w, h], area=w * h, iscrowd=0))
            if rng.random() < 0.8:
                jit = rng.normal(0, 3, 4)
                dets.append(dict(image_id=i, category_id=c,
                                 bbox=[x + jit[0], y + jit[1], w + jit[2],
                                       h + jit[3]],
                                 score=float(rng.random())))
        dets.append(dict(image_id=i, category_id=int(rng.integers(1, 4)),
                         bbox=[1, 1, 10, 10], score=float(rng.random())))
    return images, anns, dets


def test_coco_bootstrap_point_equals_pycocotools(tmp_path):
    """The re-accumulated AP of the identity resample is pycocotools'."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kiv_demo.probes import coco_bootstrap
    images, anns, dets = _coco_toy()
    gt_file, res_file = str(tmp_path / 'gt.json'), str(tmp_path / 'r.json')
    json.dump(dict(images=images, annotations=anns,
                   categories=[dict(id=k, name=str(k)) for k in (1, 2, 3)]),
              open(gt_file, 'w'))
    json.dump(dets, open(res_file, 'w'))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ev = COCOeval(gt, gt.loadRes(res_file), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, lo, hi = coco_bootstrap(gt_file, res_file, 'bbox', num=200)
    assert ap == pytest.approx(ev.stats[0] * 100, abs=1e-6)
    assert lo <= ap <= hi


def test_coco_bootstrap_resamples_are_pycocotools_on_the_multiset(tmp_path):
    """Each resample's AP (weighted re-accumulation) is what pycocotools
    gives on the multiset written out: every drawn copy of an image a new
    image with its annotations and detections."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kiv_demo.probes import _coco_ap
    images, anns, dets = _coco_toy(30, seed=1)
    cats = [dict(id=k, name=str(k)) for k in (1, 2, 3)]
    gt_file, res_file = str(tmp_path / 'gt.json'), str(tmp_path / 'r.json')
    json.dump(dict(images=images, annotations=anns, categories=cats),
              open(gt_file, 'w'))
    json.dump(dets, open(res_file, 'w'))

    def evaluate(gt_path, res_path):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(gt_path)
            ev = COCOeval(gt, gt.loadRes(res_path), 'bbox')
            ev.evaluate()
        return ev

    ev = evaluate(gt_file, res_file)
    p = ev.params
    draws = np.random.default_rng(3).integers(0, len(images), (5, 30))
    counts = np.stack([np.bincount(d, minlength=len(images)) for d in draws])
    got = _coco_ap(ev.evalImgs, len(p.catIds), len(p.imgIds),
                   len(p.areaRng), counts, p.iouThrs, p.recThrs,
                   p.maxDets[-1], chunk=3)  # two blocks of multisets
    for r, draw in enumerate(draws):
        m_images, m_anns, m_dets = [], [], []
        for new_id, idx in enumerate(draw, 1):
            old_id = images[idx]['id']
            m_images.append(dict(images[idx], id=new_id))
            m_anns += [dict(a, id=len(m_anns) + j + 1, image_id=new_id)
                       for j, a in enumerate(
                           [a for a in anns if a['image_id'] == old_id])]
            m_dets += [dict(d, image_id=new_id) for d in dets
                       if d['image_id'] == old_id]
        m_gt, m_res = (str(tmp_path / f'gt{r}.json'),
                       str(tmp_path / f'r{r}.json'))
        json.dump(dict(images=m_images, annotations=m_anns, categories=cats),
                  open(m_gt, 'w'))
        json.dump(m_dets, open(m_res, 'w'))
        ref = evaluate(m_gt, m_res)
        with contextlib.redirect_stdout(io.StringIO()):
            ref.accumulate()
            ref.summarize()
        assert got[r] == pytest.approx(ref.stats[0], abs=1e-9)


def test_miou_bootstrap_matches_the_total_areas(tmp_path):
    from kiv_demo.probes import miou_bootstrap
    rng = np.random.default_rng(0)
    inter = rng.integers(0, 50, (40, 4)).astype(float)
    union = inter + rng.integers(0, 50, (40, 4))
    np.savez(tmp_path / 's.npz', intersect=inter, union=union, pred=union,
             label=union)
    v, lo, hi = miou_bootstrap(str(tmp_path / 's.npz'), num=200)
    assert v == pytest.approx(100 * np.mean(inter.sum(0) / union.sum(0)))
    assert lo < v < hi
    # 4x the images with the same areas: same mIoU, half the width
    np.savez(tmp_path / 'x4.npz', intersect=np.tile(inter, (4, 1)),
             union=np.tile(union, (4, 1)), pred=union, label=union)
    v4, lo4, hi4 = miou_bootstrap(str(tmp_path / 'x4.npz'), num=2000)
    _, lo1, hi1 = miou_bootstrap(str(tmp_path / 's.npz'), num=2000)
    assert v4 == pytest.approx(v)
    assert (hi4 - lo4) / (hi1 - lo1) == pytest.approx(0.5, abs=0.1)
    # identical images: no spread at all
    np.savez(tmp_path / 'same.npz', intersect=np.tile(inter[:1], (40, 1)),
             union=np.tile(union[:1], (40, 1)), pred=union, label=union)
    v, lo, hi = miou_bootstrap(str(tmp_path / 'same.npz'), num=200)
    assert lo == pytest.approx(v) and hi == pytest.approx(v)


# ---------------------------------------------------------------- stages ---
def test_stage_cache_reuses_and_invalidates_dependents(tmp_path):
    from kiv_demo.stages import (Stage, expected_seconds, read_timings,
                                 run_stages)
    calls = []

    def make(name):
        def run(ctx):
            calls.append(name)
            with open(osp.join(ctx.dir, 'out.txt'), 'w') as f:
                f.write(name)
            return dict(value=len(calls))
        return run

    def stages(a_param):
        return [Stage('a', 'first', make('a'), params=dict(p=a_param),
                      cost=123.0),
                Stage('b', 'second', make('b'), deps=('a', )),
                Stage('c', 'independent', make('c'))]

    out = io.StringIO()
    run_stages(stages(1), str(tmp_path), seed=0, stream=out)
    assert calls == ['a', 'b', 'c']
    assert '[1/3] a: first (running)' in out.getvalue()
    assert 'ETA' in out.getvalue()
    # the ETA of a re-run uses the measured time, not the estimate
    timings = read_timings(str(tmp_path))
    assert set(timings) == {'a', 'b', 'c'}
    assert expected_seconds(stages(1)[0], timings) < 123.0
    assert expected_seconds(stages(2)[0], timings) == 123.0
    res = run_stages(stages(1), str(tmp_path), seed=0, stream=io.StringIO())
    assert calls == ['a', 'b', 'c'], 'finished stages must be reused'
    assert res['a'] == dict(value=1)
    run_stages(stages(2), str(tmp_path), seed=0, stream=io.StringIO())
    assert calls[3:] == ['a', 'b'], 'a param change re-runs dependents only'
    run_stages(stages(2), str(tmp_path), seed=1, stream=io.StringIO())
    assert calls[5:] == ['a', 'b', 'c'], 'a seed change re-runs everything'
    # a stage that died before its marker is run again
    (tmp_path / 'c' / 'done').unlink()
    run_stages(stages(2), str(tmp_path), seed=1, stream=io.StringIO())
    assert calls[8:] == ['c']


def _run_toy_stage(tmp_path) -> tuple:
    """Train and test mmengine's toy model with ``run_runner`` in a stage
    dir; returns ``(stage dir, metrics, the metric tags seen)``."""
    from mmengine.config import Config
    from mmengine.evaluator import BaseMetric
    from mmengine.registry import DATASETS, METRICS, MODELS
    from mmengine.testing.runner_test_case import ToyDataset, ToyModel

    from kiv_demo.recipes import run_runner
    from kiv_demo.stages import Stage, StageContext, working_dir
    seen = []

    class CountingMetric(BaseMetric):
        def __init__(self, tag: str, **kwargs):
            super().__init__(**kwargs)
            self.tag = tag

        def process(self, data_batch, predictions):
            seen.append(self.tag)
            self.results.append(1)

        def compute_metrics(self, results):
            return dict(n=float(len(results)))

    MODELS.register_module('DemoToyModel', module=ToyModel, force=True)
    DATASETS.register_module('DemoToyDataset', module=ToyDataset, force=True)
    METRICS.register_module('DemoCountingMetric', module=CountingMetric,
                            force=True)
    loader = dict(dataset=dict(type='DemoToyDataset'), batch_size=4,
                  num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    cfg = Config(dict(
        model=dict(type='DemoToyModel'),
        train_dataloader=dict(loader, sampler=dict(type='InfiniteSampler')),
        val_dataloader=loader, test_dataloader=loader,
        val_evaluator=dict(type='DemoCountingMetric', tag='val'),
        test_evaluator=dict(type='DemoCountingMetric', tag='test'),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=2,
                       val_interval=10**9),
        val_cfg=dict(type='ValLoop'), test_cfg=dict(type='TestLoop'),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_scope='mmengine'))

    class Quiet:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    (tmp_path / 'stage').mkdir()
    ctx = StageContext(Stage('stage', 'toy', lambda c: {}), 'stage', 0, {},
                       Quiet())
    with working_dir(str(tmp_path)):
        _, metrics = run_runner(cfg, ctx)
    return str(tmp_path / 'stage'), metrics, seen


def test_run_runner_evaluates_the_test_scenes_once(tmp_path):
    """mmengine's ``IterBasedTrainLoop`` validates after its last iteration
    whatever ``val_interval`` says; a stage that trains and then tests on
    the same scenes must not evaluate them twice."""
    _, metrics, seen = _run_toy_stage(tmp_path)
    assert seen == ['test'] * 3, seen  # 12 scenes, batches of 4, once
    assert metrics == {'n': 3.0}


def test_run_runner_renders_its_config_without_yapf(tmp_path, monkeypatch):
    """A stage's Runner logs and dumps its config as mmengine's plain text:
    yapf's formatting costs 0.2-0.8 s a time for the demo's configs, and a
    Runner renders its config several times."""
    import mmengine.config.config as mm_config

    def no_yapf(*args, **kwargs):
        raise AssertionError('the config was formatted with yapf')

    monkeypatch.setattr(mm_config, 'FormatCode', no_yapf)
    stage_dir, metrics, _ = _run_toy_stage(tmp_path)
    assert metrics == {'n': 3.0}
    dumped = glob.glob(osp.join(stage_dir, '*', 'vis_data', 'config.py'))
    assert dumped, 'the Runner dumped no config'
    from mmengine.config import Config
    assert Config.fromfile(dumped[0]).train_cfg.max_iters == 2


def _wait_for(path: str, seconds: float = 30.0) -> None:
    import time
    end = time.monotonic() + seconds
    while not osp.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f'{path} never appeared')
        time.sleep(0.02)


def test_two_stages_at_once_in_forked_processes(tmp_path):
    """``jobs=2``: independent stages run at the same time (each waits for
    a file the other writes: run one after the other they would time
    out), a stage starts only after its dependencies, results and ``done``
    markers are those of a sequential run, progress reaches the parent's
    display, and a failing stage stops the run with its traceback."""
    from kiv_demo.stages import Stage, run_stages
    flags = str(tmp_path / 'flags')
    os.makedirs(flags)

    def meet(me, other):
        def run(ctx):
            open(osp.join(flags, me), 'w').close()
            _wait_for(osp.join(flags, other))
            ctx.progress.update(1.0, f'{me} met {other}')
            return dict(me=me, deps=sorted(
                k for k in ctx.results if k != '_stages'))
        return run

    def after(name):
        def run(ctx):
            return dict(me=name, seen=sorted(
                k for k in ctx.results if k != '_stages'))
        return run

    stages = [Stage('a', 'a', meet('a', 'c')),
              Stage('b', 'b', after('b'), deps=('a', )),
              Stage('c', 'c', meet('c', 'a')),
              Stage('d', 'd', after('d'), deps=('b', 'c'))]
    out = io.StringIO()
    res = run_stages(stages, str(tmp_path / 'w'), seed=0, stream=out,
                     jobs=2, threads=1)
    assert res['a'] == dict(me='a', deps=[])
    assert 'a' in res['b']['seen']
    assert {'a', 'b', 'c'} <= set(res['d']['seen'])
    assert 'a: a met c' in out.getvalue()
    for name in 'abcd':
        with open(tmp_path / 'w' / name / 'done') as f:
            assert json.load(f)['result'] == res[name]
    # reused like a sequential run's stages
    again = run_stages(stages, str(tmp_path / 'w'), seed=0,
                       stream=io.StringIO(), jobs=2)
    assert all(again['_stages'][n]['cached'] for n in 'abcd')

    def boom(ctx):
        raise ValueError('broken stage')

    with pytest.raises(RuntimeError, match='(?s)x.*broken stage'):
        run_stages([Stage('x', 'x', boom)], str(tmp_path / 'e'), seed=0,
                   stream=io.StringIO(), jobs=2)
    assert not osp.exists(tmp_path / 'e' / 'x' / 'done')


# --------------------------------------------------------- end to end ----
def _demo(work_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--toy',
         '--work-dir', work_dir, '--seed', '3'],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS='ignore'))


def _files(root: str) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: ``(size, mtime_ns, sha256)``."""
    import hashlib
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[osp.relpath(path, root)] = (st.st_size, st.st_mtime_ns,
                                            digest)
    return out


def _labels(work_dir: str, split: str) -> np.ndarray:
    """Image labels of the world's ImageNet layout (the classifier's)."""
    path = osp.join(work_dir, 'world', 'imagenet', 'meta', f'{split}.txt')
    with open(path, encoding='utf-8') as f:
        return np.array([int(line.split()[1]) for line in f if line.strip()])


def _check_interval(cell, n: int, p: float) -> None:
    """``cell`` = (value, low, high) of a 0/100 score over ``n`` images
    with rate ``p``: value = 100 p, ends = quantiles of 100 Bin(n, p) / n.
    """
    from scipy.stats import binom
    value, low, high = cell
    assert value == pytest.approx(100 * p)
    for got, q in ((low, 0.025), (high, 0.975)):
        bracket = [100 * binom.ppf(min(max(q + d, 0), 1), n, p) / n
                   for d in (-0.02, 0.02)]
        assert bracket[0] <= got <= bracket[1], (cell, q, bracket)


@pytest.mark.slow
def test_toy_demo_end_to_end_then_fully_cached(tmp_path):
    import cv2
    from safetensors.torch import load_file

    from kiv_demo.report import AGREEMENT_COLUMNS, PROBE_COLUMNS
    from kiv_demo.world import CLASSES
    work_dir = str(tmp_path / 'demo')
    first = _demo(work_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the console is the progress display's: mmengine's INFO messages of a
    # stage (here: every initialised parameter) are in its own log
    assert 'PretrainedInit' not in first.stdout + first.stderr
    with open(osp.join(work_dir, 'features_inherit', 'stage.log')) as f:
        assert 'PretrainedInit: load from inherit/student.pth' in f.read()
    report = osp.join(work_dir, 'report')
    with open(osp.join(report, 'tables.json')) as f:
        tables = json.load(f)
    probes = {r['row']: r for r in tables['probes']}
    rows = ['inherit', 'rival_user', 'rival_teachers', 'kb_alone']
    assert list(probes) == ['trivial', 'teachers', *rows]
    train, val = _labels(work_dir, 'train'), _labels(work_dir, 'val')
    n_val = len(val)
    assert n_val == 6 + 3  # the toy world: 3 classification-only scenes
    for row in ('trivial', 'teachers', *rows):
        for key in PROBE_COLUMNS:
            if probes[row][key] is None:
                continue
            value, low, high = probes[row][key]
            assert 0 <= low <= value <= high <= 100, (row, key)
            if key.startswith('top1'):  # a share of the validation images
                correct = value * n_val / 100
                assert correct == pytest.approx(round(correct)), (row, key)
                _check_interval(probes[row][key], n_val,
                                round(correct) / n_val)
    assert probes['teachers']['top1_knn'] is None  # no k-NN for teachers
    # labels and compute: the rivals train on their own split only, with
    # the inheritance run's steps and labelled views per step
    budget = {b['row']: b for b in tables['budget']}
    assert budget['rival_user']['labels'].startswith('6 scenes (user')
    assert budget['rival_teachers']['labels'].startswith('12 scenes')
    assert budget['rival_user']['samples'] == 2 * 2  # toy: 2 steps x 2
    assert budget['inherit']['samples'] == 2 * 4
    assert budget['inherit']['seconds_total'] > budget['inherit']['seconds']
    with open(osp.join(work_dir, 'rival_user', 'done')) as f:
        assert json.load(f)['result']['split'] == 'train'
    # the inherited heads on the ground truth, next to the teachers' own
    # scores (the classifier's: its arg-max on the validation scenes)
    gt = {r['row']: r for r in tables['inherited_gt']}
    assert list(gt) == ['teachers', 'knowledge_base', 'inherit',
                        'inherit_calibrated']
    val_logits = load_file(osp.join(work_dir, 'effnet_eval',
                                    'outputs.safetensors'))['val.logits']
    _check_interval(gt['teachers']['top1'], n_val,
                    float((val_logits.argmax(1).numpy() == val).mean()))
    for key in ('top1', 'box_ap', 'mask_ap', 'miou'):
        for row in ('inherit', 'inherit_calibrated'):
            value, low, high = gt[row][key]
            assert 0 <= low <= value <= high <= 100, (row, key)
    assert gt['knowledge_base']['miou'] is None
    # the inherited student's det / seg probes read its maps in the
    # detector's FPN space (its channels, the student's grids); the other
    # rows their own pyramid
    from mmengine.config import Config
    from safetensors import safe_open
    det_fpn = Config.fromfile(osp.join(work_dir, 'teacher_det',
                                       'teacher_det.py')).model.neck
    shapes = {}
    for row in rows:
        with safe_open(osp.join(work_dir, f'features_{row}',
                                'features.safetensors'), 'pt') as f:
            shapes[row] = [f.get_slice(f'val.level{lv}').get_shape()
                           for lv in range(4)]
            # top-1: every classification validation scene, in the labels'
            # order (the COCO val scenes first)
            cls_summary = f.get_tensor('val_cls.summary')
            assert len(cls_summary) == n_val
            assert torch.equal(cls_summary[:6], f.get_tensor('val.summary'))
    # det / seg: the COCO / ADE20K validation scenes only
    assert all(s[0][0] == 6 for s in shapes.values())
    assert [s[1] for s in shapes['inherit']] == [det_fpn.out_channels] * 4
    assert [s[1] for s in shapes['kb_alone']] == [128] * 4
    assert [s[2:] for s in shapes['inherit']] == \
        [s[2:] for s in shapes['kb_alone']]
    # the knowledge base alone is its own summary and maps: every gate of
    # its untrained adapter closed; the trained rows share one architecture
    # whose pyramid gates start open (ViT-Adapter's full-strength maps)
    from kiv.utils.checkpoint import safe_torch_load
    saved = {row: safe_torch_load(osp.join(work_dir, row, 'student.pth'))
             for row in rows}
    gates = {k: v for k, v in saved['kb_alone']['state_dict'].items()
             if k.startswith('pyramid_gammas.') or k.endswith('.gamma')
             and not k.startswith('base.')}
    assert len([k for k in gates if k.startswith('pyramid_')]) == 4
    assert all(not v.any() for v in gates.values()), gates.keys()
    for row in ('inherit', 'rival_user', 'rival_teachers'):
        assert saved[row]['meta']['student']['pyramid_init_values'] == 1.0
        # the weights, not only the config: 2 toy steps move a gate by
        # about 2 x lr x 10, far from 0
        pyramid = [v for k, v in saved[row]['state_dict'].items()
                   if k.startswith('pyramid_gammas.')]
        assert len(pyramid) == 4
        assert all((v - 1).abs().max() < 0.2 for v in pyramid), row
    # standardised MSE per teacher output at the end of the run
    mse = {(m['run'], m['key']) for m in tables['mse']}
    assert {('inherit', f'{t}_features')
            for t in ('kb', 'effnet', 'det', 'seg')} <= mse
    # the majority row: the training set's most frequent class, scored on
    # the validation labels (computed here from the world's files)
    majority = np.bincount(train).argmax()
    rate = float(np.mean(val == majority))
    for key in ('top1_logreg', 'top1_knn'):
        _check_interval(probes['trivial'][key], n_val, rate)
    # the teachers' classification ceiling: the world classifier's top-1
    # on the validation scenes
    _check_interval(probes['teachers']['top1_logreg'], n_val,
                    float((val_logits.argmax(1).numpy() == val).mean()))
    # its mIoU: every valid pixel labelled the most frequent training class
    # (IoU of that class: its share of the valid pixels; 0 for every other
    # class present, the rest left out)
    ade = osp.join(work_dir, 'world', 'ade', 'ADEChallengeData2016',
                   'annotations')

    def class_pixels(split):  # raw value 0: ignore, c + 1: class c
        total = np.zeros(len(CLASSES) + 1, np.int64)
        for name in sorted(os.listdir(osp.join(ade, split))):
            raw = cv2.imread(osp.join(ade, split, name),
                             cv2.IMREAD_UNCHANGED)
            assert raw.max() <= len(CLASSES)
            total += np.bincount(raw.ravel(), minlength=len(total))
        return total[1:]

    seg_cls = int(class_pixels('training').argmax())
    area = class_pixels('validation')
    present = (area > 0) | (np.arange(len(area)) == seg_cls)
    miou = 100 * area[seg_cls] / area.sum() / present.sum()
    assert probes['trivial']['miou'][0] == pytest.approx(miou, abs=1e-6)
    # the inherited-head table: the image-blind rows are the teacher's
    # class shares on the in-distribution images
    agreement = {r['row']: r for r in tables['agreement']}
    assert list(agreement) == ['majority', 'mean', 'knowledge_base',
                               'inherit']
    assert set(AGREEMENT_COLUMNS) <= set(agreement['inherit'])
    outputs = load_file(osp.join(work_dir, 'effnet_eval',
                                 'outputs.safetensors'))
    ref = torch.cat([outputs['views.logits'], outputs['val.logits']])
    top = torch.bincount(ref.argmax(1)).sort(descending=True).values
    n_ref = len(ref)
    _check_interval(agreement['majority']['top1_in_dist'], n_ref,
                    float(top[0]) / n_ref)
    _check_interval(agreement['majority']['top5_in_dist'], n_ref,
                    float(top[:5].sum()) / n_ref)
    for row in ('mean', 'knowledge_base', 'inherit'):
        value, low, high = agreement[row]['top1_in_dist']
        assert 0 <= low <= value <= high <= 100
        hits = value * n_ref / 100
        assert hits == pytest.approx(round(hits)), row
        _check_interval(agreement[row]['top1_in_dist'], n_ref,
                        round(hits) / n_ref)
    assert agreement['knowledge_base']['seg_miou'] is None
    for png in ('results.png', 'curves.png', 'pca.png'):
        with open(osp.join(report, png), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
    md = open(osp.join(report, 'tables.md')).read()
    assert md.strip() in first.stdout
    assert osp.isfile(osp.join(work_dir, 'timings.json'))
    # training read every teacher from the caches, the knowledge base's
    # targets included (written after it was made)
    log = open(osp.join(work_dir, 'teacher_cache', 'index.json')).read()
    assert set(json.loads(log)['teachers']) == {'kb', 'effnet', 'det',
                                                'seg'}
    log = open(osp.join(work_dir, 'kb_cache', 'index.json')).read()
    assert set(json.loads(log)['teachers']) == {'effnet'}
    # EfficientNet-Lite0 ran once: the inheritance cache copied its
    # outputs from the knowledge base's cache (checked there on the first
    # views: the same numbers)
    kb_index = json.loads(log)
    index = json.loads(open(osp.join(work_dir, 'teacher_cache',
                                     'index.json')).read())
    reused = index['teachers']['effnet']['reused_from']
    assert reused['cache_id'] == kb_index['cache_id'] and \
        reused['check'] == 0.0
    assert [t for t, e in index['teachers'].items()
            if 'reused_from' in e] == ['effnet']
    # the exported student loads weights-only
    ckpt = torch.load(osp.join(work_dir, 'inherit', 'student.pth'),
                      weights_only=True)
    assert ckpt['meta']['base_teacher'] == 'kb'
    assert 'inherited_heads' in ckpt

    # the second run recomputes nothing: every stage is reused and not one
    # file of the work dir is written, added or removed
    stages = [line for line in first.stdout.splitlines()
              if '(running)' in line]
    done = [d for d in os.listdir(work_dir)
            if osp.isfile(osp.join(work_dir, d, 'done'))]
    assert len(stages) == len(done) > 10
    before = _files(work_dir)
    second = _demo(work_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '(running)' not in second.stdout
    assert second.stdout.count('(cached, reused)') == len(stages)
    assert md.strip() in second.stdout
    after = _files(work_dir)
    assert after.keys() == before.keys(), \
        sorted(after.keys() ^ before.keys())
    changed = sorted(k for k in before if after[k] != before[k])
    assert not changed, changed


def test_attached_features_are_standardised_with_train_statistics(
        tmp_path):
    """The det / seg probes read every row's maps at one scale: per level
    and channel, minus the mean and over the standard deviation of the
    *train* split (images and positions), for train, flipped and val
    samples alike; without ``standardize`` the maps are the file's."""
    from mmengine.structures import BaseDataElement
    from safetensors.torch import save_file

    from kiv_demo.probes import AttachFeatures
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    tensors = {f'{split}.level{lv}':
               (torch.randn(4, 3, 4 >> lv, 4 >> lv, generator=g) * scale +
                7.0 * (split == 'val')).half()
               for split in ('train', 'train_flip', 'val')
               for lv in range(2)}
    path = str(tmp_path / 'features.safetensors')
    save_file(tensors, path)

    def attach(split, idx, flip=False, **kwargs):
        sample = BaseDataElement(metainfo=dict(
            img_path=f'x/{idx:012d}.jpg', flip=flip))
        out = AttachFeatures(path, split, levels=2, **kwargs).transform(
            dict(data_samples=sample))
        return out['inputs']

    for lv in range(2):
        train = tensors[f'train.level{lv}'].float()
        mean = train.mean((0, 2, 3)).view(3, 1, 1)
        std = train.std((0, 2, 3)).view(3, 1, 1)
        for split, key, flip in (('train', 'train', False),
                                 ('train', 'train_flip', True),
                                 ('val', 'val', False)):
            raw = tensors[f'{key}.level{lv}'][2].float()
            got = attach(split, 2, flip, standardize=True)[lv]
            torch.testing.assert_close(got, (raw - mean) / std)
            assert torch.equal(attach(split, 2, flip)[lv].float(), raw)
        stacked = torch.stack([attach('train', i, standardize=True)[lv]
                               for i in range(4)])
        torch.testing.assert_close(stacked.mean((0, 2, 3)),
                                   torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(stacked.std((0, 2, 3)), torch.ones(3),
                                   atol=1e-4, rtol=0)


def test_load_rgb_gives_contiguous_nchw(tmp_path):
    """The agreement stage feeds these images through convolutions to an
    mmcv RoI head, which misreads channels-last memory (the inherited and
    the teacher's detector both scored ~0 box AP that way)."""
    import cv2

    from kiv_demo.probes import load_rgb
    img = np.random.default_rng(0).integers(0, 255, (12, 10, 3), np.uint8)
    path = str(tmp_path / 'a.png')
    cv2.imwrite(path, img)
    x = load_rgb([path])
    assert x.shape == (1, 3, 12, 10) and x.is_contiguous()
    assert torch.equal(x[0, 0], torch.from_numpy(img[..., 2]).float())


def test_ready_stages_start_by_their_critical_path(tmp_path):
    """With two jobs, of three ready stages the two heading the longest
    chains of expected seconds start first (the short one waits even though
    it comes first in list order); the chains add the expected seconds of
    every stage that needs a stage, directly or not."""
    from kiv_demo.stages import Stage, critical_path_seconds, run_stages
    order = str(tmp_path / 'order.txt')

    def log(name):
        def run(ctx):
            with open(order, 'a') as f:
                f.write(name + '\n')
            return dict(me=name)
        return run

    stages = [Stage('short', 'short', log('short'), cost=1),
              Stage('feeds_long', 'x', log('feeds_long'), cost=1),
              Stage('mid', 'mid', log('mid'), cost=5),
              Stage('long', 'long', log('long'), deps=('feeds_long', ),
                    cost=50)]
    chain = critical_path_seconds(stages, {s.name: s.cost for s in stages})
    assert chain == dict(short=1, feeds_long=51, mid=5, long=50)
    run_stages(stages, str(tmp_path / 'w'), seed=0, stream=io.StringIO(),
               jobs=2, threads=1)
    with open(order) as f:
        started = f.read().split()
    assert set(started[:2]) == {'feeds_long', 'mid'}
    assert started.index('short') > started.index('feeds_long')


def test_long_preset_changes_only_what_the_inheritance_length_reaches():
    """``--long`` gives the inheritance 10x the first protocol's samples
    (120 x 32) and changes nothing else: every stage that does not need
    the inheritance's steps (the rivals get the same steps) keeps the
    default run's fingerprint, so a long run reuses a default run's stages
    and its rows measure what the length buys."""
    from kiv_demo.pipeline import build_stages
    from kiv_demo.presets import get_preset
    from kiv_demo.stages import fingerprint
    default, long = get_preset('default'), get_preset('long')
    assert long['inherit']['iters'] * long['inherit']['batch'] >= \
        10 * 120 * 32
    long['inherit']['iters'] = default['inherit']['iters']
    assert long == default

    def prints(name):
        out, deps = {}, {}
        for s in build_stages(name):
            out[s.name] = fingerprint(s, 0, out)
            deps[s.name] = s.deps
        return out, deps

    (a, deps), (b, _) = prints('default'), prints('long')
    assert a.keys() == b.keys()
    reached = {'inherit', 'rival_user', 'rival_teachers'}
    for name in a:  # stages are listed after their dependencies
        if reached & set(deps[name]):
            reached.add(name)
    assert {n for n in a if a[n] != b[n]} == reached
    assert {'world', 'teacher_cache', 'knowledge_base', 'features_kb_alone',
            'probe_det_kb_alone'}.isdisjoint(reached)


def test_every_preset_has_its_flag_in_tools_demo():
    """``tools/demo.py``'s size flags name the presets: no flag runs the
    default, ``--<name>`` runs preset ``<name>`` (``--long`` the long
    one), every preset is reachable and two sizes at once are refused."""
    import importlib.util

    from kiv_demo.presets import PRESETS
    spec = importlib.util.spec_from_file_location(
        'kiv_tools_demo', osp.join(REPO, 'tools', 'demo.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args([]).preset == 'default'
    flagged = {name for name in PRESETS if name != 'default'}
    for name in flagged:
        assert tool.parse_args([f'--{name}']).preset == name
    with pytest.raises(SystemExit):
        tool.parse_args(['--long', '--quick'])


def test_sweep_runs_are_probed_as_their_rows():
    """The learning-rate sweep's runs are probed as the rows they tune: an
    inheritance run in the detection teacher's space, the rival on its own
    pyramid (else the sweep would choose on another probe than the
    table's)."""
    from kiv_demo.pipeline import TUNE_LRS, build_tuning_stages
    from kiv_demo.recipes import DENSE_TEACHER, dense_space
    stages = {s.name: s for s in build_tuning_stages('toy')}
    for lr in TUNE_LRS:
        assert stages[f'features_inherit_lr{lr:g}'].params['dense'] == \
            DENSE_TEACHER == dense_space('inherit')
        assert stages[f'features_rival_lr{lr:g}'].params['dense'] == \
            'student' == dense_space('rival_user')


def test_probe_backbone_reads_the_space_it_is_given(tmp_path):
    """A sweep run's features are extracted in the space its stage says
    (not the one its name would suggest): ``probe_backbone_cfg`` wraps the
    row's student in ``kiv.InheritedBackbone`` for a teacher's space and
    leaves it bare for ``'student'``."""
    from kiv.utils.atomic import atomic_torch_save
    from kiv_demo.presets import get_preset
    from kiv_demo.recipes import (DENSE_TEACHER, inherit_cfg, load_cfg,
                                  probe_backbone_cfg)
    from kiv_demo.stages import working_dir
    student = inherit_cfg('inherit', get_preset('toy')).model.student
    for row in ('inherit_lr0.001', 'rival_lr0.001'):
        (tmp_path / row).mkdir()
        atomic_torch_save(dict(state_dict={}, meta=dict(
            student=student.to_dict())), str(tmp_path / row / 'student.pth'))
    levels = load_cfg('inherit').model.latent.teachers[
        DENSE_TEACHER].student_levels
    with working_dir(str(tmp_path)):
        for row in ('inherit_lr0.001', 'rival_lr0.001'):
            wrapped = probe_backbone_cfg(row, space=DENSE_TEACHER)
            assert wrapped['type'] == 'kiv.InheritedBackbone'
            assert wrapped['teacher'] == DENSE_TEACHER
            assert wrapped['student_levels'] == list(levels)
            assert wrapped['checkpoint'] == f'{row}/student.pth'
            bare = probe_backbone_cfg(row, space='student')
            assert bare['type'] == student.type == wrapped['backbone']['type']
            assert bare['init_cfg']['checkpoint'] == f'{row}/student.pth'


def test_features_stage_extracts_in_the_space_of_its_params(monkeypatch):
    """A features stage builds its backbone in the space its fingerprinted
    parameter ``dense`` names (what the sweep sets), not one derived from
    the row's name."""
    from kiv_demo import eval_stages
    from kiv_demo.pipeline import _probe_stages
    from kiv_demo.presets import get_preset
    from kiv_demo.stages import StageContext
    asked = []

    class Built(Exception):
        pass

    def backbone(row, preset, seed, space=None):
        asked.append((row, space))
        raise Built

    monkeypatch.setattr(eval_stages, '_probe_backbone', backbone)
    for space in ('student', 'det'):
        stage, = [s for s in _probe_stages(
            'inherit_lr0.001', 'sweep run', get_preset('toy'),
            tasks=(), space=space) if s.name.startswith('features_')]
        assert stage.params['dense'] == space
        with pytest.raises(Built):
            stage.run(StageContext(stage, stage.name, 0, {}, None))
    assert asked == [('inherit_lr0.001', 'student'),
                     ('inherit_lr0.001', 'det')]


@pytest.mark.parametrize('num_val_cls', [0, 3])
def test_features_stage_summaries_of_every_classification_scene(
        tmp_path, monkeypatch, num_val_cls):
    """The features stage's ``val_cls.summary`` is every classification
    validation scene's summary in the labels' order: the detection /
    segmentation validation scenes first, then the classification-only
    ones; a world without the latter (``--quick``) gives ``val``'s alone.
    Only summaries are kept for the classification-only scenes."""
    import torch.nn.functional as F
    from kiv_demo import eval_stages
    from kiv_demo.pipeline import _probe_stages
    from kiv_demo.presets import get_preset
    from kiv_demo.probes import IMAGENET_MEAN, IMAGENET_STD, load_rgb
    from kiv_demo.stages import ProgressDisplay, StageContext
    from kiv_demo.world import (WorldConfig, world_cls_images, world_labels,
                                write_world)
    from safetensors.torch import load_file

    from kiv.structures import FeatureOutput

    class Backbone(torch.nn.Module):
        """Summary: each image's mean colour; maps at strides 4-32."""

        def forward_features(self, x):
            levels = tuple(F.avg_pool2d(x, s) for s in (4, 8, 16, 32))
            return FeatureOutput(summary=x.mean((2, 3)), features=levels)

    write_world(str(tmp_path / 'world'),
                WorldConfig(num_train=2, num_val=2, num_teachers=2,
                            num_unlabelled=2, num_val_cls=num_val_cls),
                seed=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eval_stages, '_probe_backbone',
                        lambda row, preset, seed, space=None: Backbone())
    preset = get_preset('toy')
    preset['world']['num_val_cls'] = num_val_cls
    stage, = [s for s in _probe_stages('inherit', 'inherited', preset,
                                       tasks=())]
    os.makedirs(stage.name)
    stage.run(StageContext(stage, stage.name, 0, {}, ProgressDisplay(
        {stage.name: 1.0}, io.StringIO())))
    feats = load_file(osp.join(stage.name, 'features.safetensors'))
    paths = world_cls_images('world', 'val')
    assert len(paths) == 2 + num_val_cls == len(world_labels('world', 'val'))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    expected = ((load_rgb(paths, 64) - mean) / std).mean((2, 3))
    torch.testing.assert_close(feats['val_cls.summary'], expected)
    torch.testing.assert_close(feats['val.summary'], expected[:2])
    assert not [k for k in feats if k.startswith('val_cls.level')]
    assert feats['val.level0'].shape == (2, 3, 16, 16)


def test_curves_keep_each_gradient_share_measurement_once(
        tmp_path, monkeypatch):
    """mmengine's logger writes a scalar's latest value at every logging
    step: a share measured every 83 steps and logged every 10 must be
    drawn as one point per measurement, not a staircase of repeats."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib.axes import Axes

    from kiv_demo.report import plot_curves
    run = tmp_path / 'inherit'
    run.mkdir()
    # measured at 83, 166 and 249: the last two equal, still two points
    shares = {90: (83, 0.5), 100: (83, 0.5), 170: (166, 0.25),
              180: (166, 0.25), 250: (249, 0.25), 260: (249, 0.25)}
    with open(run / 'scalars.json', 'w') as f:
        for step in range(10, 270, 10):
            rec = dict(step=step, loss_seg_features=1.0 / step,
                       loss_det_features=2.0 / step)
            if step in shares:
                rec['grad_share_iter'], rec['grad_share/seg'] = shares[step]
                rec['grad_share/det'] = 1 - rec['grad_share/seg']
            f.write(json.dumps(rec) + '\n')
    drawn = {}
    plot = Axes.plot

    def spy(ax, *args, **kwargs):
        if kwargs.get('marker') == 'o':  # the share panel's lines
            drawn[kwargs['label']] = list(zip(*args))
        return plot(ax, *args, **kwargs)

    monkeypatch.setattr(Axes, 'plot', spy)
    plot_curves([str(run)], str(tmp_path / 'curves.png'))
    assert drawn == {'seg': [(90, 0.5), (170, 0.25), (250, 0.25)],
                     'det': [(90, 0.5), (170, 0.75), (250, 0.75)]}
    assert (tmp_path / 'curves.png').stat().st_size > 0


def test_det_results_box_only_gives_the_full_predictions_boxes():
    """The agreement's box-only pass (the teacher's boxes as the reference)
    returns the boxes, scores and labels of the full Mask R-CNN pass."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from kiv_demo.agreement import _det_results
    cfg = Config.fromfile(osp.join(
        REPO, 'projects/kiv_demo/configs/_base_/world_mask-rcnn.py'))
    cfg.model.backbone = dict(type='ResNet', depth=18, num_stages=4,
                              out_indices=(0, 1, 2, 3), init_cfg=None)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    # many confident detections from random weights
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = DET_MODELS.build(cfg.model)
    detector.eval()
    # FPN maps P2-P5 (the function adds P6)
    feats = tuple(torch.randn(2, 64, 64 // s, 64 // s)
                  for s in (4, 8, 16, 32))
    meta = dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                batch_input_shape=(64, 64), scale_factor=(1.0, 1.0))
    metas = [dict(meta) for _ in range(2)]
    with torch.no_grad():
        full = _det_results(detector, feats, metas)
        boxes = _det_results(detector, feats, metas, masks=False)
    assert sum(len(r) for r in full) > 0
    for a, b in zip(full, boxes):
        assert 'masks' in a and 'masks' not in b
        torch.testing.assert_close(a.bboxes, b.bboxes, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert a.labels.tolist() == b.labels.tolist()
