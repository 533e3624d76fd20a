"""The config is the run, whatever runs it.

The tiny cached distillation config trains from its teacher-feature cache
and is guarded against NaN/Inf losses under mmpretrain's own installed
``tools/train.py`` and under ``Runner.from_cfg``, not only under kiv's
``tools/train.py`` (which used to rewrite the config itself: other entry
points silently ran the teachers online, without the guard).

The subprocess runs import this module through ``custom_imports`` for
:class:`EntryPointProbeHook`, which records what the run really used.
"""
from __future__ import annotations

import copy
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from kiv.testing.paths import REPO
from kiv.testing.paths import TINY_DISTILL_CFG as BASE_CFG
from kiv.testing.tools import tool_env

#: this folder, on the subprocesses' PYTHONPATH (they import this module)
HERE = osp.dirname(osp.abspath(__file__))
CACHED_CFG = BASE_CFG.replace('.py', '_cached.py')
#: where the cached config looks for its cache (relative to the cwd)
CACHE_REL = 'work_dirs/teacher_cache/kiv_adapter-vit-t14-reg4_tiny-coco'
VIEWS = 2


@HOOKS.register_module()
class EntryPointProbeHook(Hook):
    """Writes what a run used to a json file: the teachers' types and
    parameter counts, the dataset, the hooks, whether the statistics were
    fixed before training, and, per training iteration, how far the
    teachers' outputs are from the rows stored in the cache for the
    batch's views.

    Args:
        out (str): the json file.
    """

    priority = 'LOWEST'

    def __init__(self, out: str) -> None:
        self.out = out
        self.record: dict = dict(iterations=[])

    @staticmethod
    def _model(runner):
        model = runner.model
        return getattr(model, 'module', model)

    def before_train(self, runner) -> None:
        model = self._model(runner)
        self.record.update(
            teachers={n: type(t).__name__ for n, t in model.teachers.items()},
            teacher_numel=sum(p.numel() for t in model.teachers.values()
                              for p in list(t.parameters()) +
                              list(t.buffers())),
            statistics_ready=bool(model.latent.statistics_ready),
            dataset=type(runner.train_dataloader.dataset).__name__,
            hooks=[type(h).__name__ for h in runner.hooks])

    @torch.no_grad()
    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        from kiv.datasets.teacher_cache import TeacherCacheDataset
        model = self._model(runner)
        data = model.data_preprocessor(data_batch, False)
        outputs = model.extract_teachers(data['inputs'],
                                         data['data_samples'])
        stored = TeacherCacheDataset(CACHE_REL)  # reads the files again
        worst = 0.0
        for i, sample in enumerate(data['data_samples']):
            row = sample.cache_image * stored.index['views'] + \
                sample.cache_view
            for key, value in stored.targets(row).items():
                name, kind = key.split('.', 1)
                out = outputs[name]
                got = out.summary[i] if kind == 'summary' else \
                    out.features[int(kind.split('.')[1])][i]
                worst = max(worst, float((got - value.float()).abs().max()))
        self.record['iterations'].append(
            dict(max_abs_diff_to_cache=worst,
                 samples=len(data['data_samples'])))

    def after_train(self, runner) -> None:
        with open(self.out, 'w', encoding='utf-8') as f:
            json.dump(self.record, f)


def _env() -> dict:
    return dict(tool_env(), PYTHONPATH=os.pathsep.join([REPO, HERE]))


def _run(cmd: list[str], cwd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _mmpretrain_train_tool() -> str:
    import mmpretrain
    path = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools',
                    'train.py')
    assert osp.isfile(path), f'mmpretrain ships no tools/train.py: {path}'
    return path


@pytest.fixture(scope='module')
def cached_root(tmp_path_factory) -> str:
    """Tiny COCO images, the tiny teachers and their cache, written by
    tools/cache_teachers.py where the cached config looks for it."""
    from kiv.testing import make_tiny_coco
    from kiv.testing.tiny_teachers import create_tiny_teachers
    root = str(tmp_path_factory.mktemp('entry_points'))
    make_tiny_coco(osp.join(root, 'data', 'coco'), num_train=4, num_val=2)
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    _run([sys.executable, osp.join(REPO, 'tools', 'cache_teachers.py'),
          BASE_CFG, '--out', CACHE_REL, '--views', str(VIEWS),
          '--workers', '0'], cwd=root)
    return root


@pytest.fixture
def private_root(cached_root, tmp_path) -> str:
    """A copy of ``cached_root`` that a test may change."""
    root = str(tmp_path / 'root')
    shutil.copytree(cached_root, root)
    return root


def _wrapper_config(path: str, probe: str | None = None) -> str:
    """The cached config plus the probe hook (every other hook kept)."""
    cfg = Config.fromfile(CACHED_CFG)
    hooks = [h.to_dict() for h in cfg.custom_hooks]
    imports = ['kiv']
    if probe is not None:
        hooks.append(dict(type='EntryPointProbeHook', out=probe))
        imports.append('test_entry_points')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(f'_base_ = [{CACHED_CFG!r}]\n'
                f'custom_imports = dict(imports={imports!r}, '
                'allow_failed_imports=False)\n'
                f'custom_hooks = {hooks!r}\n')
    return path


