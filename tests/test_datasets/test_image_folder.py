"""Unlabelled image folders, safe loading, packing and the bad-image hook."""
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.model import BaseModel
from mmengine.runner import Runner
from PIL import Image
from torch.utils.data import DataLoader

from kiv.datasets import (LoadImageFromFileSafe, PackImageInputs,
                          UnlabeledImageDataset, UnreadableImageError,
                          to_bgr_uint8)
from kiv.engine.hooks import BadImageReportHook, skipped_files_in_batch
from kiv.registry import DATASETS, HOOKS, TRANSFORMS

H, W = 12, 20
LOAD = dict(type='kiv.LoadImageFromFileSafe')
PACK = dict(type='kiv.PackImageInputs')


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0,
                                                256, (H, W, 3),
                                                dtype=np.uint8)


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., ::-1]


@pytest.fixture(scope='module')
def image_tree(tmp_path_factory):
    """A folder of every supported kind of image plus three broken files.

    Returns ``(root, expected, bad)``: ``expected`` maps the relative path of
    each readable image to its exact BGR array (``None`` for lossy jpg), and
    ``bad`` is the set of absolute paths of the broken files.
    """
    root = tmp_path_factory.mktemp('images')
    (root / 'nested' / 'deeper').mkdir(parents=True)
    (root / '.cache').mkdir()
    expected = {}

    def save(rel, img, exact, **kwargs):
        img.save(root / rel, **kwargs)
        expected[rel] = exact

    rgb = _rgb(0)
    save('a_rgb.jpg', Image.fromarray(rgb), None, quality=95)
    save('b_rgb.png', Image.fromarray(_rgb(1)), _bgr(_rgb(1)))
    save('c_rgb.webp', Image.fromarray(_rgb(2)), _bgr(_rgb(2)), lossless=True)
    save('d_rgb.bmp', Image.fromarray(_rgb(3)), _bgr(_rgb(3)))
    save('e_rgb.tiff', Image.fromarray(_rgb(4)), _bgr(_rgb(4)))
    gray = _rgb(5)[..., 0]
    save('f_gray.png', Image.fromarray(gray, mode='L'),
         np.repeat(gray[..., None], 3, axis=2))
    rgba = np.concatenate([_rgb(6), _rgb(7)[..., :1]], axis=2)
    save('g_rgba.png', Image.fromarray(rgba, mode='RGBA'), _bgr(rgba[..., :3]))
    palette = Image.fromarray(_rgb(8)).quantize(colors=16)
    save('h_palette.png', palette, _bgr(np.array(palette.convert('RGB'))))
    deep = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 273
    save('i_16bit.png', Image.fromarray(deep),
         np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))
    save('nested/deeper/j_upper.JPG', Image.fromarray(_rgb(9)), None)
    save('nested/k_rgb.TIF', Image.fromarray(_rgb(10)), _bgr(_rgb(10)))

    # broken files
    Image.fromarray(_rgb(11)).save(root / 'full.jpg')
    data = (root / 'full.jpg').read_bytes()
    (root / 'full.jpg').unlink()
    (root / 'nested' / 'x_truncated.jpg').write_bytes(data[:len(data) // 2])
    (root / 'c0_zero.png').write_bytes(b'')
    (root / 'z_text.jpg').write_text('this is not an image\n')
    bad = {
        str(root / p)
        for p in ('nested/x_truncated.jpg', 'c0_zero.png', 'z_text.jpg')
    }

    # ignored: not an image suffix, hidden file, hidden folder
    (root / 'notes.txt').write_text('a_rgb.jpg 0\n')
    Image.fromarray(rgb).save(root / '.hidden.jpg')
    Image.fromarray(rgb).save(root / '.cache' / 'thumb.jpg')
    return root, expected, bad


def _dataset(root, **kwargs):
    kwargs.setdefault('pipeline', [LOAD, PACK])
    return DATASETS.build(
        dict(type='kiv.UnlabeledImageDataset', data_root=str(root), **kwargs))


def _replacement(paths, bad, idx):
    """(loaded path, skipped paths) the dataset must return for ``idx``."""
    skipped = []
    while paths[idx % len(paths)] in bad:
        skipped.append(paths[idx % len(paths)])
        idx += 1
    return paths[idx % len(paths)], skipped


# --------------------------------------------------------------- listing --
def test_scan_is_recursive_sorted_case_insensitive(image_tree):
    root, expected, bad = image_tree
    dataset = _dataset(root)
    paths = [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))]
    wanted = sorted(list(expected) + [osp.relpath(p, root) for p in bad])
    assert paths == [osp.join(str(root), p) for p in wanted]
    assert len(dataset) == 14


