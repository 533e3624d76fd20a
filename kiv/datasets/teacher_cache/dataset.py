"""Read the teacher-feature cache: every cached view with its targets."""
from __future__ import annotations

import bisect
import logging
import os
import os.path as osp
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import mmengine.fileio as fileio
import numpy as np
from mmengine.dataset import Compose
from mmengine.logging import print_log
from torch import Tensor
from torch.utils.data import Dataset

from kiv.fileio.teacher_cache_format import (CACHE_ID, CACHED_TARGETS,
                                             IMAGES_FILE, TeacherCacheError,
                                             open_shard, output_keys,
                                             read_image_list, read_index,
                                             shard_metadata)
from kiv.registry import DATASETS
from ..transforms import SKIP_CAUSES, SKIPPED_FILES, UnreadableImageError
from .config import dataset_differences
from .views import VIEW_PARAMS, ReplayView, ViewParams

__all__ = ['TeacherCacheDataset']


def _join(root: str, path: str) -> str:
    return osp.join(root, path) if root else path


def _img_root_of(dataset: Mapping) -> str | None:
    """The image folder of a dataset config (``img_dir`` of
    ``kiv.UnlabeledImageDataset``; built lazily, nothing is scanned), or
    None for a dataset without one."""
    lazy = {**dataset, 'pipeline': [], 'lazy_init': True}
    try:
        dataset = DATASETS.build(lazy)
    except (TypeError, ValueError, FileNotFoundError):
        return None
    return getattr(dataset, 'img_dir', None) or None