_SHORT = ['train_cfg.max_iters=2', 'default_hooks.logger.interval=1',
          'default_hooks.checkpoint.interval=1']


@pytest.mark.slow
def test_mmpretrain_train_tool_trains_from_the_cache(private_root):
    """(a) mmpretrain's own tools/train.py on the cached config loads no
    teacher weights: every teacher file is deleted after caching (the
    student's frozen base gets a copy of its own) and the run succeeds;
    (b) the teachers' outputs during training are the cache's rows for
    the batch's views, the teachers are kiv.CachedTeacher with no weights,
    and the statistics were fixed from the cache before step 0 (no
    warm-up pass)."""
    teachers = osp.join(private_root, 'data', 'tiny_teachers')
    base = osp.join(private_root, 'data', 'student_base.pth')
    shutil.copy(osp.join(teachers, 'dinov2_tiny.pth'), base)
    shutil.rmtree(teachers)
    probe = osp.join(private_root, 'probe.json')
    cfg = _wrapper_config(osp.join(private_root, 'run_cfg.py'), probe)
    out = _run([sys.executable, _mmpretrain_train_tool(), cfg, '--work-dir',
                'run', '--cfg-options', *_SHORT,
                f'model.student.base.checkpoint={base}'], cwd=private_root)
    assert 'Iter(train) [2/2]' in out and 'loss_clip_summary' in out
    assert 'StatisticsWarmupHook: fixed' not in out
    with open(probe, encoding='utf-8') as f:
        record = json.load(f)
    assert record['teachers'] == dict(dinov2='CachedTeacher',
                                      clip='CachedTeacher',
                                      detector='CachedTeacher')
    assert record['teacher_numel'] == 0
    assert record['statistics_ready']
    assert record['dataset'] == 'TeacherCacheDataset'
    assert record['hooks'].count('NonFiniteLossHook') == 1
    assert len(record['iterations']) == 2
    for it in record['iterations']:
        assert it['samples'] == 4
        assert it['max_abs_diff_to_cache'] == 0.0


@pytest.mark.slow
def test_mmpretrain_train_tool_skips_a_nan_loss(private_root):
    """(c) mmpretrain's own tools/train.py on the cached config: a NaN
    loss (CLIP's losses weighted by NaN through a cfg-option) is skipped
    before the update, by the guard of kiv's default runtime."""
    out = _run([sys.executable, _mmpretrain_train_tool(), CACHED_CFG,
                '--work-dir', 'run', '--cfg-options', *_SHORT,
                'model.teacher_weights.clip=nan'], cwd=private_root)
    for it in (1, 2):
        assert (f'NonFiniteLossHook: iteration {it}: non-finite loss'
                in out), out[-3000:]
    assert 'loss_clip_summary=nan' in out and 'batch skipped' in out
    from kiv.utils.checkpoint import safe_torch_load
    states = [safe_torch_load(osp.join(private_root, 'run',
                                       f'iter_{it}.pth'))['state_dict']
              for it in (1, 2)]
    bn_statistics = ('running_mean', 'running_var', 'num_batches_tracked')
    for key, value in states[0].items():  # no update was applied
        assert torch.isfinite(value).all(), key
        # forward-updated buffers, and the inherited outputs' statistics
        # measured after the last step (kiv.InheritedCalibrationHook)
        if not key.endswith(bn_statistics) and '_calibrations.' not in key:
            assert torch.equal(value, states[1][key]), key
    assert int(states[1]['latent.summary_calibrations.clip.num_updates'])


@pytest.mark.slow
def test_runner_from_cfg_reads_the_cache_and_guards_the_loss(
        private_root, monkeypatch):
    """A user's script: ``Runner.from_cfg`` on the cached config builds
    kiv.CachedTeacher stand-ins with the cache's statistics, trains from
    kiv.TeacherCacheDataset, and the config key ``nonfinite_loss`` (read
    by the default runtime's hook) stops at a NaN loss."""
    from mmengine.runner import Runner

    import kiv  # noqa: F401
    from kiv.engine.hooks import NonFiniteLossError, NonFiniteLossHook
    from kiv.models.teachers import CachedTeacher
    from kiv.models.teachers import teacher as teacher_module

    def no_teacher(self, *args, **kwargs):
        raise AssertionError('a kiv.Teacher was built from the cached config')

    monkeypatch.setattr(teacher_module.Teacher, '__init__', no_teacher)
    monkeypatch.chdir(private_root)
    cfg = Config.fromfile(CACHED_CFG)
    cfg.work_dir = osp.join(private_root, 'runner')
    cfg.train_cfg.max_iters = 1
    cfg.model.teacher_weights = dict(clip=float('nan'))
    cfg.nonfinite_loss = dict(action='stop')
    runner = Runner.from_cfg(cfg)
    teachers = runner.model.teachers
    assert set(teachers) == {'dinov2', 'clip', 'detector'}
    assert all(isinstance(t, CachedTeacher) for t in teachers.values())
    assert runner.model.latent.statistics_ready
    assert type(runner.train_dataloader.dataset).__name__ == \
        'TeacherCacheDataset'
    assert sum(isinstance(h, NonFiniteLossHook) for h in runner.hooks) == 1
    with pytest.raises(NonFiniteLossError,
                       match="loss_clip_summary=nan.*action='stop'"):
        runner.train()


