"""No file or folder in the image folder can stop a run.

Symlink loops, unreadable folders, entries that vanish during the scan or
before they are read, and decompression bombs are skipped, counted and named
once; the final report of ``kiv.BadImageReportHook`` lists every cause.

Unreadable folders: the tests run as root, for whom ``chmod 000`` changes
nothing, so besides ``chmod 000`` they deny the listing of that one folder by
wrapping ``os.scandir`` (what the scan calls); as a normal user the real
permission bits do it.
"""
import errno
import os
import os.path as osp
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from mmengine.fileio import list_dir_or_file
from mmengine.model import BaseModel
from mmengine.runner import Runner
from PIL import Image

from kiv.datasets import (DEFAULT_MAX_PIXELS, LoadImageFromFileSafe,
                          UnlabeledImageDataset, UnreadableImageError,
                          header_pixels)
from kiv.datasets import unlabeled_image_dataset as dataset_module
from kiv.datasets.transforms import loading

LOAD = dict(type='kiv.LoadImageFromFileSafe')
PACK = dict(type='kiv.PackImageInputs')


def _png(path, seed=0, size=(6, 10)) -> None:
    """A small real RGB PNG."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size + (3, ),
                                 dtype=np.uint8)).save(path)


def write_png_bomb(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels.

    The pixel rows are zeros streamed through zlib, so writing it is fast
    and the file is small (30000 x 30000: about 110 KB, 0.4 s), while a
    decoder would allocate ``width * height * 3`` bytes (2.7 GB) for BGR.
    """
    row = b'\x00' * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts += [comp.compress(row * (height % 1000)), comp.flush()]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + tag + data +
                struct.pack('>I', zlib.crc32(tag + data)))

    ihdr = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
                chunk(b'IDAT', b''.join(parts)) + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def bomb(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('bomb') / 'bomb.png')
    write_png_bomb(path, 30000, 30000)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any call of the pixel decoder fail the test."""
    calls = []

    def decoder(*args, **kwargs):
        calls.append(args)
        raise AssertionError('the pixel decoder was called')

    monkeypatch.setattr(loading.mmcv, 'imfrombytes', decoder)
    return calls


def deny_listing(monkeypatch, folder) -> None:
    """``chmod 000`` ``folder``; as root also deny ``os.scandir`` on it."""
    folder = str(folder)
    os.chmod(folder, 0)
    if os.geteuid() != 0:
        return
    real_scandir = os.scandir

    def scandir(path='.'):
        if osp.realpath(str(path)) == osp.realpath(folder):
            raise PermissionError(errno.EACCES, 'Permission denied',
                                  str(path))
        return real_scandir(path)

    monkeypatch.setattr(dataset_module.os, 'scandir', scandir)


def record_logs(monkeypatch) -> list:
    """Collect ``(message, level)`` of the dataset module's log calls."""
    logs = []

    def print_log(msg, logger=None, level=20):
        logs.append((msg, level))

    monkeypatch.setattr(dataset_module, 'print_log', print_log)
    return logs


def _paths(dataset):
    return [
        osp.relpath(dataset.get_data_info(i)['img_path'], dataset.img_dir)
        for i in range(len(dataset))
    ]


# ------------------------------------------------------------------ scan --
def test_symlink_loops_do_not_stop_the_scan(tmp_path, monkeypatch):
    root = tmp_path / 'images'
    (root / 'sub' / 'deeper').mkdir(parents=True)
    _png(root / 'a.png')
    _png(root / 'sub' / 'b.png')
    _png(root / 'sub' / 'deeper' / 'c.png')
    os.symlink('..', root / 'sub' / 'deeper' / 'up')  # loop to a parent
    os.symlink('.', root / 'sub' / 'here')  # loop to itself
    os.symlink('self.jpg', root / 'self.jpg')  # a link to itself (ELOOP)
    os.symlink('sub', root / 'alias')  # second path to a listed folder
    os.symlink('nowhere.png', root / 'broken.png')  # dangling link
    outside = tmp_path / 'outside'
    outside.mkdir()
    _png(outside / 'd.png')
    os.symlink(str(outside), root / 'linked')  # a linked folder: followed
    # mmengine's scan (what the dataset used before) dies on this folder
    with pytest.raises(OSError) as err:
        list(list_dir_or_file(str(root), list_dir=False, recursive=True))
    assert err.value.errno == errno.ELOOP

    logs = record_logs(monkeypatch)
    dataset = UnlabeledImageDataset(data_root=str(root),
                                    pipeline=[LOAD, PACK])
    assert _paths(dataset) == [
        'a.png', 'linked/d.png', 'sub/b.png', 'sub/deeper/c.png'
    ]
    join = dataset_module.fileio.join_path
    assert dataset.scan_skipped == {
        'broken symlink': [join(dataset.img_dir, 'broken.png')],
        'symlink loop': [
            join(dataset.img_dir, p)
            for p in ('self.jpg', 'sub/deeper/up', 'sub/here')
        ],
        'symlink to a folder already scanned': [
            join(dataset.img_dir, 'alias')
        ],
    }
    warnings = [msg for msg, level in logs if level >= 30]
    assert len(warnings) == 1  # ONE line for all of them
    assert ('skipped 5 entries: broken symlink: 1 (' in warnings[0])
    for rel in ('self.jpg', 'sub/deeper/up', 'sub/here', 'alias',
                'broken.png'):
        assert rel in warnings[0]
    assert dataset[0]['inputs'].shape == (3, 6, 10)


