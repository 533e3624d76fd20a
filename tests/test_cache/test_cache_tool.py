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
from cache_helpers import NUM_IMAGES, REPO, TINY_DISTILL_CFG

#: the fixtures tiny_root, cache, private_root (see cache_fixtures.py)
pytest_plugins = ['cache_fixtures']

TOOL = osp.join(REPO, 'tools', 'cache_teachers.py')
ARGS = ['--views', '2', '--shard-size', '1', '--workers', '0']


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS='ignore',
                OMP_NUM_THREADS='1')


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


def test_kill_resume_equals_two_rank_run(tiny_root, tmp_path):
    ref_out, out = str(tmp_path / 'ref'), str(tmp_path / 'resumed')
    # uninterrupted reference: 2 ranks (gloo on CPU) through torchrun
    ref = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
         '2', '--master_port', str(_free_port()), TOOL, TINY_DISTILL_CFG,
         '--out', ref_out, '--launcher', 'pytorch'] + ARGS,
        cwd=tiny_root, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    # the same cache in one process, killed with SIGKILL after a shard
    victim = subprocess.Popen([sys.executable, TOOL, TINY_DISTILL_CFG,
                               '--out', out] + ARGS,
                              cwd=tiny_root, env=_env(),
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
                             cwd=tiny_root, env=_env(), capture_output=True,
                             text=True, timeout=600)
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


def test_dry_run_reports_disk_use_and_writes_nothing(tiny_root, tmp_path):
    out = str(tmp_path / 'dry')
    proc = subprocess.run([sys.executable, TOOL, TINY_DISTILL_CFG, '--out',
                           out, '--views', '3', '--dtype', 'bf16',
                           '--dry-run'], cwd=tiny_root, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{NUM_IMAGES} images x 3 views, bf16' in proc.stdout
    assert 'per view' in proc.stdout and 'total' in proc.stdout
    assert not osp.exists(out)


TRAIN = osp.join(REPO, 'tools', 'train.py')
with open(TRAIN, encoding='utf-8') as _f:
    _TRAIN_WIRED = 'teacher_cache' in _f.read()


@pytest.mark.skipif(not _TRAIN_WIRED,
                    reason='tools/train.py does not honour teacher_cache yet')
def test_train_py_trains_from_the_cached_config(cache, private_root):
    """The one switch through the real command line: the shipped cached
    config trains with the teacher-only weight files deleted."""
    for name in ('clip_tiny.pth', 'retinanet_tiny.pth', 'retinanet_tiny.py'):
        os.remove(osp.join(private_root, 'data', 'tiny_teachers', name))
    proc = subprocess.run(
        [sys.executable, TRAIN,
         TINY_DISTILL_CFG.replace('.py', '_cached.py'), '--work-dir', 'run',
         '--cfg-options', f'teacher_cache={cache["dir"]}',
         'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
         'default_hooks.logger.interval=1'],
        cwd=private_root, env=_env(), capture_output=True, text=True,
        timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert 'training from the teacher cache' in out
    assert 'TeacherCacheStatisticsHook: fixed the statistics' in out
    assert 'Iter(train) [2/2]' in out and 'loss_clip_summary' in out
