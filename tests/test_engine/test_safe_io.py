"""Importing kiv changes nothing global; safe I/O is one explicit,
reversible switch, and kiv's tools turn it on.
"""
import json
import os
import os.path as osp
import shutil
import sys

import numpy as np
import pytest
import torch
from mmengine.fileio import get_file_backend
from mmengine.fileio.backends import LocalBackend
from mmengine.fileio.backends import registry_utils
from mmengine.runner import checkpoint as mm_checkpoint

import kiv
from kiv.engine import safe_io
from kiv.engine.safe_io import AtomicLocalBackend
from kiv.utils.checkpoint import (SAFE_GLOBALS, UnsafeCheckpointError,
                                  load_from_local, load_url, safe_torch_load)
from kiv.testing.paths import REPO
from kiv.testing.tools import TOY_MODULES, run_python, toy_config


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def evil_checkpoint(tmp_path):
    """A checkpoint whose ``meta`` would touch ``tmp_path/pwned`` when
    unpickled; returns its path and the marker path."""
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)},
                'meta': _Evil(str(marker))}, path)
    return path, marker


@pytest.fixture
def safe_io_off():
    """Start with safe I/O off; restore the state the test found."""
    was_on = safe_io.disable_safe_io()
    yield
    if was_on:
        safe_io.enable_safe_io()
    else:
        safe_io.disable_safe_io()


# --------------------------------------------------------------- import --
IMPORT_PROBE = r'''
import json, torch
import mmengine.runner.checkpoint as ckpt
from mmengine.fileio import get_file_backend
from mmengine.fileio.backends import registry_utils as reg

def snap():
    return dict(
        local_loader=ckpt.CheckpointLoader._schemes.get('') is
        ckpt.load_from_local,
        load_url=ckpt.load_url.__module__,
        backend=reg.backends.get('local').__name__,
        prefix_backend=reg.prefix_to_backends.get('').__name__,
        instance=type(get_file_backend('/tmp/x.pth')).__name__,
        singleton=type(get_file_backend('/tmp/x.pth',
                                        enable_singleton=True)).__name__)

before = snap()
import kiv
from kiv.utils.checkpoint import SAFE_GLOBALS
after = snap()
allowed = torch.serialization.get_safe_globals()
import sys
heads_at_import = 'kiv.models.heads' in sys.modules
from mmengine.registry import MODELS
head = MODELS.get('kiv.ZeroShotClsHead')  # a toolbox config's lookup
print(json.dumps(dict(before=before, after=after,
                      kiv_globals=[str(g) for g in SAFE_GLOBALS
                                   if g in allowed],
                      enabled=kiv.safe_io_enabled(),
                      heads_at_import=heads_at_import,
                      head=head.__module__ if head else None)))
'''