def test_data_prefix_and_extensions(image_tree):
    root, _, _ = image_tree
    dataset = UnlabeledImageDataset(data_root=str(root),
                                    data_prefix=dict(img_path='nested'),
                                    extensions=('.TIF', ))
    assert [dataset.get_data_info(i)['img_path']
            for i in range(len(dataset))] == [str(root / 'nested/k_rgb.TIF')]
    # a plain string prefix is accepted like mmpretrain's
    assert len(UnlabeledImageDataset(data_prefix=str(root / 'nested'))) == 3


def test_coco_json_lists_its_images(image_tree, tmp_path):
    root, _, _ = image_tree
    coco = dict(images=[
        dict(id=1, file_name='nested/k_rgb.TIF', width=W, height=H),
        dict(id=7, file_name='b_rgb.png', width=W, height=H)
    ],
                annotations=[
                    dict(id=1,
                         image_id=1,
                         category_id=1,
                         bbox=[0, 0, 4, 4],
                         area=16,
                         iscrowd=0)
                ],
                categories=[dict(id=1, name='thing')])
    ann = tmp_path / 'instances_train.json'
    ann.write_text(json.dumps(coco))
    dataset = UnlabeledImageDataset(ann_file=str(ann),
                                    data_prefix=dict(img_path=str(root)),
                                    pipeline=[LOAD, PACK])
    assert [dataset.get_data_info(i)['img_path'] for i in range(2)] == [
        osp.join(str(root), 'nested/k_rgb.TIF'),
        osp.join(str(root), 'b_rgb.png')
    ]
    sample = dataset[1]
    assert sample['inputs'].shape == (3, H, W)
    assert 'gt_label' not in sample['data_samples']

    # json detected by content when the suffix says nothing
    other = tmp_path / 'coco.ann'
    other.write_text(json.dumps(coco))
    assert len(UnlabeledImageDataset(ann_file=str(other))) == 2


def test_imagenet_meta_file_lists_its_images(image_tree, tmp_path):
    root, _, bad = image_tree
    (tmp_path / 'meta').mkdir()
    (tmp_path / 'meta' / 'train.txt').write_text(
        'nested/deeper/j_upper.JPG 3\n\na_rgb.jpg 0\nmissing.jpg 1\n'
        'z_text.jpg 2\nf_gray.png\n')
    dataset = UnlabeledImageDataset(data_root=str(tmp_path),
                                    ann_file='meta/train.txt',
                                    data_prefix=dict(img_path=str(root)),
                                    pipeline=[LOAD, PACK])
    names = [
        'nested/deeper/j_upper.JPG', 'a_rgb.jpg', 'missing.jpg', 'z_text.jpg',
        'f_gray.png'
    ]
    assert [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))
            ] == [osp.join(str(root), n) for n in names]
    # a listed but missing file is skipped like a broken one
    sample = dataset[2]
    assert sample['data_samples'].img_path == osp.join(str(root), 'f_gray.png')
    assert sample['data_samples'].skipped_files == [
        osp.join(str(root), 'missing.jpg'),
        osp.join(str(root), 'z_text.jpg')
    ]


