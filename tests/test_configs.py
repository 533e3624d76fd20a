"""Every shipped config parses and names only registered modules (the
demo's, ``projects/kiv_demo/configs``, each in its own scope); the
real-scale recipe's weight files are documented in the README; every config
building the student takes its architecture from ``configs/_base_/models``."""
import glob
import inspect
import os.path as osp
import re

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

import kiv  # noqa: F401
from kiv.registry import (DATASETS, HOOKS, METRICS, MODELS, TEACHER_SOURCES,
                          TRANSFORMS)
from kiv.testing.paths import DEMO_PROJECT, REPO

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'distill', '*.py')))
#: the demo's configs (beside the library: ``projects/kiv_demo/configs``)
DEMO_CONFIGS = sorted(glob.glob(osp.join(DEMO_PROJECT, 'configs', '*.py')))
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


@pytest.mark.parametrize('path', DEMO_CONFIGS, ids=osp.basename)
def test_demo_config_types_resolve_in_their_own_scope(path, kiv_demo):
    """A demo config parses (its ``custom_imports`` import kiv and
    kiv_demo), every ``kiv.<Name>`` it names is kiv's and every
    ``kiv_demo.<Name>`` the demo's: nothing demo-only is spelt ``kiv.``."""
    from kiv_demo import registry as demo_registry
    cfg = Config.fromfile(path)
    demo_registries = [getattr(demo_registry, n)
                       for n in demo_registry.__all__]
    scopes = set()
    for where, type_ in _types(cfg.to_dict()):
        scope = type_.split('.', 1)[0] if '.' in type_ else None
        if scope == 'kiv':
            registries = REGISTRIES
        elif scope == 'kiv_demo':
            registries = demo_registries
        else:  # the toolboxes' own types (the toy demo builds them)
            continue
        scopes.add(scope)
        assert any(r.get(type_) is not None for r in registries), \
            f'{path}: {where} type={type_!r}'
    assert 'kiv_demo' in scopes, path
    assert 'kiv_demo' in cfg.custom_imports.imports, path


def test_real_recipe_weight_files_are_documented():
    real = [c for c in CONFIGS if '8xb64' in c]
    assert real
    readme = open(osp.join(REPO, 'README.md'), encoding='utf-8').read()
    cfg = Config.fromfile(real[0])
    files = [t.source.checkpoint for t in cfg.model.teachers.values()]
    files.append(cfg.model.student.base.checkpoint)
    for f in files:
        assert osp.basename(f) in readme, f


# ----------------------------------------------------------------------
# the student, written once: configs/_base_/models
MODEL_DIR = osp.join(REPO, 'configs', '_base_', 'models')
#: variable -> (architecture file, tag of the configs that build it)
STUDENTS = {
    'kiv_student_b14': ('kiv_adapter-vit-b14-reg4.py', 'vit-b14'),
    'kiv_student_t14': ('kiv_adapter-vit-t14-reg4.py', 'vit-t14'),
}
#: AdapterViT arguments that shape the state dict (besides ``base``)
ARCH_KEYS = ('interaction_indexes', 'conv_inplane', 'deform_num_heads',
             'n_points', 'deform_ratio', 'with_cffn', 'cffn_ratio',
             'use_extra_extractor', 'add_vit_feature', 'with_global_token',
             'summary_names')
#: AdapterViT arguments each config sets for its task
TASK_KEYS = ('init_values', 'pyramid_init_values', 'drop_path_rate',
             'summary', 'freeze_base', 'frozen_stages', 'out_indices',
             'out_type', 'with_cp', 'norm_cfg', 'pretrained', 'init_cfg')
#: a pyramid-only config may leave the summaries' global tokens out
NO_SUMMARIES = dict(with_global_token=False, summary_names=None)
#: base-ViT options that are not architecture
BASE_TASK_KEYS = ('checkpoint', 'drop_keys')
BASE_TASK_KWARGS = ('drop_rate', 'attn_drop_rate', 'proj_drop_rate',
                    'drop_path_rate')
