"""Distillation from the cache with a real mmengine Runner: the losses match
an online run on the same views, and no teacher is built or read."""
import os
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

from kiv.datasets.teacher_cache import use_teacher_cache
from kiv.registry import MODELS
from kiv.testing.paths import TINY_DISTILL_CFG, in_dir
from kiv.testing.tiny_cache import SHARD_SIZE, VIEWS, tiny_cfg

ITERS = 2


class LossRecorder(Hook):
    """Keeps every training iteration's logged losses."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append({k: float(v.detach()) for k, v in
                            outputs.items() if k.startswith('loss')})


def _short(cfg, work_dir: str, name: str, load_from: str | None = None):
    """A few iterations, no validation, no checkpoints."""
    cfg.work_dir = work_dir
    cfg.experiment_name = name
    cfg.train_cfg.max_iters = ITERS
    cfg.train_cfg.val_interval = 1000
    cfg.default_hooks.checkpoint.interval = 1000
    cfg.default_hooks.logger.interval = 1
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator',
                'test_dataloader', 'test_cfg', 'test_evaluator'):
        cfg[key] = None
    cfg.load_from = load_from
    return cfg


def _train(cfg) -> tuple[LossRecorder, Runner]:
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    return recorder, runner


@pytest.mark.slow
def test_cached_run_matches_online_run_without_teachers(
        cache, private_root, monkeypatch, tmp_path):
    """(2) Same views, same initial weights, same fixed statistics: the
    cached run's losses equal the online run's up to the fp16 targets.
    (6) The cached run builds no teacher and reads no teacher file: the
    teacher-only weight files are deleted and kiv.Teacher is made
    unbuildable; the model holds no teacher weights."""
    with in_dir(cache['root']):
        init = str(tmp_path / 'init.pth')
        model = MODELS.build(tiny_cfg().model)
        torch.save({'state_dict': model.state_dict()}, init)
        del model
        online = _short(tiny_cfg(), str(tmp_path / 'online'), 'online', init)
        online.train_dataloader.dataset = dict(
            type='kiv.TeacherCacheDataset', cache_dir=cache['dir'],
            load_targets=False)  # exactly the cached views, real teachers
        online.custom_hooks = list(online.get('custom_hooks', [])) + [
            dict(type='kiv.TeacherCacheStatisticsHook',
                 cache_dir=cache['dir'])
        ]
        ref, _ = _train(online)

    from kiv.models.teachers import teacher as teacher_module
    teachers = osp.join(private_root, 'data', 'tiny_teachers')
    for name in ('clip_tiny.pth', 'retinanet_tiny.pth', 'retinanet_tiny.py'):
        os.remove(osp.join(teachers, name))
    # dinov2_tiny.pth stays: it is also the student's frozen base

    def no_teacher(self, *args, **kwargs):
        raise AssertionError('a kiv.Teacher was built in a cached run')

    monkeypatch.setattr(teacher_module.Teacher, '__init__', no_teacher)
    with in_dir(private_root):
        cached = tiny_cfg()
        cached.teacher_cache = cache['dir']  # the one switch
        use_teacher_cache(cached)
        got, runner = _train(_short(cached, str(tmp_path / 'cached'),
                                    'cached', init))

    assert len(ref.losses) == len(got.losses) == ITERS
    assert set(ref.losses[0]) == set(got.losses[0])
    assert {'loss_dinov2_summary', 'loss_clip_features',
            'loss_detector_features'} <= set(got.losses[0])
    # the only difference is the fp16 storage of the targets; the tiny
    # CLIP's CLS token hardly varies between images, so its rounding error
    # is a few % of its spread (index['rounding_error']): loss within 1 %
    assert cache['index']['rounding_error']['clip.summary'] > 0.01
    for it, (a, b) in enumerate(zip(ref.losses, got.losses)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-2, abs=1e-4), \
                (it, key, a[key], b[key])
    model = runner.model
    assert all(type(t).__name__ == 'CachedTeacher'
               for t in model.teachers.values())
    assert sum(p.numel() for t in model.teachers.values()
               for p in t.parameters()) == 0
    assert sum(b.numel() for t in model.teachers.values()
               for b in t.buffers()) == 0
    assert model.latent.statistics_ready


def test_cached_config_names_its_cache_where_it_is_read(cache):
    """The shipped cached config states the cache where it is consumed
    (model.teacher_cache, kiv.TeacherCacheDataset with the base's dataset
    as its dataset, validation off), so it is the run under any entry point;
    use_teacher_cache moves every place to another cache, idempotently,
    and online_config gives back what the cache is written from."""
    from mmengine.config import Config

    from kiv.datasets.teacher_cache import TeacherCacheWriter
    from kiv.datasets.teacher_cache.config import online_config
    cfg = Config.fromfile(TINY_DISTILL_CFG.replace('.py', '_cached.py'))
    base = tiny_cfg()
    assert cfg.teacher_cache.startswith('work_dirs/teacher_cache/')
    assert cfg.model.teacher_cache == cfg.teacher_cache
    assert cfg.model.teachers == base.model.teachers  # checked, kept
    dataset = cfg.train_dataloader.dataset
    assert dataset.type == 'kiv.TeacherCacheDataset'
    assert dataset.cache_dir == cfg.teacher_cache
    assert dataset.dataset == base.train_dataloader.dataset
    assert cfg.val_dataloader is None and cfg.test_dataloader is None

    online = online_config(cfg)
    assert 'teacher_cache' not in online.model
    assert online.model == base.model
    assert online.train_dataloader.dataset == base.train_dataloader.dataset
    with in_dir(cache['root']):  # the same cache as from the base config
        writer = TeacherCacheWriter(online, cache['dir'] + '-again',
                                    views=VIEWS, shard_size=SHARD_SIZE,
                                    num_workers=0, log=lambda msg: None)
        assert writer.prepare()['cache_id'] == cache['index']['cache_id']

    for _ in range(2):
        use_teacher_cache(cfg, cache['dir'])
        assert cfg.teacher_cache == cfg.model.teacher_cache == \
            cfg.train_dataloader.dataset.cache_dir == cache['dir']
    assert cfg.train_dataloader.batch_size == 4  # the loader settings stay
    assert cfg.model.teachers == base.model.teachers


@pytest.mark.parametrize('teachers', [('dinov2', 'clip', 'detector'),
                                      ('dinov2', 'clip')])
def test_warmup_takes_the_statistics_of_the_cache_every_teacher_reads(
        cache, teachers):
    """A model whose teachers are all kiv.CachedTeacher of one cache (here
    built without ``teacher_cache``, as a config with task heads is): the
    warm-up hook fixes the cache's exact statistics, of the model's
    teachers only, and never touches the data."""
    from kiv.engine.hooks import StatisticsWarmupHook
    from kiv.fileio.teacher_cache_format import cache_statistics
    from kiv.models.distillers.teacher_cache import cached_teachers
    cfg = tiny_cfg()
    cfg.model.teachers = cached_teachers(
        {n: cfg.model.teachers[n] for n in teachers}, cache['dir'],
        standardize=None)
    cfg.model.latent.teachers = {
        n: v for n, v in (cfg.model.latent.get('teachers') or {}).items()
        if n in teachers}
    with in_dir(cache['root']):
        model = MODELS.build(cfg.model)
    assert not model.latent.statistics_ready

    class NoData:
        def __iter__(self):
            raise AssertionError('the warm-up read the training data')

    class FakeRunner:
        pass

    runner = FakeRunner()
    runner.model, runner.train_dataloader = model, NoData()
    StatisticsWarmupHook(num_batches=10).before_train(runner)
    assert model.latent.statistics_ready
    sums, _ = cache_statistics(cache['dir'])
    keys = model.latent.statistic_keys()
    assert keys and all(k.split('.')[0] in teachers for k in keys)
    with in_dir(cache['root']):
        reference = MODELS.build(cfg.model)
    reference.load_statistics({k: sums[k] for k in keys})
    got = model.latent.state_dict()
    compared = [k for k in got if 'standardizer' in k]
    assert compared
    for key in compared:
        torch.testing.assert_close(got[key],
                                   reference.latent.state_dict()[key],
                                   rtol=0, atol=0, msg=key)
