"""Teacher outputs taken from another cache instead of recomputed.

A teacher cache written for one distillation often shares teachers with
the next: the same DINOv2 or CLIP over the same images and views, with a
new teacher added. :class:`ReusedTargets` lets the writer copy such a
teacher's stored outputs from an existing cache (``--reuse DIR``) and run
only the others. It is allowed when both caches describe the same views
(images, views per image, seed, view transform, image loader) and storage
dtype, and the teacher has the same output layout there; and it is checked:
this config's teacher runs on the views of the first images and must give
what the other cache stored, up to rounding. A teacher config may differ
(another checkpoint path holding the same backbone, a classifier head the
outputs do not pass through): the check is on what is stored.
"""
from __future__ import annotations

import os.path as osp
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from kiv.fileio.teacher_cache_format import (STORAGE_DTYPES,
                                             TeacherCacheError, open_shard,
                                             output_keys, read_index,
                                             shard_metadata, shard_name)
from kiv.structures import FeatureOutput

__all__ = ['ReusedTargets', 'reuse_rtol', 'compute_with_reuse']

#: largest RMS difference between a reused teacher's stored outputs and
#: its recomputed ones, relative to their RMS: four unit roundoffs of the
#: storage dtype (a value may round the other way after float noise of
#: another batch or device), at least 1e-3 (TF32 matmuls of a GPU)
REUSE_ULPS, REUSE_MIN_RTOL = 4, 1e-3


def reuse_rtol(dtype: torch.dtype) -> float:
    """The tolerance of :meth:`ReusedTargets.check` for a storage dtype."""
    return max(REUSE_ULPS * torch.finfo(dtype).eps / 2, REUSE_MIN_RTOL)


#: index fields two caches must share for one to lend targets to the other
_SAME_VIEWS = (('views', 'views per image'), ('seed', 'seed'),
               ('dtype', 'storage dtype'), ('view', 'view transform'),
               ('loader', 'image loader'))
#: teacher output layout fields that must agree
_LAYOUT = ('summary_dim', 'feature_dims', 'grids')


def _differences(source: Mapping, plan: Mapping) -> list[str]:
    diffs = [f'{what}: {source.get(key)!r} there, {plan[key]!r} here'
             for key, what in _SAME_VIEWS if source.get(key) != plan[key]]
    if source.get('images', {}).get('sha256') != plan['images']['sha256']:
        diffs.append(f'image list ({source.get("images", {}).get("count")} '
                     f'images there, {plan["images"]["count"]} here, or '
                     'another order)')
    return diffs