#: every config that builds the student; import_example/ shows what a user
#: writes into their own project, so it spells the student out
STUDENT_CONFIGS = sorted(
    p for sub in ('distill', 'mmdet', 'mmseg', 'mmpretrain')
    for p in glob.glob(osp.join(REPO, 'configs', sub, '**', '*.py'),
                       recursive=True))


def _student_arch(student: dict) -> dict:
    """The state-dict-shaping part of an AdapterViT config, defaults
    filled in."""
    from kiv.models.backbones import AdapterViT
    params = inspect.signature(AdapterViT.__init__).parameters
    args = {k: p.default for k, p in params.items()
            if p.default is not inspect.Parameter.empty}
    args.update(student)
    arch = {k: args[k] for k in ARCH_KEYS}
    arch['interaction_indexes'] = [list(p)
                                   for p in arch['interaction_indexes']]
    if arch['summary_names'] is not None:
        arch['summary_names'] = list(arch['summary_names'])
    base = {k: v for k, v in student['base'].items()
            if k not in BASE_TASK_KEYS}
    kwargs = {k: v for k, v in base.pop('model_kwargs', {}).items()
              if k not in BASE_TASK_KWARGS}
    if kwargs:
        base['model_kwargs'] = kwargs
    return dict(type=student['type'], base=base, **arch)


def _arch_file(name: str) -> Config:
    return Config.fromfile(osp.join(MODEL_DIR, STUDENTS[name][0]))


@pytest.mark.parametrize('name', STUDENTS)
def test_student_architecture_file(name):
    """Each file defines its student only, with every argument that shapes
    the state dict spelt out (so a tiny config inheriting a real one keeps
    none of the real student's), and every AdapterViT argument is either
    architecture or a task setting."""
    from kiv.models.backbones import AdapterViT
    cfg = _arch_file(name)
    assert set(cfg.keys()) == {name}
    student = cfg[name]
    assert student.type == 'kiv.AdapterViT'
    assert set(student) == {'type', 'base', *ARCH_KEYS}
    assert set(student.base) <= {'type', 'model_name', 'model_kwargs'}
    assert _student_arch(student) == student.to_dict()
    params = set(inspect.signature(AdapterViT.__init__).parameters)
    assert params - {'self', 'base'} == set(ARCH_KEYS) | set(TASK_KEYS)


@pytest.mark.parametrize('path', STUDENT_CONFIGS,
                         ids=lambda p: osp.relpath(p, REPO))
def test_configs_take_the_student_from_base_models(path):
    """Every config building the student has exactly the architecture of
    its ``configs/_base_/models`` file (so an exported student loads key
    for key and the copies cannot drift), and inherits it rather than
    writing it again (except the import example, which stays explicit)."""
    name = next(n for n, (_, tag) in STUDENTS.items()
                if tag in osp.basename(path))
    cfg = Config.fromfile(path)
    is_distill = osp.basename(osp.dirname(path)) == 'distill'
    student = cfg.model.student if is_distill else cfg.model.backbone
    if student.type == 'kiv.InheritedBackbone':  # the student it wraps
        student = student.backbone
    expected = _student_arch(_arch_file(name)[name])
    arch = _student_arch(student)
    if not is_distill and student.get('out_type', 'pyramid') == 'pyramid' \
            and all(arch[k] == v for k, v in NO_SUMMARIES.items()):
        expected.update(NO_SUMMARIES)
    assert arch == expected, path
    explicit = osp.basename(osp.dirname(path)) == 'import_example'
    assert (name in cfg) != explicit, \
        f'{path} does not inherit configs/_base_/models/{STUDENTS[name][0]}'
    if explicit:
        return
    text = open(path, encoding='utf-8').read()
    for key in set(ARCH_KEYS) - set(NO_SUMMARIES):
        assert not re.search(rf'\b{key}\s*=', text), \
            f'{path} writes {key} again: take it from {STUDENTS[name][0]}'
    if is_distill:  # the knowledge base teacher is the student's base ViT
        base = cfg.model.teachers[cfg.model.base_teacher].source
        assert base.model_name == student.base.model_name
        assert base.checkpoint == student.base.checkpoint