# ---------------------------------------------------------------- errors --
def test_missing_and_empty_folder_errors(tmp_path):
    missing = tmp_path / 'no_such_dir'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        UnlabeledImageDataset(data_root=str(missing))
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'readme.txt').write_text('no images here')
    (empty / '.hidden.png').write_bytes(b'')
    with pytest.raises(ValueError, match=f'no image files.*{empty}'):
        UnlabeledImageDataset(data_root=str(empty))
    with pytest.raises(ValueError, match='data_root'):
        UnlabeledImageDataset()
    with pytest.raises(ValueError, match='data_prefix'):
        UnlabeledImageDataset(data_root=str(empty), data_prefix=dict(img=''))


def test_ann_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='ann_file.*nope.json'):
        UnlabeledImageDataset(ann_file=str(tmp_path / 'nope.json'))
    xml = tmp_path / 'ann.xml'
    xml.write_text('<annotation><filename>a.jpg</filename></annotation>\n')
    with pytest.raises(ValueError, match=f'unknown format.*{xml}'):
        UnlabeledImageDataset(ann_file=str(xml))
    pkl = tmp_path / 'ann.pkl'
    pkl.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match=f'unknown format.*{pkl}'):
        UnlabeledImageDataset(ann_file=str(pkl))
    not_coco = tmp_path / 'data.json'
    not_coco.write_text(json.dumps(dict(data_list=[])))
    with pytest.raises(ValueError, match=f"{not_coco}.*'images'"):
        UnlabeledImageDataset(ann_file=str(not_coco))
    broken = tmp_path / 'broken.json'
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=f'{broken}.*not valid json'):
        UnlabeledImageDataset(ann_file=str(broken))
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n')
    with pytest.raises(ValueError, match=f'{empty}.*lists no images'):
        UnlabeledImageDataset(ann_file=str(empty))


def test_all_files_unreadable_raises(tmp_path):
    (tmp_path / 'a.jpg').write_text('text')
    (tmp_path / 'b.png').write_bytes(b'')
    dataset = UnlabeledImageDataset(data_root=str(tmp_path),
                                    pipeline=[LOAD, PACK])
    with pytest.raises(RuntimeError, match='2 consecutive images'):
        dataset[0]


# --------------------------------------------------------------- loading --
@pytest.mark.parametrize('color_type', ['color', 'unchanged'])
def test_every_format_loads_as_uint8_bgr(image_tree, color_type):
    root, expected, _ = image_tree
    load = TRANSFORMS.build(dict(LOAD, color_type=color_type))
    for rel, exact in expected.items():
        results = load(dict(img_path=str(root / rel)))
        img = results['img']
        assert img.dtype == np.uint8 and img.shape == (H, W, 3), rel
        assert results['ori_shape'] == results['img_shape'] == (H, W)
        if exact is not None:
            np.testing.assert_array_equal(img, exact, err_msg=rel)


def test_pillow_backend_gives_uint8_bgr(image_tree):
    root, expected, _ = image_tree
    load = LoadImageFromFileSafe(imdecode_backend='pillow')
    for rel in expected:
        img = load(dict(img_path=str(root / rel)))['img']
        assert img.dtype == np.uint8 and img.shape == (H, W, 3), rel
    np.testing.assert_array_equal(
        load(dict(img_path=str(root / 'g_rgba.png')))['img'],
        expected['g_rgba.png'])


def test_bad_files_raise_typed_error(image_tree, tmp_path):
    _, _, bad = image_tree
    load = LoadImageFromFileSafe()
    for path in sorted(bad) + [str(tmp_path / 'missing.png')]:
        with pytest.raises(UnreadableImageError) as info:
            load(dict(img_path=path))
        assert info.value.path == path and path in str(info.value)
    lenient = LoadImageFromFileSafe(ignore_empty=True)
    assert all(lenient(dict(img_path=p)) is None for p in bad)