class ReusedTargets:
    """Stored outputs of some teachers, read from other caches.

    Args:
        plan (Mapping): the index of the cache being written
            (:func:`~kiv.datasets.teacher_cache.plan.make_index`).
        sources (Sequence[str]): cache directories to take teachers from,
            in order of preference.

    Raises:
        TeacherCacheError: a source is not a complete cache, or describes
            other views, or has a teacher of this config with another
            output layout.
    """

    def __init__(self, plan: Mapping, sources: Sequence[str]) -> None:
        #: teacher -> (cache dir, its index)
        self.sources: dict[str, tuple[str, dict]] = {}
        for cache_dir in sources:
            index = read_index(cache_dir)
            diffs = _differences(index, plan)
            if diffs:
                raise TeacherCacheError(
                    f'cannot reuse teachers of {cache_dir}: it was written '
                    f'for other views ({"; ".join(diffs)})')
            for name, entry in index['teachers'].items():
                if name not in plan['teachers'] or name in self.sources:
                    continue
                ours = plan['teachers'][name]
                layout = [k for k in _LAYOUT if entry.get(k) != ours[k]]
                if layout:
                    raise TeacherCacheError(
                        f'cannot reuse teacher {name!r} of {cache_dir}: its '
                        f'outputs there have another {layout[0]} '
                        f'({entry.get(layout[0])!r}, here {ours[layout[0]]!r})'
                    )
                self.sources[name] = (cache_dir, index)
        self._handles: dict[tuple[str, int], tuple] = {}

    @property
    def teachers(self) -> list[str]:
        """The teachers whose outputs are reused."""
        return list(self.sources)

    def describe(self) -> dict[str, dict]:
        """Per reused teacher: the source cache's path and ``cache_id``."""
        return {name: dict(cache=osp.abspath(d), cache_id=i['cache_id'])
                for name, (d, i) in self.sources.items()}

    def _rows(self, name: str, image: int) -> tuple:
        """The open source shard holding ``image`` and its first row."""
        cache_dir, index = self.sources[name]
        shard = image // index['shard_size']
        key = (cache_dir, shard)
        if key not in self._handles:
            path = osp.join(cache_dir, shard_name(shard))
            handle = open_shard(path)
            shard_metadata(handle, path, index['cache_id'])
            images = handle.get_tensor('view.image').tolist()
            first = {}
            for row, img in enumerate(images):
                first.setdefault(img, row)
            self._handles[key] = (handle, first)
        handle, first = self._handles[key]
        if image not in first:
            raise TeacherCacheError(
                f'teacher {name!r} cannot be reused from {cache_dir}: image '
                f'{image} was unreadable when that cache was written (it is '
                'readable now); write the cache without --reuse')
        return handle, first[image]

    def outputs(self, images: Sequence[int],
                views: int) -> dict[str, FeatureOutput]:
        """The stored outputs of the reused teachers for ``views`` views of
        each image, image-major like a writer's batch.

        Args:
            images (Sequence[int]): global image indices.
            views (int): views per image.

        Returns:
            dict[str, FeatureOutput]: float32 tensors holding the stored
            (rounded) values.
        """
        out = {}
        for name, (_, index) in self.sources.items():
            entry = index['teachers'][name]
            keys = output_keys(name, entry['summary_dim'] is not None,
                               len(entry['feature_dims']))
            # consecutive images stored one after the other: one read
            runs: list[list] = []  # [handle, first row, end row]
            for image in images:
                handle, row = self._rows(name, image)
                if runs and runs[-1][0] is handle and runs[-1][2] == row:
                    runs[-1][2] = row + views
                else:
                    runs.append([handle, row, row + views])
            parts: dict[str, list[Tensor]] = {k: [] for k in keys}
            for handle, start, end in runs:
                for key in keys:
                    parts[key].append(
                        handle.get_slice(f'target.{key}')[start:end])
            tensors = [torch.cat(parts[k]).float() for k in keys]
            summary = tensors.pop(0) if entry['summary_dim'] is not None \
                else None
            out[name] = FeatureOutput(summary, tuple(tensors))
        return out

    def check(self, computed: Mapping[str, FeatureOutput],
              images: Sequence[int], views: int) -> dict[str, float]:
        """Compare this config's teachers with the stored outputs.

        Each computed output is rounded to the storage dtype and compared
        with the stored one: their RMS difference relative to the stored
        RMS must stay within :func:`reuse_rtol` of that dtype (a teacher
        with other weights differs by tens of percent).

        Args:
            computed (Mapping[str, FeatureOutput]): the reused teachers'
                outputs on the views of ``images``, computed here.
            images (Sequence[int]): those images' global indices.
            views (int): views per image.

        Returns:
            dict[str, float]: per reused teacher, the largest relative RMS
            difference over its outputs.

        Raises:
            TeacherCacheError: a teacher differs by more than the
            tolerance.
        """
        stored = self.outputs(images, views)
        errors = {}
        for name, ref in stored.items():
            dtype = STORAGE_DTYPES[self.sources[name][1]['dtype']]
            rtol = reuse_rtol(dtype)
            got = computed[name]
            pairs = list(zip(got.features, ref.features))
            if ref.summary is not None:
                pairs.insert(0, (got.summary, ref.summary))
            worst = 0.0
            for new, old in pairs:  # the teachers may run on a GPU
                new = new.detach().cpu().to(dtype).float()
                diff = (new - old).pow(2).mean().sqrt()
                size = old.pow(2).mean().sqrt().clamp_min(1e-12)
                worst = max(worst, float(diff / size))
            errors[name] = worst
            if worst > rtol:
                raise TeacherCacheError(
                    f'teacher {name!r} of this config is not the one cached '
                    f'in {self.sources[name][0]}: on the views of the first '
                    f'{len(images)} images its outputs differ from the '
                    f'stored ones by {worst:.2%} of their RMS (rounding '
                    f'allows {rtol:.2%}); write the cache without --reuse')
        return errors

    def rounding_errors(self) -> dict[str, float]:
        """The storage rounding errors the source caches measured for the
        reused outputs (``index['rounding_error']`` there)."""
        out = {}
        for name, (_, index) in self.sources.items():
            for key, value in (index.get('rounding_error') or {}).items():
                if key.split('.', 1)[0] == name:
                    out[key] = value
        return out


def compute_with_reuse(run_teachers: Callable[..., dict[str, FeatureOutput]],
                       reused: ReusedTargets | None, inputs: list[Tensor],
                       images: Sequence[int], views: int
                       ) -> tuple[dict[str, FeatureOutput], set[str]]:
    """Every teacher's outputs for one writer batch: the reused ones read,
    the others computed.

    Args:
        run_teachers (Callable): packed views -> outputs per teacher, with
            a ``skip`` argument (``ConfigTeachers``).
        reused (ReusedTargets, optional): the reused teachers, if any.
        inputs (list[Tensor]): the batch's packed views, image-major.
        images (Sequence[int]): the batch's global image indices.
        views (int): views per image.

    Returns:
        tuple: the outputs per teacher and the names of the reused ones.
    """
    if reused is None or not reused.teachers:
        return run_teachers(inputs), set()
    outputs = run_teachers(inputs, skip=reused.teachers)
    outputs.update(reused.outputs(images, views))
    return outputs, set(reused.teachers)
