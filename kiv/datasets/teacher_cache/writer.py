"""Write the teacher-feature cache of a distillation config.

:class:`TeacherCacheWriter` runs every teacher of a
``kiv.KnowledgeInheritance`` config once over its train dataset, ``K``
deterministic views per image, and writes the shards, the index and the
exact standardiser statistics (see :mod:`.format`). ``tools/cache_teachers.py``
is its command line.

Resuming and ranks: the work is cut into shards of ``shard_size`` images
planned up front; a shard is done iff its file exists (files appear
atomically), so a killed run keeps its finished shards and the next run
redoes only the missing ones. Pending shards are dealt round-robin to the
ranks of mmengine's launcher. Batches never straddle shards and a view's
parameters depend only on ``(seed, image, view)``, so the bytes of a shard
do not depend on the run, rank or resume that wrote it.
"""
from __future__ import annotations

import datetime
import glob
import json
import math
import os
import os.path as osp
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.config import Config, ConfigDict
from mmengine.dist import barrier, broadcast_object_list, get_dist_info
from mmengine.registry import DefaultScope
from mmengine.utils import ProgressBar
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kiv.fileio.teacher_cache_format import (
    CACHE_FORMAT, CACHE_VERSION, IMAGES_FILE, INDEX_FILE, STATISTICS_FILE,
    STORAGE_DTYPES, ImageList, TeacherCacheError, config_to_json, fingerprint,
    open_shard, output_keys, read_index, save_statistics, shard_metadata,
    shard_name, shard_stats_name, write_image_list, write_json_atomic,
    write_safetensors_atomic)
from kiv.fileio.teacher_cache_identity import (dataset_fingerprint,
                                               teacher_fingerprint)
from kiv.registry import DATASETS, MODELS, TRANSFORMS
from kiv.structures import FeatureOutput
from kiv.version import __version__
from ..transforms import UnreadableImageError
from .config import online_config
from .views import split_pipeline, view_rng

__all__ = ['TeacherCacheWriter', 'format_bytes', 'VIEW_ROW_BYTES',
           'DEFAULT_SHARD_BYTES']

#: bytes of the view description of one cached view: image (int64), view
#: (int64), box (4 x int64), flip (uint8), image_hw (2 x int64).
VIEW_ROW_BYTES = 8 + 8 + 4 * 8 + 1 + 2 * 8
#: relative rounding error above which the writer warns (see
#: ``index['rounding_error']``).
ROUNDING_WARN = 0.01
#: target size of one shard when ``shard_size`` is not given.
DEFAULT_SHARD_BYTES = 1 << 30


def format_bytes(num: float) -> str:
    """Human-readable size with binary prefixes, e.g. ``'1.50 GiB'``."""
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(num) < 1024 or unit == 'TiB':
            return f'{num:.0f} {unit}' if unit == 'B' else \
                f'{num:.2f} {unit}'
        num /= 1024
    raise AssertionError('unreachable')


def _collate_list(batch: list) -> list:
    return batch


class _ImageViews(Dataset):
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