@pytest.mark.slow
def test_a_cache_of_other_teachers_or_data_is_refused_at_build(
        cached_root, monkeypatch):
    """The checks of tools/train.py happen where the cache is read, so
    every entry point refuses a cache that does not belong to the config,
    with one message naming what differs."""
    from mmengine.registry import DefaultScope

    import kiv  # noqa: F401
    from kiv.datasets.teacher_cache import TeacherCacheError
    from kiv.registry import DATASETS, MODELS
    monkeypatch.chdir(cached_root)
    cfg = Config.fromfile(CACHED_CFG)
    with DefaultScope.overwrite_default_scope('kiv'):
        model = copy.deepcopy(cfg.model)
        model.teachers.clip.input_size = 32
        with pytest.raises(TeacherCacheError,
                           match="teacher 'clip' config differs"):
            MODELS.build(model)
        model = copy.deepcopy(cfg.model)
        model.task_heads = dict(cls=dict(head=dict(type='LinearClsHead'),
                                         gt_field='gt_label'))
        with pytest.raises(TeacherCacheError, match='task_heads'):
            MODELS.build(model)
        dataset = copy.deepcopy(cfg.train_dataloader.dataset)
        dataset.dataset.ann_file = 'annotations/instances_val2017.json'
        with pytest.raises(TeacherCacheError, match='dataset.dataset.*'
                           'train_dataloader.dataset differs'):
            DATASETS.build(dataset)


def test_the_guard_is_in_the_config_and_reads_its_key():
    """kiv's configs hold exactly one guard, which reads the config key
    ``nonfinite_loss`` itself (other entry points); kiv's tools/train.py
    folds the key into that entry instead of adding a second guard."""
    import kiv  # noqa: F401
    from kiv.apis.launch import add_nonfinite_loss_hook
    from kiv.engine.hooks import NonFiniteLossHook

    def guards(cfg):
        return [h for h in cfg.custom_hooks if 'NonFinite' in h['type']]

    cfg = Config.fromfile(CACHED_CFG)
    assert guards(cfg) == [dict(type='kiv.NonFiniteLossHook')]
    cfg.nonfinite_loss = dict(action='stop')
    add_nonfinite_loss_hook(cfg)
    assert guards(cfg) == [dict(type='kiv.NonFiniteLossHook', action='stop')]
    assert cfg.nonfinite_loss is None

    hook = NonFiniteLossHook()
    hook.apply_config(dict(nonfinite_loss=dict(max_consecutive=2)))
    assert (hook.action, hook.max_consecutive, hook.enabled) == \
        ('skip', 2, True)
    hook = NonFiniteLossHook()
    hook.apply_config(dict(nonfinite_loss='off'))
    assert not hook.enabled
    with pytest.raises(ValueError, match='set twice'):
        NonFiniteLossHook(action='stop').apply_config(
            dict(nonfinite_loss=dict(max_total=3)))
    with pytest.raises(ValueError, match='unknown option.*max_skips'):
        NonFiniteLossHook().apply_config(
            dict(nonfinite_loss=dict(max_skips=3)))


@pytest.mark.slow
def test_every_trainable_kiv_config_holds_one_guard(kiv_demo):
    """Distillation, demo (``projects/kiv_demo/configs``) and downstream
    configs (not the import example, a user's own config) carry exactly
    one NaN guard, so mmpretrain's, mmdet's and mmseg's own tools/train.py
    run with it too."""
    import glob

    from kiv_demo.recipes import CONFIG_DIR as DEMO_CONFIGS
    configs = [p for pattern in (('configs', '**', '*.py'),
                                 ('projects', '*', 'configs', '**', '*.py'))
               for p in glob.glob(osp.join(REPO, *pattern), recursive=True)
               if '_base_' not in p and 'import_example' not in p]
    assert len(configs) > 15
    assert any(p.startswith(DEMO_CONFIGS) for p in configs)
    for path in configs:
        cfg = Config.fromfile(path)
        if not cfg.get('train_cfg'):  # test-only (e.g. zero-shot) configs
            continue
        hooks = [h for h in cfg.get('custom_hooks', None) or []
                 if 'NonFiniteLossHook' in h['type']]
        assert len(hooks) == 1, (path, cfg.get('custom_hooks', None))
