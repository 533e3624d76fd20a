"""Resuming a run gives bit for bit the checkpoint of the uninterrupted run.

Each test trains a real config through ``tools/train.py`` to the end with
periodic checkpoints, then resumes a second work dir from the uninterrupted
run's own middle checkpoint (``--resume <path>``) and compares every tensor
of the two final checkpoints bit for bit: model weights, BN running
statistics and other buffers, optimizer state, parameter-scheduler state and
the iteration.

mmengine's resume restores none of the global random states (Python, NumPy,
torch): it replays the data stream by skipping the batches already trained.
A resumed run is identical only if nothing draws random numbers in a fresh
run that the resumed run skips. The statistics warm-up of the online
distillation config did (294 of 404 tensors differed at iteration 20 while
it did): it now leaves the global random state as it found it.
"""
from __future__ import annotations

import os.path as osp
import random
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from kiv.testing.paths import REPO, TINY_DISTILL_CFG
from kiv.testing.tools import run_tool
from kiv.utils.checkpoint import safe_torch_load

TINY_CACHED_CFG = TINY_DISTILL_CFG.replace('.py', '_cached.py')
TINY_SEG_CFG = osp.join(
    REPO, 'configs', 'mmseg',
    'upernet_kiv-adapter-vit-t14_1xb2-2it_tiny-ade20k-48x48.py')
#: checkpoint parts compared tensor by tensor
COMPARED = ('state_dict', 'optimizer', 'param_schedulers')


def _ok(proc: subprocess.CompletedProcess) -> str:
    """The output of a finished tool run; fails the test on an error.

    Args:
        proc (subprocess.CompletedProcess): the tool run.

    Returns:
        str: stdout and stderr.
    """
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _train(cfg: str, work_dir: str, cwd: str, iters: int, every: int,
           resume: str | None = None, val_every: int | None = None,
           options: Sequence[str] = ()) -> str:
    """``tools/train.py`` with a fixed seed and deterministic algorithms.

    Args:
        cfg (str): the config file.
        work_dir (str): the run's work dir.
        cwd (str): working directory (the config's ``data/`` paths).
        iters (int): total training iterations.
        every (int): checkpoint interval in iterations.
        resume (str, optional): checkpoint to resume from.
        val_every (int, optional): validation interval in iterations;
            None validates never.
        options (Sequence[str]): more ``--cfg-options``.

    Returns:
        str: the tool's output.
    """
    args = ['train.py', cfg, '--work-dir', work_dir]
    if resume is not None:
        args += ['--resume', resume]
    args += ['--cfg-options', 'randomness.seed=0',
             'randomness.deterministic=True', f'train_cfg.max_iters={iters}',
             f'train_cfg.val_interval={val_every or 10 * iters}',
             f'default_hooks.checkpoint.interval={every}',
             'default_hooks.checkpoint.max_keep_ckpts=-1',
             *options]
    return _ok(run_tool(args, cwd))


def _leaves(obj: Any, path: str = '') -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts / lists / tuples with its path.

    Args:
        obj: a checkpoint part.
        path (str): path of ``obj``.

    Yields:
        tuple[str, Any]: ``('a.b.0', leaf)``.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f'{path}.{key}' if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f'{path}.{i}' if path else str(i))
    else:
        yield path, obj


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(
        torch.uint8), b.detach().cpu().contiguous().reshape(-1).view(
            torch.uint8))


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """Largest absolute difference of two tensors, for messages."""
    if a.shape != b.shape:
        return f'shape {tuple(a.shape)} vs {tuple(b.shape)}'
    if a.numel() == 0:
        return 'dtype differs'
    return f'{(a.double() - b.double()).abs().max().item():.3g}'


def _compare(straight: str, resumed: str, iters: int) -> int:
    """Assert that two checkpoints hold bit-identical training state.

    Args:
        straight (str): final checkpoint of the uninterrupted run.
        resumed (str): final checkpoint of the resumed run.
        iters (int): the iteration both must be at.

    Returns:
        int: the number of tensors compared.
    """
    a, b = safe_torch_load(straight), safe_torch_load(resumed)
    assert a['meta']['iter'] == b['meta']['iter'] == iters
    assert a['meta']['epoch'] == b['meta']['epoch']
    tensors, diffs, counts = 0, [], []
    for part in COMPARED:
        assert (part in a) == (part in b), part
        left = dict(_leaves(a.get(part, {}), part))
        right = dict(_leaves(b.get(part, {}), part))
        assert left.keys() == right.keys(), \
            sorted(left.keys() ^ right.keys())
        seen, differ = 0, 0
        for key, x in left.items():
            y = right[key]
            if isinstance(x, torch.Tensor):
                seen += 1
                if not isinstance(y, torch.Tensor):
                    differ += 1
                    diffs.append(f'{key}: tensor vs {type(y).__name__}')
                elif not _same_bits(x, y):
                    differ += 1
                    diffs.append(f'{key} (max abs diff '
                                 f'{_max_abs_diff(x, y)})')
            elif x != y:
                diffs.append(f'{key}: {x!r} vs {y!r}')
        tensors += seen
        if seen:
            counts.append(f"{part} {differ} of {seen}")
    assert tensors > 0
    assert not diffs, (
        f'resuming changed the training state: {len(diffs)} tensors / '
        f'values differ (tensors: {", ".join(counts)}):\n' +
        '\n'.join(diffs[:30]))
    return tensors


