"""Where the test data is: ``--data-root`` and the missing-dataset check.

Used by ``tools/test.py``: :func:`set_data_root` moves a split of any
mmdet / mmseg / mmpretrain config to another directory, :func:`check_dataset`
exits with one line naming the expected path before the Runner is built.
"""
from __future__ import annotations

import os
import os.path as osp

from mmengine.config import Config

from .launch import die

__all__ = ['DATASET_LAYOUTS', 'set_data_root', 'check_dataset']

#: dataset type -> the standard layout named in "dataset not found" errors
DATASET_LAYOUTS = {
    'CocoDataset': 'the COCO 2017 layout: annotations/instances_'
    '{train,val}2017.json, {train,val}2017/',
    'ADE20KDataset': 'the ADE20K layout: {images,annotations}/'
    '{training,validation}/ inside ADEChallengeData2016/',
    'ImageNet': 'the ImageNet layout: {train,val}/, meta/{train,val}.txt',
}


def _is_remote(path: str) -> bool:
    return '://' in path


def _leaf_datasets(dataset: dict) -> list[dict]:
    """The dataset configs that read files, inside dataset wrappers
    (``RepeatDataset``/``ClassBalancedDataset`` ``dataset``,
    ``ConcatDataset`` ``datasets``)."""
    if 'dataset' in dataset:
        return _leaf_datasets(dataset['dataset'])
    if 'datasets' in dataset:
        return [d for ds in dataset['datasets'] for d in _leaf_datasets(ds)]
    return [dataset]


def _metric_cfgs(evaluator) -> list[dict]:
    """Metric configs of an evaluator config (a metric, a list of metrics,
    or ``dict(type='Evaluator', metrics=...)``)."""
    if evaluator is None:
        return []
    if isinstance(evaluator, (list, tuple)):
        return [m for e in evaluator for m in _metric_cfgs(e)]
    if 'metrics' in evaluator:
        return _metric_cfgs(evaluator['metrics'])
    return [evaluator]


def _loader_datasets(cfg: Config, split: str) -> list[dict]:
    loader = cfg.get(f'{split}_dataloader', None)
    if not loader or not loader.get('dataset'):
        die(f'the config has no {split}_dataloader.dataset')
    return _leaf_datasets(loader['dataset'])


def set_data_root(cfg: Config, data_root: str, split: str = 'test') -> None:
    """Move a split's data to ``data_root`` (``--data-root``).

    Sets ``data_root`` of the split's dataset(s) (mmdet ``CocoDataset``,
    mmseg ``ADE20KDataset``, mmpretrain ``ImageNet`` ... resolve
    ``ann_file`` and ``data_prefix`` against it) and rewrites every evaluator
    path under the old root (e.g. mmdet ``CocoMetric.ann_file =
    data_root + 'annotations/instances_val2017.json'``) to the same place
    under the new one.

    Args:
        cfg (Config): the run's config, modified in place.
        data_root (str): the directory the config's ``data_root`` stands
            for: COCO: the one holding ``annotations/`` and ``val2017/``;
            ADE20K: ``ADEChallengeData2016``; ImageNet: the one holding
            ``val/`` and ``meta/``.
        split (str): ``'test'`` or ``'val'``.
    """
    old_roots = set()
    for dataset in _loader_datasets(cfg, split):
        if dataset.get('data_root'):
            old_roots.add(osp.normpath(dataset['data_root']))
        dataset['data_root'] = data_root
    for metric in _metric_cfgs(cfg.get(f'{split}_evaluator', None)):
        for key, value in metric.items():
            if not isinstance(value, str) or _is_remote(value):
                continue
            for old in old_roots:
                if osp.normpath(value).startswith(old + os.sep):
                    metric[key] = osp.join(
                        data_root, osp.relpath(osp.normpath(value), old))


def _dataset_paths(dataset: dict) -> list[tuple[str, bool]]:
    """``(path, is_file)`` a dataset config reads, resolved like mmengine's
    ``BaseDataset`` (relative to ``data_root``)."""
    root = dataset.get('data_root', None) or ''

    def join(path: str) -> str:
        return path if osp.isabs(path) or _is_remote(path) \
            else osp.join(root, path)

    paths = []
    if dataset.get('ann_file'):
        paths.append((join(dataset['ann_file']), True))
    prefix = dataset.get('data_prefix', None)
    if not prefix and dataset.get('split'):  # mmpretrain ImageNet & co.
        prefix = dataset['split']
    prefixes = prefix.values() if isinstance(prefix, dict) else [prefix]
    paths += [(join(p), False) for p in prefixes if isinstance(p, str) and p]
    if not paths and root:
        paths.append((root, False))
    return paths


def check_dataset(cfg: Config, split: str = 'test') -> None:
    """Exit with one line if a split's dataset files are missing.

    Checks, before the Runner is built, the annotation file and the image /
    label folders of the split's dataset(s) and the files its evaluator
    reads (``ann_file``). Remote paths (``s3://`` ...) and datasets read
    through a non-local file backend (``backend_args``) are not checked.

    Args:
        cfg (Config): the run's config.
        split (str): ``'test'``, ``'val'`` or ``'train'``.
    """
    hint = (f'set --data-root or --cfg-options '
            f'{split}_dataloader.dataset.data_root=<dir>')
    for dataset in _loader_datasets(cfg, split):
        backend_args = dataset.get('backend_args', None) or {}
        if backend_args.get('backend', 'local') != 'local':
            continue
        kind = str(dataset.get('type', '')).split('.')[-1]
        layout = DATASET_LAYOUTS.get(
            kind, f'the files {kind or "the dataset"} reads')
        for path, is_file in _dataset_paths(dataset):
            if _is_remote(path):
                continue
            if not (osp.isfile(path) if is_file else osp.isdir(path)):
                die(f'dataset not found: {path} (expected {layout}; {hint})')
    for metric in _metric_cfgs(cfg.get(f'{split}_evaluator', None)):
        ann_file = metric.get('ann_file', None)
        if isinstance(ann_file, str) and ann_file and \
                not _is_remote(ann_file) and not osp.isfile(ann_file):
            die(f'dataset not found: {ann_file} (the annotation file of '
                f'{split}_evaluator; {hint} or '
                f'{split}_evaluator.ann_file=<file>)')
