"""Computing and writing the shards of a teacher cache.

A shard holds the targets of a contiguous range of images (``K`` views
each, rows ordered by image then view), the view parameters, the storage
rounding checks and, in a side file written just before it, the statistic
sums of its stored targets (see :mod:`kiv.fileio.teacher_cache_format`).
:class:`ShardWriter` computes this rank's shards: images are loaded and
their views rendered by :class:`ImageViews` (a view depends only on ``(seed,
image, view)``), batches never straddle shards, and a shard file appears
atomically once complete, so its bytes do not depend on the run, rank or
resume that wrote it.
"""
from __future__ import annotations

import json
import os.path as osp
from collections.abc import Callable, Mapping, Sequence

import torch
from mmengine.registry import DefaultScope
from mmengine.utils import ProgressBar
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kiv.fileio.teacher_cache_format import (CACHE_FORMAT, CACHE_VERSION,
                                             STORAGE_DTYPES, ImageList,
                                             TeacherCacheError, open_shard,
                                             output_keys, shard_metadata,
                                             shard_name, shard_stats_name,
                                             write_safetensors_atomic)
from kiv.registry import TRANSFORMS
from kiv.structures import FeatureOutput
from ..transforms import UnreadableImageError
from .plan import shard_images
from .reuse import ReusedTargets, compute_with_reuse
from .statistics import TargetStatistics, rounding_sums
from .views import view_rng

__all__ = ['ImageViews', 'ShardWriter', 'shard_done']


def _collate_list(batch: list) -> list:
    return batch


class ImageViews(Dataset):
    """Loads one image and renders its ``K`` seeded views (writer input).

    Args:
        paths (Sequence[str]): full image paths, indexed by global image
            index.
        loader (dict): loading transform config.
        view (dict): ``kiv.ReplayView`` config.
        pack (dict): packing transform config.
        views (int): views per image.
        seed (int): the cache's seed.
        scope (str): registry scope the transforms are built in (the
            config's ``default_scope``, as in training).
    """

    def __init__(self, paths: Sequence[str], loader: dict, view: dict,
                 pack: dict, views: int, seed: int,
                 scope: str = 'kiv') -> None:
        with DefaultScope.overwrite_default_scope(scope):
            self.loader = TRANSFORMS.build(loader)
            self.view = TRANSFORMS.build(view)
            self.pack = TRANSFORMS.build(pack)
        self.paths = paths
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            results = self.loader({'img_path': path})
        except UnreadableImageError as err:
            return dict(index=index, error=str(err))
        if results is None:
            return dict(index=index, error=f'cannot load image {path!r}')
        img = results['img']
        inputs, params = [], []
        for v in range(self.views):
            p = self.view.sample(img.shape[:2], view_rng(self.seed, index, v))
            packed = self.pack({'img': self.view.apply(img, p, path)})
            inputs.append(packed['inputs'])
            params.append(p)
        return dict(index=index, inputs=inputs, params=params, error=None)


class _ShardBuffer:
    """Accumulates one shard's rows before it is written."""

    def __init__(self, shard: int, keys: Sequence[str]) -> None:
        self.shard = shard
        self.targets: dict[str, list[Tensor]] = {k: [] for k in keys}
        self.rows: dict[str, list] = {k: [] for k in (
            'image', 'view', 'box', 'flip', 'image_hw')}
        self.sums: dict[str, Tensor] = {}
        self.checks: dict[str, Tensor] = {}
        self.skipped: list[int] = []
        self.images_done = 0


def shard_done(out_dir: str, shard: int, cache_id: str) -> bool:
    """Whether shard ``shard`` of cache ``cache_id`` is on disk.

    A damaged file counts as missing (it is rewritten); a shard of another
    cache raises :class:`TeacherCacheError`.
    """
    path = osp.join(out_dir, shard_name(shard))
    if not osp.isfile(path):
        return False
    try:
        handle = open_shard(path)
    except TeacherCacheError:
        return False  # damaged file: redo (os.replace overwrites it)
    shard_metadata(handle, path, cache_id)
    return True