def test_unreadable_permissions_raise_typed_error(tmp_path, monkeypatch):
    path = tmp_path / 'locked.png'
    Image.fromarray(_rgb(0)).save(path)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: deny it in the backend
        from kiv.datasets.transforms import loading

        def denied(filepath, backend_args=None):
            raise PermissionError(13, 'Permission denied', str(filepath))

        monkeypatch.setattr(loading.fileio, 'get', denied)
    with pytest.raises(UnreadableImageError,
                       match='locked.png.*Permission denied'):
        LoadImageFromFileSafe()(dict(img_path=str(path)))


def test_to_bgr_uint8_conversions():
    gray = _rgb(0)[..., 0]
    for img in (gray, gray[..., None], np.stack([gray, gray // 2], 2)):
        out = to_bgr_uint8(img)
        assert out.shape == (H, W, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 2], gray)
    out = to_bgr_uint8(gray > 127)
    np.testing.assert_array_equal(out[..., 0], (gray > 127) * 255)
    bgr = _rgb(1)
    assert to_bgr_uint8(bgr) is bgr
    with pytest.raises(ValueError, match='float32'):
        to_bgr_uint8(np.zeros((H, W, 3), np.float32))
    with pytest.raises(ValueError, match='shape'):
        to_bgr_uint8(np.zeros((H, W, 5), np.uint8))


def test_loader_and_packer_argument_errors():
    with pytest.raises(ValueError, match='color_type'):
        LoadImageFromFileSafe(color_type='grayscale')
    with pytest.raises(ValueError, match='imdecode_backend'):
        LoadImageFromFileSafe(imdecode_backend='magic')
    with pytest.raises(KeyError, match='LoadImageFromFileSafe'):
        PackImageInputs()(dict(img_path='a.jpg'))
    with pytest.raises(TypeError, match='meta_keys'):
        PackImageInputs(meta_keys='img_path')


def test_pack_image_inputs():
    img = _rgb(3)
    out = PackImageInputs()(dict(img=img[:, ::-1],
                                 img_path='x.png',
                                 ori_shape=(H, W),
                                 img_shape=(H, W),
                                 flip=True,
                                 unrelated=1))
    assert out['inputs'].dtype == torch.uint8
    assert out['inputs'].shape == (3, H, W)
    assert out['inputs'].is_contiguous()
    np.testing.assert_array_equal(out['inputs'].permute(1, 2, 0).numpy(),
                                  img[:, ::-1])
    meta = out['data_samples'].metainfo
    assert meta == dict(img_path='x.png',
                        ori_shape=(H, W),
                        img_shape=(H, W),
                        flip=True,
                        skipped_files=[],
                        skip_causes=[])
    gray = PackImageInputs()(dict(img=img[..., 0]))['inputs']
    assert gray.shape == (1, H, W)


# ------------------------------------------- skipping through dataloaders --
@pytest.mark.parametrize('num_workers', [0, 2])
def test_bad_files_skipped_and_counted(image_tree, num_workers):
    root, expected, bad = image_tree
    dataset = _dataset(root)
    paths = [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))]
    loader = DataLoader(dataset,
                        batch_size=4,
                        shuffle=False,
                        num_workers=num_workers,
                        collate_fn=pseudo_collate)
    seen, skipped = [], set()
    for batch in loader:
        for inputs, sample in zip(batch['inputs'], batch['data_samples']):
            assert inputs.dtype == torch.uint8 and inputs.shape == (3, H, W)
            want_path, want_skipped = _replacement(paths, bad, len(seen))
            assert sample.img_path == want_path
            assert sample.skipped_files == want_skipped
            assert len(sample.skip_causes) == len(want_skipped)
            for path, cause in zip(want_skipped, sample.skip_causes):
                assert cause == ('empty file' if path.endswith('c0_zero.png')
                                 else 'not decodable'), path
            assert sample.ori_shape == sample.img_shape == (H, W)
            seen.append(sample.img_path)
            skipped.update(sample.skipped_files)
    assert len(seen) == len(dataset) == len(expected) + len(bad)
    assert skipped == bad
    assert not bad & set(seen)


