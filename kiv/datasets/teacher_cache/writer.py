"""Write the teacher-feature cache of a distillation config.

:class:`TeacherCacheWriter` runs every teacher of a
``kiv.KnowledgeInheritance`` config once over its train dataset, ``K``
deterministic views per image, and writes the shards, the index and the
exact standardiser statistics (see :mod:`kiv.fileio.teacher_cache_format`).
``tools/cache_teachers.py`` is its command line. It orchestrates:

- :mod:`.plan`: the index before anything is written, the disk estimate,
  whether a directory holds the same cache;
- :mod:`.teachers`: the config's teachers and data preprocessor, built
  alone (no student, heads or losses);
- :mod:`.shards`: computing and writing this rank's shards;
- :mod:`.statistics`: the standardiser sums of the stored targets and the
  storage rounding checks.

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
import os
import os.path as osp
import shutil
from collections.abc import Callable, Sequence

import torch
from mmengine.config import Config
from mmengine.dist import barrier, broadcast_object_list, get_dist_info
from torch import Tensor

from kiv.fileio.teacher_cache_format import (IMAGES_FILE, INDEX_FILE,
                                             STATISTICS_FILE, STORAGE_DTYPES,
                                             ImageList, TeacherCacheError,
                                             open_shard,
                                             read_index, save_statistics,
                                             shard_metadata, shard_name,
                                             shard_stats_name,
                                             write_image_list,
                                             write_json_atomic)
from .config import online_config
from .plan import (DEFAULT_SHARD_BYTES, VIEW_ROW_BYTES, bytes_per_view,
                   check_config, choose_shard_size, estimate, format_bytes,
                   image_list, index_differences, make_index,
                   mark_reused, report, shard_images)
from .reuse import ReusedTargets
from .shards import ImageViews, ShardWriter, shard_done
from .statistics import TargetStatistics, relative_rounding_error
from .teachers import ConfigTeachers
from .views import split_pipeline

__all__ = ['TeacherCacheWriter', 'format_bytes', 'VIEW_ROW_BYTES',
           'DEFAULT_SHARD_BYTES']

#: relative rounding error above which the writer warns (see
#: ``index['rounding_error']``).
ROUNDING_WARN = 0.01


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
        reuse (Sequence[str]): caches of the same views (images, views,
            seed, transforms, dtype) to copy teachers' outputs from instead
            of running them: every teacher of this config found in one of
            them (the first that has it), after checking on the first
            images' views that it gives what is stored there (see
            :mod:`~kiv.datasets.teacher_cache.reuse`). Defaults to none.
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
                 log: Callable[[str], None] | None = None,
                 reuse: Sequence[str] = ()) -> None:
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
        self.reuse = [reuse] if isinstance(reuse, str) else list(reuse)
        self.teachers: ConfigTeachers | None = None
        self.statistics: TargetStatistics | None = None
        self.index: dict | None = None
        self.reused: ReusedTargets | None = None

    @property
    def _scope(self) -> str:
        """The registry scope of the config (``default_scope``)."""
        return self.cfg.get('default_scope', None) or 'kiv'

    # ----------------------------------------------------------------- plan
    def prepare(self) -> dict:
        """Build the teachers, list the images, measure the outputs and make
        the index (not written yet).

        Returns:
            dict: the index with ``complete=False`` and no shard results.
        """
        check_config(self.cfg, self.config_path)
        pipeline = split_pipeline(
            self.cfg.train_dataloader.dataset.get('pipeline', []))
        _, view, pack = pipeline
        self.teachers = ConfigTeachers(self.cfg.model, self._scope,
                                       self.device)
        root, paths = image_list(self.cfg, self._scope)
        teachers = self.teachers.probe(view, pack)
        standardize = (self.cfg.model.get('latent', None) or {}).get(
            'standardize', 'phis')
        self.statistics = TargetStatistics(teachers, standardize)
        per_view = bytes_per_view(teachers, self.storage_dtype)
        shard_size = choose_shard_size(self.requested_shard_size,
                                       self.out_dir, per_view, len(paths),
                                       self.views)
        self.index = make_index(
            self.cfg, self.config_path, root, paths, teachers,
            self.statistics.numel, standardize, pipeline, self.views,
            self.seed, self.dtype, shard_size, per_view)
        self._paths = paths
        self._root = root
        if self.reuse:
            self.reused = ReusedTargets(self.index, self.reuse)
            checks = self._check_reused()
            mark_reused(self.index, self.reused.describe())
            for name, error in checks.items():
                self.index['teachers'][name]['reused_from']['check'] = error
                self._log(f'teacher {name!r}: outputs copied from '
                          f'{self.reused.sources[name][0]} (checked on the '
                          'first views: they differ by '
                          f'{error:.3%} of their RMS)')
        return self.index

    def _check_reused(self) -> dict[str, float]:
        """Run the reused teachers on the views of the first images and
        compare with the stored outputs
        (:meth:`~kiv.datasets.teacher_cache.reuse.ReusedTargets.check`)."""
        if not self.reused.teachers:
            return {}
        root = self.index['images']['root']
        source = ImageViews(
            ImageList([osp.join(root, p) if root else p
                       for p in self._paths]),
            self.index['loader'], self.index['view'], self.index['pack'],
            self.views, self.seed, self._scope)
        per_batch = max(1, self.batch_size // self.views)
        items = [source[i] for i in range(min(per_batch, len(source)))]
        items = [item for item in items if item['error'] is None]
        if not items:
            raise TeacherCacheError('none of the first images could be read '
                                    'to check the reused teachers')
        computed = self.teachers([t for item in items
                                  for t in item['inputs']],
                                 only=self.reused.teachers)
        return self.reused.check(computed, [item['index'] for item in items],
                                 self.views)

    def estimate(self) -> dict:
        """Disk use of the cache (see :func:`.plan.estimate`)."""
        index = self.index or self.prepare()
        return estimate(index, self.views, self.storage_dtype)

    def report(self) -> str:
        """The disk-use report printed before writing (and by --dry-run)."""
        index = self.index or self.prepare()
        return report(index, self.out_dir, self.views, self.dtype,
                      self.storage_dtype)

    # ------------------------------------------------------------- helpers
    def _shard_done(self, shard: int) -> bool:
        return shard_done(self.out_dir, shard, self.index['cache_id'])

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
            diffs = index_differences(old, self.index)
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
            len(shard_images(self.index, s)) for s in pending) * \
            est['per_image']
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
        ShardWriter(self.index, self.out_dir, self._paths, self.teachers,
                    self.statistics, self.batch_size, self.num_workers,
                    self._scope, self._log, progress=self.rank == 0,
                    reused=self.reused).write(
                        pending[self.rank::self.world_size])
        barrier()
        if self.rank == 0:
            self._finish()
        barrier()
        self.index = read_index(self.out_dir)
        return self.index

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
        return self.statistics.stored_sums(handle, self.index,
                                           self.batch_size, self.device)

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
        rounding = {key: relative_rounding_error(value)
                    for key, value in checks.items()}
        if self.reused is not None:
            rounding.update(self.reused.rounding_errors())
            rounding = {key: rounding[key] for key in sorted(rounding)}
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
