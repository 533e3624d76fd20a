"""``tools/demo.py`` end to end at toy size, plus its building blocks."""
from __future__ import annotations

import io
import json
import os.path as osp
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO


# ------------------------------------------------------------ the world ---
def test_world_scenes_have_consistent_annotations():
    from kiv.demo.world import CLASSES, WorldConfig, _Backgrounds, draw_scene
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

    from kiv.demo.world import CLASSES, WorldConfig, write_world
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


# -------------------------------------------------------- the plain ViT ---
def test_plain_vit_student_pyramid_and_toolbox_outputs():
    import kiv.demo  # noqa: F401
    from kiv.registry import MODELS
    base = dict(type='timm', model_name='vit_small_patch14_reg4_dinov2',
                model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2))
    student = MODELS.build(dict(type='kiv.PlainViTStudent', base=base))
    out = student.forward_features(torch.randn(2, 3, 64, 48))
    assert out.summary.shape == (2, 32)
    assert [tuple(f.shape[-2:]) for f in out.features] == [
        (16, 12), (8, 6), (4, 3), (2, 2)]
    out.summary.sum().backward()
    assert student.base.model.cls_token.grad is not None
    frozen = MODELS.build(dict(type='kiv.PlainViTStudent', base=base,
                               frozen=True, out_type='global'))
    frozen.train()
    assert not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    (summary, ) = frozen(torch.randn(1, 3, 32, 32))
    assert summary.shape == (1, 32)
    assert [tuple(f.shape[-2:]) for f in student(torch.randn(1, 3, 30, 32))
            ] == [(8, 8), (4, 4), (2, 2), (1, 1)]


# ---------------------------------------------------------------- stages ---
def test_stage_cache_reuses_and_invalidates_dependents(tmp_path):
    from kiv.demo.stages import Stage, run_stages
    calls = []

    def make(name):
        def run(ctx):
            calls.append(name)
            with open(osp.join(ctx.dir, 'out.txt'), 'w') as f:
                f.write(name)
            return dict(value=len(calls))
        return run

    def stages(a_param):
        return [Stage('a', 'first', make('a'), params=dict(p=a_param)),
                Stage('b', 'second', make('b'), deps=('a', )),
                Stage('c', 'independent', make('c'))]

    out = io.StringIO()
    run_stages(stages(1), str(tmp_path), seed=0, stream=out)
    assert calls == ['a', 'b', 'c']
    assert '[1/3] a: first (running)' in out.getvalue()
    assert 'ETA' in out.getvalue()
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


# --------------------------------------------------------- end to end ----
def _demo(work_dir: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--toy',
         '--work-dir', work_dir, '--seed', '3'],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(__import__('os').environ, PYTHONPATH=REPO,
                 PYTHONWARNINGS='ignore'))
    return proc, time.monotonic() - start


def test_toy_demo_end_to_end_then_fully_cached(tmp_path):
    from kiv.demo.report import COLUMNS
    work_dir = str(tmp_path / 'demo')
    first, first_time = _demo(work_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = osp.join(work_dir, 'report')
    with open(osp.join(report, 'table.json')) as f:
        table = json.load(f)
    assert [r['row'] for r in table] == ['inherit', 'baseline', 'kb_alone']
    for entry in table:
        assert set(COLUMNS) <= set(entry)
        for key in ('top1', 'box_ap', 'mask_ap', 'miou'):
            assert 0 <= entry[key] <= 100, (entry['row'], key)
    assert table[1]['agreement'] is None  # the baseline has no s2t head
    for row in (table[0], table[2]):
        assert 0 <= row['agreement'] <= 100
    for png in ('table.png', 'curves.png', 'pca.png'):
        path = osp.join(report, png)
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
    md = open(osp.join(report, 'table.md')).read()
    assert md in first.stdout
    # the exported student loads weights-only
    ckpt = torch.load(osp.join(work_dir, 'inherit', 'student.pth'),
                      weights_only=True)
    assert ckpt['meta']['base_teacher'] == 'kb'
    assert 'inherited_heads' in ckpt

    second, second_time = _demo(work_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '(running)' not in second.stdout
    assert second.stdout.count('(cached, reused)') == len(
        [line for line in first.stdout.splitlines() if '(running)' in line])
    assert md in second.stdout
    assert second_time < first_time / 2
