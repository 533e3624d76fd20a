"""kiv.ReplayView renders exactly what the distillation pipeline's own
transforms render for the same crop and flip, and train pipelines translate
(or are refused) as documented."""
import mmcv
import numpy as np
import pytest

from kiv.datasets.teacher_cache import (ReplayView, TeacherCacheError,
                                        ViewParams, split_pipeline, view_rng)


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3),
                                                np.uint8)


def test_full_box_equals_mmcv_resize_and_flip():
    from mmcv.transforms import RandomFlip, Resize
    img = _image()
    view = ReplayView(scale=(28, 20), flip_prob=0.5)
    for flip in (False, True):
        got = view.transform(dict(img=img.copy(), view_params=ViewParams(
            (0, 0, 53, 37), flip, (37, 53)).to_dict()))
        ref = Resize(scale=(20, 28), keep_ratio=False)(dict(img=img.copy()))
        if flip:
            ref = RandomFlip(prob=1.0)(ref)
        np.testing.assert_array_equal(got['img'], ref['img'])
        assert got['img_shape'] == (28, 20)
        assert got['flip'] is flip


def test_crop_box_equals_mmpretrain_random_resized_crop(monkeypatch):
    from mmpretrain.datasets.transforms import RandomResizedCrop
    img = _image(60, 80)
    rrc = RandomResizedCrop(scale=24, crop_ratio_range=(0.2, 1.0),
                            interpolation='bicubic', backend='pillow')
    view = ReplayView(**{k: v for k, v in split_pipeline([
        dict(type='kiv.LoadImageFromFileSafe'),
        dict(type='mmpretrain.RandomResizedCrop', scale=24,
             crop_ratio_range=(0.2, 1.0), interpolation='bicubic',
             backend='pillow'),
        dict(type='kiv.PackImageInputs')
    ])[1].items() if k != 'type'})
    for view_index in range(5):
        params = view.sample((60, 80), view_rng(3, 7, view_index))
        x, y, w, h = params.box
        assert 0 <= x and 0 <= y and x + w <= 80 and y + h <= 60
        # the crop mmpretrain draws, replaced by ours (instance attribute)
        monkeypatch.setattr(rrc, 'rand_crop_params',
                            lambda img, b=(y, x, h, w): b)
        ref = rrc.transform(dict(img=img.copy()))['img']
        got = view.apply(img, ViewParams(params.box, False, (60, 80)))
        np.testing.assert_array_equal(got, ref)


def test_views_are_seeded_per_image_and_view():
    view = ReplayView(scale=16, crop_ratio_range=(0.1, 1.0), flip_prob=0.5)
    a = [view.sample((40, 50), view_rng(0, i, v)) for i in range(4)
         for v in range(3)]
    b = [view.sample((40, 50), view_rng(0, i, v)) for i in range(4)
         for v in range(3)]
    assert a == b
    assert len({p.box for p in a}) > 1 and {p.flip for p in a} == {False, True}
    assert view.sample((40, 50), view_rng(1, 0, 0)) != a[0] or \
        view.sample((40, 50), view_rng(2, 0, 0)) != a[0]


def test_replay_refuses_a_changed_image():
    view = ReplayView(scale=8)
    with pytest.raises(TeacherCacheError, match='changed after'):
        view.apply(_image(10, 12), ViewParams((0, 0, 12, 12), False,
                                              (12, 12)), 'a.jpg')


def test_split_pipeline_translates_the_tiny_and_real_recipes():
    loader, view, pack = split_pipeline([
        dict(type='kiv.LoadImageFromFileSafe'),
        dict(type='mmcv.Resize', scale=(56, 48), keep_ratio=False),
        dict(type='mmcv.RandomFlip', prob=0.5),
        dict(type='kiv.PackImageInputs'),
    ])
    assert loader == dict(type='kiv.LoadImageFromFileSafe')
    assert pack == dict(type='kiv.PackImageInputs')
    assert view['scale'] == [48, 56] and view['crop_ratio_range'] is None
    assert view['flip_prob'] == 0.5
    _, view, _ = split_pipeline([
        dict(type='kiv.LoadImageFromFileSafe'),
        dict(type='mmpretrain.RandomResizedCrop', scale=224,
             crop_ratio_range=(0.35, 1.0), backend='pillow',
             interpolation='bicubic'),
        dict(type='mmcv.RandomFlip', prob=0.5),
        dict(type='kiv.PackImageInputs'),
    ])
    assert view['crop_ratio_range'] == [0.35, 1.0]
    assert view['interpolation'] == 'bicubic' and view['backend'] == 'pillow'
    # a ReplayView config translates to itself
    assert split_pipeline([dict(type='kiv.LoadImageFromFileSafe'), view,
                           dict(type='kiv.PackImageInputs')])[1] == view


@pytest.mark.parametrize('transform, message', [
    (dict(type='mmpretrain.ColorJitter', brightness=0.4),
     "transform 'mmpretrain.ColorJitter'"),
    (dict(type='mmcv.Resize', scale=(56, 56), keep_ratio=True),
     'keep_ratio=False'),
    (dict(type='mmcv.RandomFlip', prob=[0.3, 0.3],
          direction=['horizontal', 'vertical']), 'RandomFlip'),
])
def test_split_pipeline_refuses_what_it_cannot_replay(transform, message):
    pipeline = [dict(type='kiv.LoadImageFromFileSafe'),
                dict(type='mmcv.Resize', scale=(56, 56), keep_ratio=False),
                transform, dict(type='kiv.PackImageInputs')]
    if transform['type'] == 'mmcv.Resize':
        del pipeline[1]
    with pytest.raises(TeacherCacheError, match=message):
        split_pipeline(pipeline)
    with pytest.raises(TeacherCacheError, match='no kiv.PackImageInputs'):
        split_pipeline([dict(type='kiv.LoadImageFromFileSafe'),
                        dict(type='mmcv.Resize', scale=8, keep_ratio=False)])


def test_image_size_mismatch_names_both_sizes():
    img = mmcv.imresize(_image(), (20, 10))
    with pytest.raises(TeacherCacheError, match='10x20 but'):
        ReplayView(scale=4).apply(img, ViewParams((0, 0, 5, 5), False,
                                                  (5, 5)))


def test_real_scale_cached_config_replays_its_pipeline():
    import os.path as osp

    from mmengine.config import Config
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    cfg = Config.fromfile(osp.join(
        repo, 'configs', 'distill', 'kiv_adapter-vit-b14-reg4_dinov2-clip-'
        'sam-maskrcnn_8xb64-100k_in1k_cached.py'))
    assert cfg.teacher_cache
    _, view, _ = split_pipeline(
        cfg.train_dataloader.dataset.dataset.pipeline)
    assert view['scale'] == [224, 224] and view['flip_prob'] == 0.5
    assert view['crop_ratio_range'] == [0.35, 1.0]