def target_shape(index: Mapping, key: str) -> tuple[int, ...]:
    """Shape of one stored row of target ``key`` (without the batch)."""
    name, kind, *level = key.split('.')
    entry = index['teachers'][name]
    if kind == 'summary':
        return (entry['summary_dim'], )
    i = int(level[0])
    return (entry['feature_dims'][i], *entry['grids'][i])


class ShardWriter:
    """Computes and writes shards of one cache (one rank's share).

    Args:
        index (Mapping): the cache index (the plan).
        out_dir (str): the cache directory.
        paths (Sequence[str]): the image paths relative to the index's image
            root.
        run_teachers (Callable): packed views -> raw outputs per teacher
            (:class:`~kiv.datasets.teacher_cache.teachers.ConfigTeachers`).
        statistics (TargetStatistics): the standardiser sums.
        batch_size (int): views per teacher forward.
        num_workers (int): image-loading workers.
        scope (str): registry scope of the transforms.
        log (Callable[[str], None]): where messages go.
        progress (bool): show a progress bar. Defaults to False.
        reused (ReusedTargets, optional): teachers whose outputs are read
            from other caches instead of computed. Defaults to None.
    """

    def __init__(self, index: Mapping, out_dir: str, paths: Sequence[str],
                 run_teachers: Callable[[list[Tensor]],
                                        dict[str, FeatureOutput]],
                 statistics: TargetStatistics, batch_size: int,
                 num_workers: int, scope: str,
                 log: Callable[[str], None], progress: bool = False,
                 reused: ReusedTargets | None = None) -> None:
        self.index = index
        self.reused = reused
        self.out_dir = out_dir
        self.paths = paths
        self.run_teachers = run_teachers
        self.statistics = statistics
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.scope = scope
        self.log = log
        self.progress = progress
        self.dtype = index['dtype']
        self.storage_dtype = STORAGE_DTYPES[self.dtype]
        self.views = index['views']

    def write(self, shards: Sequence[int]) -> None:
        """Compute and write ``shards``."""
        if not shards:
            return
        root = self.index['images']['root']
        full_paths = ImageList([osp.join(root, p) if root else p
                                for p in self.paths])
        source = ImageViews(full_paths, self.index['loader'],
                            self.index['view'], self.index['pack'],
                            self.views, self.index['seed'], self.scope)
        per_batch = max(1, self.batch_size // self.views)
        batches = []
        for shard in shards:
            images = list(shard_images(self.index, shard))
            batches += [images[i:i + per_batch]
                        for i in range(0, len(images), per_batch)]
        loader = DataLoader(source, batch_sampler=batches,
                            num_workers=self.num_workers,
                            collate_fn=_collate_list)
        keys = [k for name, e in self.index['teachers'].items()
                for k in output_keys(name, e['summary_dim'] is not None,
                                     len(e['feature_dims']))]
        num_images = sum(len(shard_images(self.index, s)) for s in shards)
        bar = ProgressBar(num_images) if self.progress else None
        queue = list(shards)
        buffer = _ShardBuffer(queue.pop(0), keys)
        for batch in loader:
            self._add_batch(buffer, batch)
            if bar is not None:
                bar.update(len(batch))
            if buffer.images_done == len(shard_images(self.index,
                                                      buffer.shard)):
                self._flush(buffer)
                if queue:
                    buffer = _ShardBuffer(queue.pop(0), keys)
        if bar is not None:
            bar.file.write('\n')
            bar.file.flush()

    def _add_batch(self, buffer: _ShardBuffer, batch: list[dict]) -> None:
        """Run the teachers on one batch of images and buffer the rows."""
        buffer.images_done += len(batch)
        good = [item for item in batch if item['error'] is None]
        for item in batch:
            if item['error'] is not None:
                buffer.skipped.append(item['index'])
                self.log(f'\nskipping unreadable image: {item["error"]}')
        if not good:
            return
        inputs = [t for item in good for t in item['inputs']]
        outputs, reused = compute_with_reuse(
            self.run_teachers, self.reused, inputs,
            [item['index'] for item in good], self.views)
        rounded = {}
        for name, out in outputs.items():
            keys = output_keys(name, out.summary is not None,
                               len(out.features))
            tensors = ([out.summary] if out.summary is not None else []) + \
                list(out.features)
            stored = []
            for key, original in zip(keys, tensors):
                value = original.to(self.storage_dtype)
                if not torch.isfinite(value).all():
                    images = [self.paths[item['index']] for item in good]
                    if not torch.isfinite(original).all():
                        raise TeacherCacheError(
                            f'teacher output {key!r} is NaN/Inf for one of '
                            f'the images {images}; check the teacher (its '
                            'weights, dtype) and these images')
                    raise TeacherCacheError(
                        f'teacher output {key!r} of the images {images} '
                        f'does not fit in {self.dtype} (max |x| = '
                        f'{original.abs().max().item():.4g}); use --dtype '
                        'bf16 or fp32')
                buffer.targets[key].append(value.cpu())
                stored.append(value.float())
                if name in reused:  # stored already: its cache measured it
                    continue
                check = rounding_sums(original, stored[-1])
                if key in buffer.checks:
                    buffer.checks[key] += check
                else:
                    buffer.checks[key] = check
            summary = stored.pop(0) if out.summary is not None else None
            rounded[name] = FeatureOutput(summary, tuple(stored))
        # statistics of exactly what is stored (the rounded targets)
        for key, value in self.statistics.sums(rounded).items():
            value = value.detach().double().cpu()
            if key in buffer.sums:
                buffer.sums[key] += value
            else:
                buffer.sums[key] = value.clone()
        for item in good:
            for v, params in enumerate(item['params']):
                buffer.rows['image'].append(item['index'])
                buffer.rows['view'].append(v)
                buffer.rows['box'].append(list(params.box))
                buffer.rows['flip'].append(int(params.flip))
                buffer.rows['image_hw'].append(list(params.image_hw))

    def _flush(self, buffer: _ShardBuffer) -> None:
        """Write one finished shard atomically."""
        index = self.index
        tensors: dict[str, Tensor] = {}
        for key, parts in buffer.targets.items():
            if parts:
                tensors[f'target.{key}'] = torch.cat(parts)
            else:
                tensors[f'target.{key}'] = torch.empty(
                    (0, *target_shape(index, key)), dtype=self.storage_dtype)
        rows = buffer.rows
        tensors['view.image'] = torch.tensor(rows['image'], dtype=torch.int64)
        tensors['view.view'] = torch.tensor(rows['view'], dtype=torch.int64)
        tensors['view.box'] = torch.tensor(
            rows['box'], dtype=torch.int64).reshape(-1, 4)
        tensors['view.flip'] = torch.tensor(rows['flip'], dtype=torch.uint8)
        tensors['view.image_hw'] = torch.tensor(
            rows['image_hw'], dtype=torch.int64).reshape(-1, 2)
        sums = {
            f'stats.{key}': buffer.sums.get(
                key, torch.zeros(numel, dtype=torch.float64))
            for key, numel in index['statistics']['numel'].items()
        }
        reused = set(self.reused.teachers) if self.reused else set()
        for key in buffer.targets:
            if key.split('.', 1)[0] in reused:
                continue  # see ReusedTargets.rounding_errors
            tensors[f'check.{key}'] = buffer.checks.get(
                key, torch.zeros(3 + target_shape(index, key)[0],
                                 dtype=torch.float64))
        images = shard_images(index, buffer.shard)
        metadata = dict(format=CACHE_FORMAT, version=str(CACHE_VERSION),
                        cache_id=index['cache_id'], shard=str(buffer.shard),
                        first_image=str(images.start),
                        num_images=str(len(images)),
                        skipped=json.dumps(buffer.skipped))
        # the shard file is the commit point: its statistics are on disk
        # before it, so a finished shard always has them
        write_safetensors_atomic(
            sums, osp.join(self.out_dir, shard_stats_name(buffer.shard)),
            dict(metadata, kind='shard-statistics'))
        write_safetensors_atomic(
            tensors, osp.join(self.out_dir, shard_name(buffer.shard)),
            metadata)