@DATASETS.register_module()
class TeacherCacheDataset(Dataset):
    """Every cached view of a teacher-feature cache, with its targets.

    Sample ``i`` is one (image, view) pair in the cache's order. The image
    is loaded and the stored view (crop box, flip) replayed by the pipeline
    (:class:`~kiv.datasets.ReplayView`), so the student sees exactly the
    pixels the cached targets were computed on. The targets are read lazily
    from the memory-mapped safetensors shards (only the rows of the sample)
    and attached to the data sample as ``cached_targets``
    (``{'<teacher>.summary': (C,), '<teacher>.features.<l>': (C_l, h_l,
    w_l)}`` in the storage dtype), with ``metainfo['teacher_cache']`` set to
    the cache id; ``kiv.CachedTeacher`` turns them into the batch's
    :class:`~kiv.structures.FeatureOutput`.

    Unreadable image files (deleted since caching) are replaced by the next
    sample, as :class:`~kiv.datasets.UnlabeledImageDataset` does, and listed
    in ``metainfo['skipped_files']``.

    Args:
        cache_dir (str): the cache directory (``index.json``).
        pipeline (Sequence[dict | Callable], optional): defaults to the
            cache's own loader, ``kiv.ReplayView`` and packer. A custom one
            must contain a ``kiv.ReplayView`` equal to the cache's.
        teachers (Sequence[str], optional): teachers whose targets to load.
            Defaults to all the cached teachers.
        img_root (str, optional): folder the cached image paths are relative
            to, if the images moved. Defaults to ``dataset``'s image folder,
            else the cache's.
        dataset (dict, optional): the training dataset config the cache was
            written from (what a cached config replaces; see
            ``configs/distill/*_cached.py``). If given, the cache must
            belong to it (dataset type and files, image loader, views;
            :class:`TeacherCacheError` naming what differs) and its
            ``data_root`` / ``data_prefix`` say where the images are now.
            ``tools/cache_teachers.py`` writes the cache from it.
        load_targets (bool): attach the targets. False gives only the views
            (e.g. to run online teachers on exactly the cached views).
            Defaults to True.
        max_refetch (int): most consecutive unreadable images replaced for
            one sample. Defaults to 1000.
        max_open_shards (int): shard files kept open per process.
            Defaults to 8.
    """

    def __init__(self,
                 cache_dir: str,
                 pipeline: Sequence[dict | Callable] | None = None,
                 teachers: Sequence[str] | None = None,
                 img_root: str | None = None,
                 dataset: Mapping | None = None,
                 load_targets: bool = True,
                 max_refetch: int = 1000,
                 max_open_shards: int = 8) -> None:
        self.cache_dir = cache_dir
        self.index = read_index(cache_dir)
        if dataset is not None:
            diffs = dataset_differences(self.index, dataset)
            if diffs:
                raise TeacherCacheError(
                    f'TeacherCacheDataset: the teacher cache {cache_dir} '
                    f'(written from {self.index.get("config")}) was not '
                    'written from the dataset it names '
                    f'(train_dataloader.dataset.dataset): {"; ".join(diffs)}')
            if img_root is None:
                img_root = _img_root_of(dataset)
        self.cache_id: str = self.index['cache_id']
        cached = self.index['teachers']
        names = list(cached) if teachers is None else list(teachers)
        unknown = [t for t in names if t not in cached]
        if unknown:
            raise TeacherCacheError(
                f'TeacherCacheDataset: teachers {unknown} are not in the '
                f'cache {cache_dir}, which holds {list(cached)}')
        self.teachers = names
        self.target_keys = [
            key for t in names for key in output_keys(
                t, cached[t]['summary_dim'] is not None,
                len(cached[t]['feature_dims']))
        ]
        self.load_targets = bool(load_targets)
        self.max_refetch = int(max_refetch)
        self.max_open_shards = max(1, int(max_open_shards))

        if pipeline is None:
            pipeline = [self.index['loader'], self.index['view'],
                        self.index['pack']]
        self.pipeline = Compose(list(pipeline))
        replays = [t for t in self.pipeline.transforms
                   if isinstance(t, ReplayView)]
        if len(replays) != 1 or replays[0].config() != self.index['view']:
            got = [t.config() for t in replays]
            raise TeacherCacheError(
                'TeacherCacheDataset: the pipeline must replay the cached '
                f'views with one kiv.ReplayView equal to {self.index["view"]}'
                f' (the cache {cache_dir}); got {got or "none"}')

        images = self.index['images']
        self.img_root = images['root'] if img_root is None else img_root
        self.images = read_image_list(osp.join(cache_dir, IMAGES_FILE),
                                      images['count'])
        first = _join(self.img_root, self.images[0]) if len(self.images) \
            else None
        if first is not None and not fileio.exists(first):
            raise TeacherCacheError(
                f'TeacherCacheDataset: the first cached image {first} does '
                f'not exist; the cache {cache_dir} lists images relative to '
                f'{self.img_root!r} (set img_root, or data_root / '
                'data_prefix of the config, to where they are now)')
        shards = self.index['shards']
        self._shard_files = [osp.join(cache_dir, s['file']) for s in shards]
        self._ends = np.cumsum([s['num_samples'] for s in shards]).tolist()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    # ------------------------------------------------------------ metadata
    @property
    def metainfo(self) -> dict:
        """Cache id, directory, teachers, views per image and dtype."""
        return dict(cache_id=self.cache_id, cache_dir=self.cache_dir,
                    teachers=list(self.teachers),
                    views=self.index['views'], dtype=self.index['dtype'])

    def full_init(self) -> None:
        """Nothing to do (mmengine's dataloader builder calls it)."""

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state['_handles'] = OrderedDict()  # not picklable; reopen lazily
        return state

    # ------------------------------------------------------------- reading
    def _locate(self, idx: int) -> tuple[int, int]:
        """Sample index -> (shard, row)."""
        if not 0 <= idx < len(self):
            raise IndexError(f'TeacherCacheDataset: sample {idx} out of '
                             f'range for {len(self)} samples')
        shard = bisect.bisect_right(self._ends, idx)
        start = self._ends[shard - 1] if shard else 0
        return shard, idx - start

    def _handle(self, shard: int):
        """Open (and keep open) a shard file of this process."""
        if os.getpid() != self._pid:  # forked worker: do not share handles
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            path = self._shard_files[shard]
            handle = open_shard(path)
            shard_metadata(handle, path, self.cache_id)
            self._handles[shard] = handle
            while len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    @staticmethod
    def _row(handle, key: str, row: int) -> Tensor:
        return handle.get_slice(key)[row:row + 1][0]

    def sample_info(self, idx: int) -> dict:
        """Where sample ``idx`` comes from.

        Args:
            idx (int): sample index.

        Returns:
            dict: ``img_path`` (str), ``image_index`` (int), ``view`` (int),
            ``view_params`` (:class:`ViewParams` as a dict), ``shard`` and
            ``row``.
        """
        shard, row = self._locate(idx)
        handle = self._handle(shard)
        image = int(self._row(handle, 'view.image', row))
        box = tuple(int(v) for v in self._row(handle, 'view.box', row))
        hw = tuple(int(v) for v in self._row(handle, 'view.image_hw', row))
        params = ViewParams(box, bool(self._row(handle, 'view.flip', row)),
                            hw)
        return dict(img_path=_join(self.img_root, self.images[image]),
                    image_index=image,
                    view=int(self._row(handle, 'view.view', row)),
                    view_params=params.to_dict(), shard=shard, row=row)

    def targets(self, idx: int) -> dict[str, Tensor]:
        """The cached targets of sample ``idx``.

        Args:
            idx (int): sample index.

        Returns:
            dict[str, Tensor]: per key of :attr:`target_keys`, ``(C,)``
            summaries and ``(C_l, h_l, w_l)`` maps in the storage dtype.
        """
        shard, row = self._locate(idx)
        handle = self._handle(shard)
        return {key: self._row(handle, f'target.{key}', row).clone()
                for key in self.target_keys}

    def __getitem__(self, idx: int) -> dict:
        """Load sample ``idx``: the replayed view and its targets.

        Args:
            idx (int): sample index.

        Returns:
            dict: ``inputs`` (``(3, h, w)`` uint8 view) and ``data_samples``
            with ``cached_targets`` (if ``load_targets``) and metainfo
            ``teacher_cache``, ``view_params``, ``cache_image``,
            ``cache_view``, ``skipped_files``.

        Raises:
            RuntimeError: ``max_refetch + 1`` consecutive unreadable images.
        """
        num = len(self)
        skipped: list[str] = []
        causes: list[str] = []
        for offset in range(min(self.max_refetch + 1, num)):
            sample = (idx + offset) % num
            info = self.sample_info(sample)
            results = {
                'img_path': info['img_path'],
                'sample_idx': sample,
                VIEW_PARAMS: info['view_params'],
                SKIPPED_FILES: list(skipped),
                SKIP_CAUSES: list(causes),
            }
            try:
                data = self.pipeline(results)
            except UnreadableImageError as err:
                print_log(f'skipping unreadable image: {err}',
                          logger='current', level=logging.DEBUG)
                causes.append(getattr(err, 'cause', 'unknown'))
                data = None
            else:
                if data is None:
                    causes.append('unknown')
            if data is None:
                skipped.append(info['img_path'])
                continue
            data_sample = data['data_samples']
            data_sample.set_metainfo({
                CACHE_ID: self.cache_id,
                VIEW_PARAMS: info['view_params'],
                'cache_image': info['image_index'],
                'cache_view': info['view'],
            })
            if self.load_targets:
                data_sample.set_field(self.targets(sample), CACHED_TARGETS)
            return data
        raise RuntimeError(
            f'TeacherCacheDataset: {len(skipped)} consecutive images from '
            f'sample {idx} could not be loaded (max_refetch='
            f'{self.max_refetch}), first: {skipped[:3]}; check the images '
            f'under {self.img_root!r}')
