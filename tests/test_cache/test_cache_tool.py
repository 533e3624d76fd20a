"""tools/cache_teachers.py end to end: a run killed with SIGKILL mid-way and
resumed gives exactly the cache of an uninterrupted run split over two
ranks by mmengine's pytorch launcher (torchrun)."""
import glob
import json
import os
import os.path as osp
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from kiv.testing.paths import REPO, TINY_DISTILL_CFG
from kiv.testing.tiny_cache import NUM_IMAGES
from kiv.testing.tools import tool_env

TOOL = osp.join(REPO, 'tools', 'cache_teachers.py')
ARGS = ['--views', '2', '--shard-size', '1', '--workers', '0']


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _shards(out: str) -> list[str]:
    """The finished shards (not their statistic side files)."""
    return sorted(p for p in glob.glob(osp.join(out, 'shard-*.safetensors'))
                  if not p.endswith('.stats.safetensors'))


def _tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


@pytest.mark.slow
def test_kill_resume_equals_two_rank_run(tiny_root, tmp_path):
    ref_out, out = str(tmp_path / 'ref'), str(tmp_path / 'resumed')
    # uninterrupted reference: 2 ranks (gloo on CPU) through torchrun
    ref = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
         '2', '--master_port', str(_free_port()), TOOL, TINY_DISTILL_CFG,
         '--out', ref_out, '--launcher', 'pytorch'] + ARGS,
        cwd=tiny_root, env=tool_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    # the same cache in one process, killed with SIGKILL after a shard
    victim = subprocess.Popen([sys.executable, TOOL, TINY_DISTILL_CFG,
                               '--out', out] + ARGS,
                              cwd=tiny_root, env=tool_env(),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not _shards(out) and victim.poll() is None and \
            time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    first_output = victim.communicate()[0]
    assert victim.returncode == -signal.SIGKILL, first_output[-3000:]
    done = len(_shards(out))
    assert 1 <= done < NUM_IMAGES, 'the kill did not land mid-way'
    with open(osp.join(out, 'index.json')) as f:
        assert json.load(f)['complete'] is False
    assert 'per view' in first_output and 'total' in first_output

    resumed = subprocess.run([sys.executable, TOOL, TINY_DISTILL_CFG,
                              '--out', out] + ARGS,
                             cwd=tiny_root, env=tool_env(),
                             capture_output=True, text=True, timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert 'resuming:' in output, output[-3000:]
    assert 'teacher cache complete: 16 views in 8 shards' in output
    assert not glob.glob(osp.join(out, '.*.part'))
    assert not glob.glob(osp.join(out, '*.stats.safetensors'))

    ref_output = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_output[-3000:]
    assert [osp.basename(p) for p in _shards(ref_out)] == \
        [osp.basename(p) for p in _shards(out)]
    for a, b in zip(_shards(ref_out), _shards(out)):
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (a, key)
    stats = [_tensors(osp.join(d, 'statistics.safetensors'))
             for d in (ref_out, out)]
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
    with open(osp.join(ref_out, 'index.json')) as f:
        ref_index = json.load(f)
    with open(osp.join(out, 'index.json')) as f:
        index = json.load(f)
    assert index['complete'] and index['cache_id'] == ref_index['cache_id']
    assert index['shards'] == ref_index['shards']


@pytest.mark.slow
def test_dry_run_reports_disk_use_and_writes_nothing(tiny_root, tmp_path):
    out = str(tmp_path / 'dry')
    proc = subprocess.run([sys.executable, TOOL, TINY_DISTILL_CFG, '--out',
                           out, '--views', '3', '--dtype', 'bf16',
                           '--dry-run'], cwd=tiny_root, env=tool_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{NUM_IMAGES} images x 3 views, bf16' in proc.stdout
    assert 'per view' in proc.stdout and 'total' in proc.stdout
    assert not osp.exists(out)


@pytest.mark.slow
def test_reuse_copies_every_teacher_another_cache_holds(cache, tmp_path):
    """--reuse on the command line: a cache of the same views holding every
    teacher of the config gives them all (no teacher is run on the data),
    bit for bit; one written for other views is refused, naming why."""
    out = str(tmp_path / 'reused')
    proc = subprocess.run(
        [sys.executable, TOOL, TINY_DISTILL_CFG, '--out', out, '--views',
         '2', '--workers', '0', '--reuse', cache['dir']],
        cwd=cache['root'], env=tool_env(), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ('dinov2', 'clip', 'detector'):
        assert f"teacher '{name}': outputs copied from" in proc.stdout
    index = json.load(open(osp.join(out, 'index.json')))
    assert all(e['reused_from']['cache_id'] == cache['index']['cache_id']
               for e in index['teachers'].values())
    mine = _tensors(_shards(out)[0])
    theirs = {}
    for path in _shards(cache['dir']):
        for key, value in _tensors(path).items():
            theirs.setdefault(key, []).append(value)
    for key, value in mine.items():
        if key.startswith('target.'):
            assert torch.equal(value, torch.cat(theirs[key])), key
    bad = subprocess.run(
        [sys.executable, TOOL, TINY_DISTILL_CFG, '--out',
         str(tmp_path / 'bad'), '--views', '3', '--reuse', cache['dir']],
        cwd=cache['root'], env=tool_env(), capture_output=True, text=True,
        timeout=600)
    assert bad.returncode != 0
    assert 'views per image: 2 there, 3 here' in bad.stderr + bad.stdout


TRAIN = osp.join(REPO, 'tools', 'train.py')
CACHED_CFG = TINY_DISTILL_CFG.replace('.py', '_cached.py')


@pytest.mark.parametrize('config,switch', [
    (CACHED_CFG, '--cfg-options'),  # moves the cached config's cache
    (TINY_DISTILL_CFG, '--teacher-cache'),  # turns an online config cached
])
@pytest.mark.slow
def test_train_py_trains_from_the_cache_it_is_told(cache, private_root,
                                                   config, switch):
    """kiv's tools/train.py: ``--cfg-options teacher_cache=DIR`` on the
    shipped cached config and ``--teacher-cache DIR`` on the online config
    train from DIR (not from the cached config's own path, where there is
    no cache) with the teacher-only weight files deleted."""
    for name in ('clip_tiny.pth', 'retinanet_tiny.pth', 'retinanet_tiny.py'):
        os.remove(osp.join(private_root, 'data', 'tiny_teachers', name))
    options = ['train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
               'default_hooks.logger.interval=1']
    if switch == '--teacher-cache':
        args = ['--teacher-cache', cache['dir'], '--cfg-options', *options]
    else:
        args = ['--cfg-options', f'teacher_cache={cache["dir"]}', *options]
    proc = subprocess.run(
        [sys.executable, TRAIN, config, '--work-dir', 'run', *args],
        cwd=private_root, env=tool_env(), capture_output=True, text=True,
        timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f'training from the teacher cache {cache["dir"]}' in out
    assert f'read from the teacher cache {cache["dir"]}' in out
    assert 'fixed the statistics of 7 teacher outputs from all 16 cached ' \
        'views' in out
    assert 'StatisticsWarmupHook: fixed' not in out
    assert 'Iter(train) [2/2]' in out and 'loss_clip_summary' in out
    # the config dumped to the work dir is the run, for any entry point
    from mmengine.config import Config
    dumped = Config.fromfile(osp.join(private_root, 'run',
                                      osp.basename(config)))
    assert dumped.model.teacher_cache == cache['dir']
    assert dumped.train_dataloader.dataset.type == 'kiv.TeacherCacheDataset'
    assert dumped.train_dataloader.dataset.cache_dir == cache['dir']
    assert dumped.val_dataloader is None


@pytest.mark.slow
def test_train_py_refuses_a_config_naming_two_caches(cache, private_root):
    """model.teacher_cache changed alone (not through teacher_cache): one
    error line naming both places, nothing trained."""
    proc = subprocess.run(
        [sys.executable, TRAIN, CACHED_CFG, '--work-dir', 'run',
         '--cfg-options', f'model.teacher_cache={cache["dir"]}'],
        cwd=private_root, env=tool_env(), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith('error: the config names different '
                                  'teacher caches: teacher_cache=')
    assert f"model.teacher_cache='{cache['dir']}'" in proc.stderr