class TeacherCacheWriter:
    """Cache every teacher of a distillation config over its train data.

    Args:
        cfg (Config): a ``kiv.KnowledgeInheritance`` config (teachers,
            latent space, data preprocessor, ``train_dataloader``).
        out_dir (str): the cache directory.
        views (int): augmented views per image ``K``. Defaults to 1.
        dtype (str): storage dtype, ``'fp16'``, ``'bf16'`` or ``'fp32'``.
            Defaults to ``'fp16'``.
        shard_size (int, optional): images per shard. Defaults to the
            existing cache's, else as many as fit in about 1 GiB.
        seed (int): seed of the views. Defaults to 0.
        batch_size (int, optional): views per teacher forward. Defaults to
            ``train_dataloader.batch_size``.
        num_workers (int, optional): image-loading workers. Defaults to
            ``train_dataloader.num_workers``.
        device (str, optional): where the teachers run. Defaults to the
            local GPU if there is one, else the CPU.
        config_path (str, optional): the config file, recorded in the
            index (and in messages).
        log (Callable[[str], None], optional): where messages go. Defaults
            to ``print`` on rank 0.
    """

    def __init__(self,
                 cfg: Config,
                 out_dir: str,
                 views: int = 1,
                 dtype: str = 'fp16',
                 shard_size: int | None = None,
                 seed: int = 0,
                 batch_size: int | None = None,
                 num_workers: int | None = None,
                 device: str | None = None,
                 config_path: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not isinstance(views, int) or views < 1:
            raise ValueError(f'views must be an int >= 1, got {views!r}')
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f'dtype must be one of {list(STORAGE_DTYPES)}, '
                             f'got {dtype!r}')
        if shard_size is not None and shard_size < 1:
            raise ValueError(f'shard_size must be >= 1, got {shard_size}')
        self.cfg = online_config(cfg)
        self.out_dir = out_dir
        self.views = views
        self.dtype = dtype
        self.storage_dtype = STORAGE_DTYPES[dtype]
        self.requested_shard_size = shard_size
        self.seed = int(seed)
        loader_cfg = cfg.get('train_dataloader') or {}
        self.batch_size = int(batch_size or loader_cfg.get('batch_size', 1))
        self.num_workers = int(loader_cfg.get('num_workers', 0)
                               if num_workers is None else num_workers)
        self.rank, self.world_size = get_dist_info()
        if device is None:
            device = f'cuda:{torch.cuda.current_device()}' \
                if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        self.config_path = config_path
        self._log = log or (lambda msg: print(msg, flush=True)
                            if self.rank == 0 else None)
        self.model: Any = None
        self.index: dict | None = None

    # ----------------------------------------------------------------- plan
    def _check_config(self) -> None:
        model = self.cfg.get('model')
        if not isinstance(model, Mapping) or not model.get('teachers'):
            raise TeacherCacheError(
                f'{self.config_path or "the config"}: model.teachers is '
                'missing; tools/cache_teachers.py needs a '
                'kiv.KnowledgeInheritance config')
        cached = [n for n, t in model['teachers'].items()
                  if str(t.get('type', '')).endswith('CachedTeacher')]
        if cached:
            raise TeacherCacheError(
                f'teachers {cached} already read from a cache '
                '(kiv.CachedTeacher); give the config with the real teachers')
        if not self.cfg.get('train_dataloader', {}).get('dataset'):
            raise TeacherCacheError('the config has no '
                                    'train_dataloader.dataset to cache')

    @property
    def _scope(self) -> str:
        """The registry scope of the config (``default_scope``)."""
        return self.cfg.get('default_scope', None) or 'kiv'

    def _build_model(self) -> None:
        """The distiller: its teachers, latent space and preprocessor."""
        with DefaultScope.overwrite_default_scope(self._scope):
            model = MODELS.build(self.cfg.model)
        for attr in ('student', 'task_heads'):  # not needed: free them
            if hasattr(model, attr):
                delattr(model, attr)
        self.model = model.to(self.device).eval()

    def _image_list(self) -> tuple[str, list[str]]:
        """The train dataset's images.

        Returns:
            tuple[str, list[str]]: the image folder (``img_dir`` of
            ``kiv.UnlabeledImageDataset``, ``''`` for other datasets) and
            the image paths relative to it, in dataset order.
        """
        ds_cfg = ConfigDict({**self.cfg.train_dataloader.dataset,
                             'pipeline': []})
        with DefaultScope.overwrite_default_scope(self._scope):
            dataset = DATASETS.build(ds_cfg)
        if hasattr(dataset, 'full_init'):
            dataset.full_init()
        paths = []
        for i in range(len(dataset)):
            info = dataset.get_data_info(i)
            if 'img_path' not in info:
                raise TeacherCacheError(
                    f'train dataset {type(dataset).__name__} sample {i} has '
                    "no 'img_path'; the cache needs an image dataset such as "
                    'kiv.UnlabeledImageDataset')
            paths.append(info['img_path'])
        root = getattr(dataset, 'img_dir', '') or ''
        prefix = root.rstrip('/') + '/'
        if root and all(p.startswith(prefix) for p in paths):
            return root, [p[len(prefix):] for p in paths]
        return '', paths

    def _probe(self, view: dict, pack: dict) -> tuple[dict, dict]:
        """Teacher output shapes and statistic sizes for one view.

        Returns:
            tuple[dict, dict]: per teacher ``summary_dim``,
            ``feature_dims``, ``feature_strides``, ``grids``; statistic key
            -> packed-sum length.
        """
        h, w = view['scale']
        with DefaultScope.overwrite_default_scope(self._scope):
            packer = TRANSFORMS.build(pack)
        inputs = packer({'img': np.zeros((h, w, 3), np.uint8)})['inputs']
        outputs = self._run_teachers([inputs])
        teachers = {}
        for name, out in outputs.items():
            teacher = self.model.teachers[name]
            teachers[name] = dict(
                summary_dim=None if out.summary is None
                else int(out.summary.shape[1]),
                feature_dims=[int(f.shape[1]) for f in out.features],
                feature_strides=[int(s) for s in teacher.feature_strides],
                grids=[[int(f.shape[2]), int(f.shape[3])]
                       for f in out.features])
        sums = self.model.latent.statistic_sums(outputs)
        return teachers, {k: int(v.numel()) for k, v in sums.items()}

    @torch.no_grad()
    def _run_teachers(self, inputs: list[Tensor]) -> dict[str, FeatureOutput]:
        """Preprocess packed views like the distiller and run every teacher.
        """
        data = self.model.data_preprocessor(
            dict(inputs=inputs, data_samples=None), False)
        images = data['inputs']
        return {name: teacher(images)
                for name, teacher in self.model.teachers.items()}

    def prepare(self) -> dict:
        """Build the teachers, list the images, measure the outputs and make
        the index (not written yet).

        Returns:
            dict: the index with ``complete=False`` and no shard results.
        """
        self._check_config()
        ds_cfg = self.cfg.train_dataloader.dataset
        loader, view, pack = split_pipeline(ds_cfg.get('pipeline', []))
        self._build_model()
        root, paths = self._image_list()
        teachers, stat_sizes = self._probe(view, pack)
        teacher_cfgs = self.cfg.model.teachers
        for name, entry in teachers.items():
            entry['fingerprint'] = teacher_fingerprint(teacher_cfgs[name])
            entry['config'] = config_to_json(teacher_cfgs[name])

        per_view = self._bytes_per_view(teachers)
        shard_size = self._shard_size(per_view, len(paths))
        latent = self.model.latent
        images_sha = ImageList(paths).sha256()
        identity = dict(
            format=CACHE_FORMAT, version=CACHE_VERSION,
            teachers={n: e['fingerprint'] for n, e in teachers.items()},
            view=view, loader=config_to_json(loader), views=self.views,
            seed=self.seed, dtype=self.dtype, images=images_sha,
            shard_size=shard_size, standardize=latent.standardize,
            statistic_keys=list(stat_sizes))
        self.index = dict(
            format=CACHE_FORMAT,
            version=CACHE_VERSION,
            cache_id=fingerprint(identity),
            complete=False,
            config=self.config_path,
            kiv_version=__version__,
            created=datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec='seconds'),
            views=self.views,
            seed=self.seed,
            dtype=self.dtype,
            shard_size=shard_size,
            num_shards=math.ceil(len(paths) / shard_size),
            loader=config_to_json(loader),
            view=view,
            pack=config_to_json(pack),
            dataset=dict(fingerprint=dataset_fingerprint(ds_cfg),
                         config=config_to_json({
                             k: v for k, v in ds_cfg.items()
                             if k != 'pipeline'})),
            images=dict(root=root, count=len(paths), file=IMAGES_FILE,
                        sha256=images_sha),
            teachers=teachers,
            standardize=latent.standardize,
            statistics=dict(file=STATISTICS_FILE, numel=stat_sizes),
            bytes_per_view=per_view,
        )
        self._paths = paths
        self._root = root
        return self.index

    def _bytes_per_view(self, teachers: Mapping[str, Mapping]) -> int:
        item = torch.empty((), dtype=self.storage_dtype).element_size()
        total = VIEW_ROW_BYTES
        for entry in teachers.values():
            if entry['summary_dim'] is not None:
                total += entry['summary_dim'] * item
            for dim, (h, w) in zip(entry['feature_dims'], entry['grids']):
                total += dim * h * w * item
        return total

    def _shard_size(self, per_view: int, num_images: int) -> int:
        if self.requested_shard_size is not None:
            return self.requested_shard_size
        existing = osp.join(self.out_dir, INDEX_FILE)
        if osp.isfile(existing):
            try:
                return int(read_index(self.out_dir,
                                      require_complete=False)['shard_size'])
            except (TeacherCacheError, KeyError, TypeError, ValueError):
                pass
        return max(1, min(num_images,
                          DEFAULT_SHARD_BYTES // (per_view * self.views)))

    # ------------------------------------------------------------- estimate
    def estimate(self) -> dict:
        """Disk use of the cache, from the measured shapes and the dtype.

        Returns:
            dict: ``per_teacher`` (bytes of one view per teacher),
            ``per_view`` (all teachers + view description),
            ``per_image`` (``K`` views), ``checks_per_shard`` (the
            rounding-check sums in each shard), ``num_shards``,
            ``num_images``, ``total`` (the shards without their few-KiB json
            headers; the index and image list come on top),
            ``statistics`` (the statistics file) and ``stats_per_shard``
            (each shard's statistic sums, a side file kept only until the
            cache is complete).
        """
        index = self.index or self.prepare()
        item = torch.empty((), dtype=self.storage_dtype).element_size()
        per_teacher = {}
        for name, entry in index['teachers'].items():
            n = entry['summary_dim'] or 0
            n += sum(d * h * w for d, (h, w) in zip(entry['feature_dims'],
                                                    entry['grids']))
            per_teacher[name] = n * item
        stats = 8 * sum(index['statistics']['numel'].values())
        checks = 8 * sum(3 + d for e in index['teachers'].values()
                         for d in ([e['summary_dim']] if e['summary_dim']
                                   is not None else []) + e['feature_dims'])
        num_images = index['images']['count']
        per_image = index['bytes_per_view'] * self.views
        return dict(per_teacher=per_teacher,
                    per_view=index['bytes_per_view'],
                    per_image=per_image,
                    checks_per_shard=checks,
                    stats_per_shard=stats,
                    num_shards=index['num_shards'],
                    num_images=num_images,
                    total=num_images * per_image +
                    index['num_shards'] * checks,
                    statistics=stats)

    def report(self) -> str:
        """The disk-use report printed before writing (and by --dry-run)."""
        index = self.index or self.prepare()
        est = self.estimate()
        lines = [f'teacher cache {self.out_dir}: {est["num_images"]} images '
                 f'x {self.views} views, {self.dtype}, '
                 f'{est["num_shards"]} shards of {index["shard_size"]} '
                 'images']
        for name, entry in index['teachers'].items():
            shapes = ([f'summary {entry["summary_dim"]}']
                      if entry['summary_dim'] is not None else [])
            shapes += [f'{d}x{h}x{w}' for d, (h, w) in
                       zip(entry['feature_dims'], entry['grids'])]
            lines.append(f'  {name:<12} {", ".join(shapes):<40} '
                         f'{format_bytes(est["per_teacher"][name])} per view')
        lines.append(f'  per view      {format_bytes(est["per_view"])} '
                     f'({est["per_view"]} B, incl. {VIEW_ROW_BYTES} B of '
                     'view parameters)')
        lines.append(f'  per image     {format_bytes(est["per_image"])} '
                     f'({self.views} views)')
        lines.append(f'  total         {format_bytes(est["total"])} '
                     f'({est["total"]} B) + statistics file '
                     f'{format_bytes(est["statistics"])}')
        lines.append(f'  while writing {format_bytes(est["stats_per_shard"])}'
                     ' more per shard (its float64 statistic sums, deleted '
                     'when the cache is complete)')
        return '\n'.join(lines)

    # -------------------------------------------------------------- helpers
    def _compatibility(self, old: Mapping) -> list[str]:
        """What differs between an existing index and this run."""
        new = self.index
        diffs = []
        for name in sorted(set(old.get('teachers', {})) |
                           set(new['teachers'])):
            a = old.get('teachers', {}).get(name, {}).get('fingerprint')
            b = new['teachers'].get(name, {}).get('fingerprint')
            if a is None:
                diffs.append(f'teacher {name!r} is not in the cache')
            elif b is None:
                diffs.append(f'the cache has teacher {name!r}, the config '
                             'does not')
            elif a != b:
                diffs.append(f'teacher {name!r} config differs')
        for key, what in (('views', 'views per image'), ('seed', 'seed'),
                          ('dtype', 'dtype'), ('shard_size', 'shard size'),
                          ('view', 'view transform'),
                          ('loader', 'image loader'),
                          ('standardize', 'standardize mode')):
            if old.get(key) != new[key]:
                diffs.append(f'{what}: cache {old.get(key)!r}, now '
                             f'{new[key]!r}')
        if old.get('images', {}).get('sha256') != new['images']['sha256']:
            diffs.append(f'image list differs (cache '
                         f'{old.get("images", {}).get("count")} images, now '
                         f'{new["images"]["count"]})')
        if old.get('cache_id') != new['cache_id'] and not diffs:
            diffs.append('cache id differs')
        return diffs

    def _shard_done(self, shard: int) -> bool:
        path = osp.join(self.out_dir, shard_name(shard))
        if not osp.isfile(path):
            return False
        try:
            handle = open_shard(path)
        except TeacherCacheError:
            return False  # damaged file: redo (os.replace overwrites it)
        shard_metadata(handle, path, self.index['cache_id'])
        return True

    def _shard_images(self, shard: int) -> range:
        size = self.index['shard_size']
        return range(shard * size,
                     min((shard + 1) * size, self.index['images']['count']))

    def _start(self) -> bool:
        """Rank 0: check/create the directory, index and image list.

        Returns:
            bool: whether the directory already holds this complete cache
            (nothing to do).
        """
        os.makedirs(self.out_dir, exist_ok=True)
        index_path = osp.join(self.out_dir, INDEX_FILE)
        if osp.isfile(index_path):
            old = read_index(self.out_dir, require_complete=False)
            diffs = self._compatibility(old)
            if diffs:
                raise TeacherCacheError(
                    f'{self.out_dir} holds a teacher cache written for '
                    f'another setup ({"; ".join(diffs)}); write to another '
                    '--out directory or delete it')
            if old.get('complete') and all(
                    self._shard_done(s) for s in range(old['num_shards'])):
                self._remove_side_files()  # if the last run died doing it
                return True
            self.index['created'] = old.get('created', self.index['created'])
        for part in glob.glob(osp.join(self.out_dir, '.*.part')):
            os.remove(part)  # left by a killed run
        write_image_list(self._paths, osp.join(self.out_dir, IMAGES_FILE))
        write_json_atomic(self.index, index_path)
        return False

    def _remove_side_files(self) -> None:
        for shard in range(self.index['num_shards']):
            path = osp.join(self.out_dir, shard_stats_name(shard))
            if osp.exists(path):
                os.remove(path)

    def _check_space(self, pending: Sequence[int]) -> None:
        est = self.estimate()
        need = len(pending) * (est['stats_per_shard'] +
                               est['checks_per_shard']) + sum(
            len(self._shard_images(s)) for s in pending) * est['per_image']
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise TeacherCacheError(
                f'the remaining {len(pending)} shards need about '
                f'{format_bytes(need)} but {self.out_dir} has '
                f'{format_bytes(free)} free; use another --out or '
                '--no-space-check')

    # ------------------------------------------------------------------ run
    def run(self, check_space: bool = True) -> dict:
        """Write (or finish) the cache; collective over all ranks.

        Args:
            check_space (bool): refuse to start when the pending shards do
                not fit on the disk. Defaults to True.

        Returns:
            dict: the complete index.
        """
        if self.index is None:
            self.prepare()
        state: list = [None, False]  # error message, already complete
        if self.rank == 0:
            try:
                state[1] = self._start()
            except TeacherCacheError as err:
                state[0] = str(err)
        broadcast_object_list(state, src=0)
        if state[0] is not None:
            raise TeacherCacheError(state[0])
        if state[1]:
            self._log(f'teacher cache {self.out_dir} is complete already')
            self.index = read_index(self.out_dir)
            return self.index
        pending = [s for s in range(self.index['num_shards'])
                   if not self._shard_done(s)]
        barrier()  # every rank listed the pending shards before any write
        if pending and self.rank == 0 and check_space:
            error = None
            try:
                self._check_space(pending)
            except TeacherCacheError as err:
                error = str(err)
            errors = [error]
        else:
            errors = [None]
        broadcast_object_list(errors, src=0)
        if errors[0] is not None:
            raise TeacherCacheError(errors[0])
        done = self.index['num_shards'] - len(pending)
        self._log(self.report())
        if done:
            self._log(f'resuming: {done} of {self.index["num_shards"]} '
                      'shards already written')
        mine = pending[self.rank::self.world_size]
        self._write_shards(mine)
        barrier()
        if self.rank == 0:
            self._finish()
        barrier()
        self.index = read_index(self.out_dir)
        return self.index

    def _write_shards(self, shards: Sequence[int]) -> None:
        """Compute and write ``shards`` (this rank's share)."""
        if not shards:
            return
        full_paths = ImageList([osp.join(self._root, p) if self._root else p
                                for p in self._paths])
        source = _ImageViews(full_paths, self.index['loader'],
                             self.index['view'], self.index['pack'],
                             self.views, self.seed, self._scope)
        per_batch = max(1, self.batch_size // self.views)
        batches = []
        for shard in shards:
            images = list(self._shard_images(shard))
            batches += [images[i:i + per_batch]
                        for i in range(0, len(images), per_batch)]
        loader = DataLoader(source, batch_sampler=batches,
                            num_workers=self.num_workers,
                            collate_fn=_collate_list)
        keys = [k for name, e in self.index['teachers'].items()
                for k in output_keys(name, e['summary_dim'] is not None,
                                     len(e['feature_dims']))]
        num_images = sum(len(self._shard_images(s)) for s in shards)
        bar = ProgressBar(num_images) if self.rank == 0 else None
        queue = list(shards)
        buffer = _ShardBuffer(queue.pop(0), keys)
        for batch in loader:
            self._add_batch(buffer, batch)
            if bar is not None:
                bar.update(len(batch))
            if buffer.images_done == len(self._shard_images(buffer.shard)):
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
                self._log(f'\nskipping unreadable image: {item["error"]}')
        if not good:
            return
        inputs = [t for item in good for t in item['inputs']]
        outputs = self._run_teachers(inputs)
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
                    images = [self._paths[item['index']] for item in good]
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
                check = _rounding_sums(original, stored[-1])
                if key in buffer.checks:
                    buffer.checks[key] += check
                else:
                    buffer.checks[key] = check
            summary = stored.pop(0) if out.summary is not None else None
            rounded[name] = FeatureOutput(summary, tuple(stored))
        # statistics of exactly what is stored (the rounded targets)
        for key, value in self.model.latent.statistic_sums(rounded).items():
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
                    (0, *self._target_shape(key)), dtype=self.storage_dtype)
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
        for key in buffer.targets:
            tensors[f'check.{key}'] = buffer.checks.get(
                key, torch.zeros(3 + self._target_shape(key)[0],
                                 dtype=torch.float64))
        images = self._shard_images(buffer.shard)
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

    def _target_shape(self, key: str) -> tuple[int, ...]:
        name, kind, *level = key.split('.')
        entry = self.index['teachers'][name]
        if kind == 'summary':
            return (entry['summary_dim'], )
        i = int(level[0])
        return (entry['feature_dims'][i], *entry['grids'][i])

    def _shard_sums(self, shard: int, handle) -> dict[str, Tensor]:
        """The statistic sums of one finished shard: from its side file, or
        recomputed from its stored targets if that is gone (a shard
        deleted from a complete cache and rewritten)."""
        path = osp.join(self.out_dir, shard_stats_name(shard))
        if osp.isfile(path):
            try:
                side = open_shard(path)
                shard_metadata(side, path, self.index['cache_id'])
                return {key: side.get_tensor(f'stats.{key}')
                        for key in self.index['statistics']['numel']}
            except (TeacherCacheError, KeyError, OSError):
                pass  # damaged: recompute below
        self._log(f'recomputing the statistics of {shard_name(shard)} from '
                  'its stored targets')
        teachers = self.index['teachers']
        rows = int(handle.get_slice('view.image').get_shape()[0])
        totals: dict[str, Tensor] = {}
        for start in range(0, rows, max(1, self.batch_size)):
            end = min(rows, start + max(1, self.batch_size))
            outputs = {}
            for name, entry in teachers.items():
                keys = output_keys(name, entry['summary_dim'] is not None,
                                   len(entry['feature_dims']))
                values = [handle.get_slice(f'target.{k}')[start:end].float()
                          .to(self.device) for k in keys]
                summary = values.pop(0) if entry['summary_dim'] is not None \
                    else None
                outputs[name] = FeatureOutput(summary, tuple(values))
            for key, value in self.model.latent.statistic_sums(
                    outputs).items():
                value = value.double().cpu()
                totals[key] = totals[key] + value if key in totals else value
        return {key: totals.get(key, torch.zeros(numel, dtype=torch.float64))
                for key, numel in self.index['statistics']['numel'].items()}

    def _finish(self) -> None:
        """Rank 0: sum the shards' statistics, complete the index."""
        index = self.index
        totals: dict[str, Tensor] = {
            key: torch.zeros(numel, dtype=torch.float64)
            for key, numel in index['statistics']['numel'].items()
        }
        checks: dict[str, Tensor] = {}
        shards, total_bytes, num_samples = [], 0, 0
        for shard in range(index['num_shards']):
            path = osp.join(self.out_dir, shard_name(shard))
            if not osp.isfile(path):
                raise TeacherCacheError(f'shard {path} is missing after all '
                                        'ranks finished')
            handle = open_shard(path)
            meta = shard_metadata(handle, path, index['cache_id'])
            sums = self._shard_sums(shard, handle)
            for key in totals:
                totals[key] += sums[key]
            for name in handle.keys():
                if name.startswith('check.'):
                    value = handle.get_tensor(name)
                    key = name[len('check.'):]
                    checks[key] = checks[key] + value if key in checks \
                        else value
            count = int(handle.get_slice('view.image').get_shape()[0])
            size = osp.getsize(path)
            shards.append(dict(file=shard_name(shard),
                               first_image=int(meta['first_image']),
                               num_images=int(meta['num_images']),
                               num_samples=count,
                               skipped=json.loads(meta['skipped']),
                               bytes=size))
            total_bytes += size
            num_samples += count
        if num_samples == 0:
            raise TeacherCacheError('no image of the dataset could be read; '
                                    'nothing was cached')
        save_statistics(
            totals, osp.join(self.out_dir, STATISTICS_FILE),
            dict(cache_id=index['cache_id'],
                 standardize=index['standardize'],
                 num_samples=str(num_samples)))
        rounding = {key: _relative_rounding_error(value)
                    for key, value in checks.items()}
        index.update(complete=True, shards=shards, num_samples=num_samples,
                     rounding_error=rounding,
                     total_bytes=total_bytes,
                     finished=datetime.datetime.now(
                         datetime.timezone.utc).isoformat(timespec='seconds'))
        write_json_atomic(index, osp.join(self.out_dir, INDEX_FILE))
        self._remove_side_files()
        noisy = {k: v for k, v in rounding.items() if v > ROUNDING_WARN}
        if noisy:
            coarser = '' if self.dtype == 'bf16' else ' (bf16 is coarser)'
            self._log(
                f'warning: {self.dtype} storage changes these targets by more '
                f'than {ROUNDING_WARN:.0%} of their spread (RMS rounding '
                'error / RMS deviation from the mean): '
                + ', '.join(f'{k} {v:.1%}' for k, v in noisy.items())
                + f'; consider --dtype fp32{coarser}')
        skipped = sum(len(s['skipped']) for s in shards)
        self._log(f'teacher cache complete: {num_samples} views in '
                  f'{len(shards)} shards, {format_bytes(total_bytes)}'
                  + (f', {skipped} unreadable images skipped'
                     if skipped else '') + f' -> {self.out_dir}')


def _rounding_sums(original: Tensor, stored: Tensor) -> Tensor:
    """Packed float64 ``[rows, sum err^2, sum x^2, sum x (C)]`` of one
    batch of one output: the storage rounding error ``err = stored -
    original`` and the moments of ``stored`` over rows (vectors or pixels).
    """
    channels = stored.shape[1]
    x = stored.detach().double()
    err = (x - original.detach().double()).square().sum()
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, channels)
    return torch.cat([x.new_tensor([x.shape[0]]), err.view(1),
                      x.square().sum().view(1), x.sum(0)]).cpu()


def _relative_rounding_error(check: Tensor) -> float:
    """RMS storage rounding error over the RMS deviation from the mean."""
    rows, err, sq = (float(v) for v in check[:3])
    if rows == 0:
        return 0.0
    spread = sq - float(check[3:].square().sum()) / rows
    return math.sqrt(err / spread) if spread > 0 else \
        (0.0 if err == 0 else math.inf)