def test_unreadable_folder_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / 'images'
    (root / 'locked').mkdir(parents=True)
    (root / 'open').mkdir()
    _png(root / 'locked' / 'hidden_from_us.png')
    _png(root / 'open' / 'b.png')
    _png(root / 'a.png')
    deny_listing(monkeypatch, root / 'locked')
    logs = record_logs(monkeypatch)
    try:
        dataset = UnlabeledImageDataset(data_root=str(root))
    finally:
        os.chmod(root / 'locked', 0o755)
    assert _paths(dataset) == ['a.png', 'open/b.png']
    assert list(dataset.scan_skipped) == ['unreadable folder']
    assert dataset.scan_skipped['unreadable folder'][0].endswith('locked')
    assert [msg for msg, level in logs if level >= 30] == [
        dataset.scan_summary()
    ]
    assert 'unreadable folder: 1 (' in dataset.scan_summary()


def test_unreadable_top_folder_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / 'images'
    root.mkdir()
    _png(root / 'a.png')
    deny_listing(monkeypatch, root)
    try:
        with pytest.raises(PermissionError,
                           match=f'cannot list the image folder.*{root}'):
            UnlabeledImageDataset(data_root=str(root))
    finally:
        os.chmod(root, 0o755)


def test_folder_vanishing_during_the_scan(tmp_path, monkeypatch):
    root = tmp_path / 'images'
    (root / 'gone').mkdir(parents=True)
    _png(root / 'gone' / 'x.png')
    _png(root / 'a.png')
    real_scandir = os.scandir

    def scandir(path='.'):  # another process deletes it right now
        if str(path).endswith('gone'):
            shutil.rmtree(path)
        return real_scandir(path)

    monkeypatch.setattr(dataset_module.os, 'scandir', scandir)
    dataset = UnlabeledImageDataset(data_root=str(root))
    assert _paths(dataset) == ['a.png']
    assert list(dataset.scan_skipped) == ['vanished during the scan']


def test_files_vanishing_before_reading_are_skipped(tmp_path):
    root = tmp_path / 'images'
    root.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        _png(root / name)
    dataset = UnlabeledImageDataset(data_root=str(root),
                                    pipeline=[LOAD, PACK])
    os.remove(root / 'a.png')  # deleted after the listing
    sample = dataset[0]
    assert sample['data_samples'].img_path.endswith('b.png')
    assert sample['data_samples'].skipped_files == [str(root / 'a.png')]
    assert sample['data_samples'].skip_causes == ['missing file']


def test_meta_file_entries_are_checked_at_load_time(tmp_path, monkeypatch):
    """ImageNet's meta/train.txt: no scan, missing files skipped later."""
    root = tmp_path / 'imagenet'
    (root / 'train' / 'n01').mkdir(parents=True)
    (root / 'meta').mkdir()
    _png(root / 'train' / 'n01' / 'a.JPEG')
    (root / 'meta' / 'train.txt').write_text(
        'n01/missing.JPEG 0\nn01/a.JPEG 0\n')

    def no_scan(*args, **kwargs):
        raise AssertionError('the folder was scanned')

    monkeypatch.setattr(dataset_module.os, 'scandir', no_scan)
    dataset = UnlabeledImageDataset(data_root=str(root),
                                    ann_file='meta/train.txt',
                                    data_prefix=dict(img_path='train'),
                                    extensions=('.jpeg', ),
                                    pipeline=[LOAD, PACK])
    assert len(dataset) == 2 and dataset.scan_skipped == {}
    sample = dataset[0]['data_samples']
    assert sample.img_path == str(root / 'train' / 'n01' / 'a.JPEG')
    assert sample.skip_causes == ['missing file']