# ------------------------------------------------------------------ hook --
class ToyModel(BaseModel):
    """A 1x1 conv trained to output zeros."""

    def __init__(self):
        super().__init__(data_preprocessor=dict(type='ImgDataPreprocessor'))
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.conv(inputs / 255)
        if mode == 'loss':
            return dict(loss=out.pow(2).mean())
        return out


def _run(root, tmp_path, name, train_cfg, hook, sampler, batch_size):
    runner = Runner(
        model=ToyModel(),
        work_dir=str(tmp_path / name),
        experiment_name=f'{name}_{tmp_path.name}',
        train_dataloader=dict(dataset=dict(
            type='kiv.UnlabeledImageDataset',
            data_root=str(root),
            pipeline=[LOAD, dict(type='mmcv.Resize', scale=(8, 8)), PACK]),
                              sampler=dict(type=sampler, shuffle=False),
                              collate_fn=dict(type='pseudo_collate'),
                              batch_size=batch_size,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=None),
        custom_hooks=[hook],
        log_level='INFO')
    runner.train()
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        lines = [
            ln for ln in f
            if 'BadImageReportHook:' in ln and 'in this run' not in ln
        ]
    history = runner.message_hub.get_scalar('train/skipped_images').data[0]
    return lines, history.tolist()


def test_hook_reports_once_per_epoch(image_tree, tmp_path):
    root, _, bad = image_tree
    lines, history = _run(root, tmp_path, 'epochs',
                          dict(by_epoch=True, max_epochs=2),
                          dict(type='kiv.BadImageReportHook', max_paths=2),
                          'DefaultSampler', 4)
    assert history == [3, 3]
    assert len(lines) == 2
    first_two = ', '.join(sorted(bad)[:2])
    assert 'WARNING' in lines[0]
    assert ('3 unreadable image file(s) skipped in train iterations 1-4 '
            f'(not decodable: 2, empty file: 1): {first_two} (+1 more)'
            ) in lines[0]
    assert 'train iterations 5-8' in lines[1]


def test_hook_interval_in_iteration_based_run(image_tree, tmp_path):
    root, _, bad = image_tree
    dataset = _dataset(root)
    paths = [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))]
    # InfiniteSampler(shuffle=False) cycles 0..13, one sample per iteration;
    # reports after iterations 3, 6, 9, 12 (interval) and 14 (end of run)
    windows = [
        range(0, 3),
        range(3, 6),
        range(6, 9),
        range(9, 12),
        range(12, 14)
    ]
    want = [
        len({p
             for i in w
             for p in _replacement(paths, bad, i)[1]}) for w in windows
    ]
    # bad files sit at indices 2, 12, 13: periods with and without skips
    assert want == [1, 0, 0, 0, 2]
    lines, history = _run(root, tmp_path, 'iters',
                          dict(by_epoch=False, max_iters=14),
                          dict(type='kiv.BadImageReportHook', interval=3),
                          'InfiniteSampler', 1)
    assert history == want
    assert len(lines) == 2
    assert '1 unreadable image file(s) skipped in train iterations 1-3 ' \
        '(empty file: 1):' in lines[0]
    assert '2 unreadable image file(s) skipped in train iterations 13-14 ' \
        '(not decodable: 2):' in lines[1]


def test_hook_arguments_and_batches_without_skips():
    with pytest.raises(ValueError, match='interval'):
        BadImageReportHook(interval=0)
    with pytest.raises(ValueError, match='max_paths'):
        BadImageReportHook(max_paths=-1)
    assert isinstance(HOOKS.build(dict(type='kiv.BadImageReportHook')),
                      BadImageReportHook)
    assert list(skipped_files_in_batch(None)) == []
    assert list(skipped_files_in_batch(dict(inputs=[]))) == []
    batch = pseudo_collate([
        PackImageInputs()(dict(img=_rgb(0), skipped_files=['a.jpg', 'b.png'])),
        PackImageInputs()(dict(img=_rgb(1)))
    ])
    assert list(skipped_files_in_batch(batch)) == ['a.jpg', 'b.png']