@pytest.mark.slow
def test_import_kiv_changes_nothing_global(tmp_path):
    proc = run_python(['-c', IMPORT_PROBE], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['before'] == out['after'] == dict(
        local_loader=True,
        load_url='torch.hub',
        backend='LocalBackend',
        prefix_backend='LocalBackend',
        instance='LocalBackend',
        singleton='LocalBackend')
    assert out['kiv_globals'] == []  # torch's allowlist untouched
    assert out['enabled'] is False
    # the zero-shot heads (they import mmpretrain / mmseg) are left out of
    # ``import kiv`` and found by a config's ``type='kiv.ZeroShotClsHead'``
    assert out['heads_at_import'] is False
    assert out['head'] == 'kiv.models.heads.zero_shot_cls_head'


def test_enable_is_idempotent_logged_once_and_reversible(
        safe_io_off, monkeypatch, tmp_path):
    logs = []
    monkeypatch.setattr(safe_io, 'print_log',
                        lambda msg, **kwargs: logs.append(msg))
    before = (dict(mm_checkpoint.CheckpointLoader._schemes),
              mm_checkpoint.load_url, dict(registry_utils.backends),
              dict(registry_utils.prefix_to_backends))
    cached = get_file_backend(str(tmp_path), enable_singleton=True)
    assert type(cached) is LocalBackend

    assert kiv.enable_safe_io() is True
    assert kiv.enable_safe_io() is False
    assert len(logs) == 1 and 'kiv safe I/O enabled' in logs[0]
    assert kiv.safe_io_enabled()
    assert mm_checkpoint.CheckpointLoader._schemes[''] is load_from_local
    assert mm_checkpoint.load_url is load_url
    for singleton in (False, True):  # the cached instance was dropped
        assert type(get_file_backend(
            str(tmp_path), enable_singleton=singleton)) is AtomicLocalBackend
    assert type(get_file_backend(backend_args=dict(
        backend='local'))) is AtomicLocalBackend
    # other schemes are untouched
    assert mm_checkpoint.CheckpointLoader._schemes['torchvision://'] is \
        before[0]['torchvision://']

    assert kiv.disable_safe_io() is True
    assert kiv.disable_safe_io() is False
    after = (dict(mm_checkpoint.CheckpointLoader._schemes),
             mm_checkpoint.load_url, dict(registry_utils.backends),
             dict(registry_utils.prefix_to_backends))
    assert after == before
    assert type(get_file_backend(str(tmp_path),
                                 enable_singleton=True)) is LocalBackend


def test_use_safe_io_module_switches_it_on(safe_io_off):
    sys.modules.pop('kiv.engine.use_safe_io', None)
    import kiv.engine.use_safe_io  # noqa: F401
    assert kiv.safe_io_enabled()


# ------------------------------------------------------ what it guards --
def test_safe_globals_are_allowed_only_during_a_kiv_load(tmp_path):
    path = str(tmp_path / 'numpy_meta.pth')
    torch.save({'w': torch.ones(2), 'meta': dict(
        value=np.float64(1.5), arr=np.arange(3))}, path)
    baseline = torch.serialization.get_safe_globals()
    user_global = SAFE_GLOBALS[0]  # a user put np.ndarray there first
    torch.serialization.add_safe_globals([user_global])
    try:
        loaded = safe_torch_load(path)
        assert loaded['meta']['value'] == 1.5
        allowed = torch.serialization.get_safe_globals()
        assert user_global in allowed  # not removed by our load
        assert [g for g in SAFE_GLOBALS[1:] if g in allowed] == []
        with pytest.raises(Exception, match='Weights only load failed'):
            torch.load(path, weights_only=True)  # not allowed outside
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(baseline)


def test_url_checkpoints_are_loaded_weights_only(tmp_path, monkeypatch,
                                                 safe_io_off):
    """mmengine 0.10 downloads http(s)/torchvision/open-mmlab checkpoints
    with torch's load_url, which unpickles without the weights-only
    restriction."""
    evil, marker = evil_checkpoint(tmp_path)
    good = str(tmp_path / 'good.pth')
    torch.save({'state_dict': {'w': torch.ones(2)}}, good)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def download(url, dst, *args, **kwargs):  # no network: a local copy
        shutil.copy(evil if 'evil' in url else good, dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    kiv.enable_safe_io()
    state = mm_checkpoint._load_checkpoint('https://example.com/good.pth')
    assert torch.equal(state['state_dict']['w'], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError,
                       match='https://example.com/evil1.pth'):
        mm_checkpoint._load_checkpoint('https://example.com/evil1.pth')
    assert not marker.exists()
    kiv.disable_safe_io()
    # what enable_safe_io prevents: mmengine's own URL loader runs the code
    mm_checkpoint._load_checkpoint('https://example.com/evil2.pth')
    assert marker.exists()


def test_atomic_writes_keep_normal_file_permissions(tmp_path):
    from kiv.utils.atomic import atomic_write_bytes
    path = tmp_path / 'ckpt.pth'
    atomic_write_bytes(b'data', path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


# ------------------------------------------- scripts, configs and tools --
UPSTREAM_SCRIPT = r'''
import json, sys
from mmengine.config import Config
from mmengine.runner import Runner
import mmengine.runner.checkpoint as ckpt
from mmengine.fileio import get_file_backend

report = {}
for name, cfg_path in (('plain', sys.argv[1]), ('opt_in', sys.argv[2])):
    cfg = Config.fromfile(cfg_path)  # runs custom_imports
    runner = Runner.from_cfg(cfg)
    runner.train()
    try:
        runner.load_checkpoint(sys.argv[3])
        refused = None
    except Exception as err:
        refused = type(err).__name__
    report[name] = dict(
        loader=ckpt.CheckpointLoader._schemes[''].__module__,
        backend=type(get_file_backend(cfg.work_dir)).__name__,
        refused=refused)
print(json.dumps(report))
'''


@pytest.mark.slow
def test_upstream_script_with_custom_imports(tmp_path):
    """An upstream-style script: Runner.from_cfg on a config importing kiv.

    ``imports=['kiv']`` leaves mmengine as it is (torch >= 2.6 still
    refuses the evil file, with its own error); adding
    ``'kiv.engine.use_safe_io'`` switches kiv's loader and atomic writes on.
    """
    evil, marker = evil_checkpoint(tmp_path)
    plain = toy_config(tmp_path / 'plain.py', work_dir=str(tmp_path / 'a'))
    opt_in = toy_config(tmp_path / 'opt_in.py',
                        imports=(TOY_MODULES, 'kiv',
                                 'kiv.engine.use_safe_io'),
                        work_dir=str(tmp_path / 'b'))
    script = tmp_path / 'upstream_train.py'
    script.write_text(UPSTREAM_SCRIPT)
    proc = run_python([str(script), plain, opt_in, evil], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['plain'] == dict(loader='mmengine.runner.checkpoint',
                                   backend='LocalBackend',
                                   refused='UnpicklingError')
    assert report['opt_in'] == dict(loader='kiv.utils.checkpoint',
                                    backend='AtomicLocalBackend',
                                    refused='UnsafeCheckpointError')
    assert not marker.exists()
    for work_dir in ('a', 'b'):
        assert osp.isfile(tmp_path / work_dir / 'iter_4.pth')
    assert (proc.stdout + proc.stderr).count('kiv safe I/O enabled') == 1


@pytest.mark.slow
def test_train_tool_enables_safe_io(tmp_path):
    evil, marker = evil_checkpoint(tmp_path)
    cfg = toy_config(tmp_path / 'cfg.py', load_from=evil)
    proc = run_python([osp.join(REPO, 'tools', 'train.py'), cfg,
                       '--work-dir', str(tmp_path / 'work')],
                      cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'kiv safe I/O enabled' in out
    assert 'UnsafeCheckpointError' in out and 'evil.pth' in out
    assert not marker.exists()


@pytest.mark.slow
def test_test_tool_enables_safe_io(tmp_path):
    evil, marker = evil_checkpoint(tmp_path)
    cfg = toy_config(tmp_path / 'cfg.py')
    proc = run_python([osp.join(REPO, 'tools', 'test.py'), cfg, evil,
                       '--work-dir', str(tmp_path / 'work')],
                      cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'kiv safe I/O enabled' in out
    assert 'UnsafeCheckpointError' in out and 'evil.pth' in out
    assert not marker.exists()