# ------------------------------------------------------------ pixel cap --
def test_decompression_bomb_is_refused_before_decoding(bomb, no_decoding):
    assert osp.getsize(bomb) < 200_000  # ~110 KB on disk, 900 Mpx
    with pytest.raises(UnreadableImageError,
                       match='bomb.png.*900000000 pixels.*max_pixels') as err:
        LoadImageFromFileSafe()(dict(img_path=bomb))
    assert err.value.cause == 'too many pixels'
    assert no_decoding == []
    with pytest.raises(UnreadableImageError, match='max_pixels'):
        LoadImageFromFileSafe(imdecode_backend='pillow')(dict(img_path=bomb))
    assert no_decoding == []
    # a larger cap is honoured: the file goes to the decoder
    with pytest.raises(UnreadableImageError, match='decoder was called'):
        LoadImageFromFileSafe(max_pixels=10**9)(dict(img_path=bomb))
    assert len(no_decoding) == 1


def test_pixel_cap_reads_only_the_header(tmp_path, no_decoding):
    # 10000 x 10000: above Pillow's warning size, below its hard limit
    path = str(tmp_path / 'big.png')
    write_png_bomb(path, 10000, 10000)
    assert header_pixels(open(path, 'rb').read()) == (10**8, '10000x10000')
    with pytest.raises(UnreadableImageError,
                       match=r'10000x10000 = 100000000 pixels'):
        LoadImageFromFileSafe()(dict(img_path=path))
    assert no_decoding == []
    assert header_pixels(b'not an image') == (None, '')
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485


def test_pixel_cap_is_configurable(tmp_path):
    path = str(tmp_path / 'small.png')
    _png(path, size=(12, 20))  # 240 pixels
    with pytest.raises(UnreadableImageError, match='12 = 240 pixels') as err:
        LoadImageFromFileSafe(max_pixels=239)(dict(img_path=path))
    assert err.value.cause == 'too many pixels'
    for cap in (240, None):
        img = LoadImageFromFileSafe(max_pixels=cap)(dict(img_path=path))
        assert img['img'].shape == (12, 20, 3)
    assert LoadImageFromFileSafe(max_pixels=239, ignore_empty=True)(
        dict(img_path=path)) is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match='max_pixels'):
            LoadImageFromFileSafe(max_pixels=bad)
    assert 'max_pixels=240' in repr(LoadImageFromFileSafe(max_pixels=240))


# ---------------------------------------------------------- the report --
class ToyModel(BaseModel):

    def __init__(self):
        super().__init__(data_preprocessor=dict(type='ImgDataPreprocessor'))
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.conv(inputs / 255)
        if mode == 'loss':
            return dict(loss=out.pow(2).mean())
        return out


def test_final_report_lists_every_cause(tmp_path, monkeypatch, bomb):
    root = tmp_path / 'images'
    (root / 'locked').mkdir(parents=True)
    for i in range(4):
        _png(root / f'good{i}.png', seed=i)
    _png(root / 'locked' / 'x.png')
    shutil.copy(bomb, root / 'bomb.png')
    (root / 'empty.jpg').write_bytes(b'')
    (root / 'html.png').write_text('<html><body>404</body></html>')
    _png(root / 'vanishing.png')
    os.symlink('.', root / 'loop')
    os.symlink('nowhere.jpg', root / 'broken.jpg')
    deny_listing(monkeypatch, root / 'locked')

    runner = Runner(
        model=ToyModel(),
        work_dir=str(tmp_path / 'work'),
        experiment_name=f'report_{tmp_path.name}',
        train_dataloader=dict(dataset=dict(
            type='kiv.UnlabeledImageDataset',
            data_root=str(root),
            pipeline=[LOAD, dict(type='mmcv.Resize', scale=(8, 8)), PACK]),
                              sampler=dict(type='DefaultSampler',
                                           shuffle=False),
                              collate_fn=dict(type='pseudo_collate'),
                              batch_size=2,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=None),
        custom_hooks=[dict(type='kiv.BadImageReportHook')],
        log_level='INFO')
    try:
        dataset = runner.train_dataloader.dataset  # scans the folder now
    finally:
        os.chmod(root / 'locked', 0o755)
    assert len(dataset) == 8
    os.remove(root / 'vanishing.png')  # gone between listing and reading
    runner.train()
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        lines = [ln for ln in f if 'in this run' in ln]
    assert len(lines) == 1
    final = lines[0]
    assert 'WARNING' in final
    assert ('BadImageReportHook: 7 image file(s) or folder(s) skipped in '
            'this run; at the folder scan: broken symlink: 1, symlink '
            'loop: 1, unreadable folder: 1; at loading: ') in final
    for cause in ('empty file: 1', 'missing file: 1', 'not decodable: 1',
                  'too many pixels: 1'):
        assert cause in final
