"""Every shipped config parses and names only registered modules; the
real-scale recipe's weight files are documented in the README."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

import kiv  # noqa: F401
from kiv.registry import (DATASETS, HOOKS, METRICS, MODELS, TEACHER_SOURCES,
                          TRANSFORMS)
from conftest import REPO

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'distill', '*.py')))
REGISTRIES = (MODELS, DATASETS, TRANSFORMS, HOOKS, METRICS, TEACHER_SOURCES)


def _types(node, path=''):
    if isinstance(node, dict):
        if isinstance(node.get('type'), str):
            yield path, node['type']
        for key, value in node.items():
            yield from _types(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _types(value, f'{path}[{i}]')


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_types_resolve(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'kiv'
    import mmpretrain.datasets  # noqa: F401  (mmpretrain.* transforms)
    with DefaultScope.overwrite_default_scope('kiv'):
        for where, type_ in _types(cfg.to_dict()):
            if where.endswith('.summary'):  # a Teacher summary mode
                assert type_ in ('cls', 'avg', 'layer', 'none'), (path, where)
                continue
            if where.endswith('.source'):
                found = TEACHER_SOURCES.get(type_)
            else:
                found = next((r.get(type_) for r in REGISTRIES
                              if r.get(type_) is not None), None)
                if found is None:  # runner-level types (loops, wrappers...)
                    from mmengine import registry as mmreg
                    found = next(
                        (getattr(mmreg, n).get(type_) for n in dir(mmreg)
                         if isinstance(getattr(mmreg, n), mmreg.Registry)
                         and getattr(mmreg, n).get(type_) is not None), None)
            assert found is not None, f'{path}: {where} type={type_!r}'


def test_real_recipe_weight_files_are_documented():
    real = [c for c in CONFIGS if '8xb64' in c]
    assert real
    readme = open(osp.join(REPO, 'README.md'), encoding='utf-8').read()
    cfg = Config.fromfile(real[0])
    files = [t.source.checkpoint for t in cfg.model.teachers.values()]
    files.append(cfg.model.student.base.checkpoint)
    for f in files:
        assert osp.basename(f) in readme, f