def _straight_and_resumed(cfg: str, root: str, cwd: str, iters: int,
                          every: int, resume_at: int,
                          val_every: int | None = None,
                          options: Sequence[str] = ()) -> tuple[str, str]:
    """Train uninterrupted, then resume from its own middle checkpoint.

    Args:
        cfg (str): the config file.
        root (str): directory for both work dirs.
        cwd (str): working directory of the runs.
        iters (int): total iterations.
        every (int): checkpoint interval.
        resume_at (int): iteration of the checkpoint to resume from.
        val_every (int, optional): validation interval; None: no validation.
        options (Sequence[str]): more ``--cfg-options``.

    Returns:
        tuple[str, str]: the output of the uninterrupted and of the resumed
        run.
    """
    straight = osp.join(root, 'straight')
    resumed = osp.join(root, 'resumed')
    first = _train(cfg, straight, cwd, iters, every, val_every=val_every,
                   options=options)
    middle = osp.join(straight, f'iter_{resume_at}.pth')
    assert osp.isfile(middle), first[-2000:]
    second = _train(cfg, resumed, cwd, iters, every, resume=middle,
                    val_every=val_every, options=options)
    assert f'resumed epoch: 0, iter: {resume_at}' in second, second[-2000:]
    assert not osp.exists(osp.join(resumed, f'iter_{resume_at}.pth'))
    _compare(osp.join(straight, f'iter_{iters}.pth'),
             osp.join(resumed, f'iter_{iters}.pth'), iters)
    return first, second


@pytest.mark.slow
def test_online_distillation_resumes_identically(distill_workdir, tmp_path):
    """The tiny distillation config, teachers online: the fresh run runs
    the statistics warm-up (random flips, a loader of its own), the resumed
    one reads the statistics from the checkpoint."""
    first, second = _straight_and_resumed(
        TINY_DISTILL_CFG, str(tmp_path), distill_workdir, iters=6, every=3,
        resume_at=3)
    assert 'StatisticsWarmupHook: fixed the statistics' in first
    assert 'StatisticsWarmupHook: fixed the statistics' not in second


@pytest.mark.slow
def test_cached_distillation_resumes_identically(distill_workdir, tmp_path):
    """The tiny cached distillation config: the cache is written once by
    tools/cache_teachers.py, both runs read it through tools/train.py (its
    statistics are the cache's, no warm-up)."""
    from mmengine.config import Config
    _ok(run_tool(['cache_teachers.py', TINY_CACHED_CFG, '--views', '2'],
                 distill_workdir))
    cache_dir = Config.fromfile(TINY_CACHED_CFG).teacher_cache
    assert osp.isdir(osp.join(distill_workdir, cache_dir))
    first, second = _straight_and_resumed(
        TINY_CACHED_CFG, str(tmp_path), distill_workdir, iters=6, every=3,
        resume_at=3)
    assert 'StatisticsWarmupHook: fixed the statistics' not in first + second


@pytest.mark.slow
def test_downstream_mmseg_resumes_identically(data_dir, exported_student,
                                              tmp_path):
    """UperNet on the exported student (tiny ADE20K): random resize, crop,
    flip and photometric distortion in the data pipeline, drop path and
    dropout in the training step (torch's global generator), and a
    validation right after the checkpoint that the resumed run does not
    repeat."""
    first, second = _straight_and_resumed(
        TINY_SEG_CFG, str(tmp_path), data_dir, iters=6, every=3,
        resume_at=3, val_every=3,
        options=[
            f'model.backbone.init_cfg.checkpoint={exported_student["path"]}',
            'param_scheduler.1.end=6'])
    # validated at 3 and 6; the resumed run at 6 only
    assert first.count('aAcc: ') == 2 and second.count('aAcc: ') == 1


def _global_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's global random states, comparable.

    Returns:
        dict: ``python``, ``numpy`` and ``torch`` states as plain values.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(),
                numpy=(kind, keys.tolist(), pos, has_gauss, cached),
                torch=torch.get_rng_state().tolist())


def _changed(before: dict[str, Any]) -> list[str]:
    """Names of the global random states that differ from ``before``."""
    after = _global_states()
    return [name for name, state in before.items() if after[name] != state]


def test_statistics_warmup_leaves_the_global_random_state(distill_workdir,
                                                          tmp_path):
    """The warm-up pass (random flips in the main process, its own data
    iterator) fixes the statistics and leaves every global random state as
    it found it: training goes on exactly as in a resumed run."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from kiv.engine.hooks import StatisticsWarmupHook
    cfg = Config.fromfile(TINY_DISTILL_CFG)
    cfg.work_dir = str(tmp_path)
    cfg.randomness = dict(seed=0)
    assert any(t.type == 'mmcv.RandomFlip' and t.prob > 0
               for t in cfg.train_dataloader.dataset.pipeline)
    runner = Runner.from_cfg(cfg)
    hooks = [h for h in runner.hooks if isinstance(h, StatisticsWarmupHook)]
    assert len(hooks) == 1
    loader = runner.train_dataloader  # built before the states are taken
    before = _global_states()
    hooks[0].before_train(runner)
    assert runner.model.latent.statistics_ready
    changed = _changed(before)
    assert not changed, f'the warm-up changed the global random state of ' \
        f'{changed}'
    # control: loading one training image draws from the global state
    loader.dataset[0]
    assert _changed(before) == ['numpy']
