"""Checkpoints load with weights_only=True; resume restores the full state;
a malicious pickle is refused.

mmengine's own loader and file backend are kiv's only after
``kiv.enable_safe_io()`` (the ``safe_io`` fixture, what kiv's tools call);
``safe_torch_load`` is safe on its own.
"""
import copy
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner

import kiv  # noqa: F401
from kiv.utils.checkpoint import UnsafeCheckpointError, safe_torch_load
from kiv.engine.hooks.safe_checkpoint_hook import (restore_history_buffers,
                                                   to_weights_only_data)


class ToyModel(BaseModel):

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.lin(inputs)
        if mode == 'loss':
            return dict(loss=(out - inputs.sum(1, keepdim=True)).pow(2).mean())
        return out


class RecordStateHook(Hook):
    """Records the state a run starts training from (after resume)."""

    def before_train(self, runner) -> None:
        runner.recorded = copy.deepcopy(dict(
            iter=runner.iter,
            optim=runner.optim_wrapper.state_dict(),
            hub=runner.message_hub.state_dict()))


def make_runner(work_dir: str, max_iters: int, **kwargs) -> Runner:
    dataset = [dict(inputs=torch.randn(4, generator=torch.Generator()
                                       .manual_seed(i))) for i in range(16)]
    torch.manual_seed(0)  # same initial weights in every run
    return Runner(
        model=ToyModel(),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=dataset, batch_size=2,
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False,
                             begin=0, end=8),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[dict(type='kiv.SafeCheckpointHook'),
                      RecordStateHook()],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=2, by_epoch=False)),
        randomness=dict(seed=0),
        **kwargs)


def test_resume_restores_identical_state(tmp_path):
    straight = make_runner(str(tmp_path / 'straight'), 4)
    straight.train()

    first = make_runner(str(tmp_path / 'resumed'), 2)
    first.train()
    ckpt = osp.join(str(tmp_path / 'resumed'), 'iter_2.pth')
    saved = safe_torch_load(ckpt)  # plain weights_only load works
    assert saved['meta']['iter'] == 2

    second = make_runner(str(tmp_path / 'resumed'), 4, resume=True,
                         load_from=ckpt)
    second.train()
    rec = second.recorded
    assert rec['iter'] == 2
    # optimizer state (momentum buffers, lr) is the saved one
    saved_optim = saved['optimizer']
    for k, v in saved_optim['state'].items():
        torch.testing.assert_close(rec['optim']['state'][k]['momentum_buffer'],
                                   v['momentum_buffer'], rtol=0, atol=0)
    assert rec['optim']['param_groups'][0]['lr'] == \
        saved_optim['param_groups'][0]['lr']
    # message hub: history buffers rebuilt with identical values
    hub = restore_history_buffers(saved['message_hub'])
    for key, buf in hub['log_scalars'].items():
        assert (rec['hub']['log_scalars'][key]._log_history ==
                buf._log_history).all(), key
    for key in ('seed', 'experiment_name'):
        assert rec['hub']['runtime_info'][key] == hub['runtime_info'][key]
    # continuing gives exactly the weights of an uninterrupted run
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_plain_round_trip_keeps_values():
    import numpy as np
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(1.5)
    buf.update(2.5, count=2)
    state = {'log_scalars': {'loss': buf}, 'info': np.float64(3.0),
             'arr': np.arange(3)}
    plain = to_weights_only_data(state)
    assert isinstance(plain['info'], float)
    assert isinstance(plain['arr'], torch.Tensor)
    back = restore_history_buffers(plain)['log_scalars']['loss']
    assert back.mean() == buf.mean() and back.current() == buf.current()


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_malicious_checkpoint_is_refused(tmp_path, safe_io):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)},
                'meta': _Evil(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match='evil.pth') as err:
        safe_torch_load(path)
    assert 'system' in str(err.value)
    # through mmengine's loader (load_from, init_cfg Pretrained, resume)
    from mmengine.runner.checkpoint import _load_checkpoint
    with pytest.raises(UnsafeCheckpointError):
        _load_checkpoint(path, map_location='cpu')
    runner = make_runner(str(tmp_path / 'wd'), 2, resume=True,
                         load_from=path)
    with pytest.raises(UnsafeCheckpointError):
        runner.train()
    assert not marker.exists()


@pytest.mark.slow
def test_env_override_does_not_disable_weights_only(tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD must not reopen arbitrary pickle."""
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'meta': _Evil(str(marker))}, path)
    code = ('import kiv\nfrom kiv.utils.checkpoint import safe_torch_load\n'
            f'safe_torch_load({path!r})\n')
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
    proc = subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'UnsafeCheckpointError' in proc.stderr
    assert not marker.exists()


def test_pretrained_init_cfg_loads_state_dict(tmp_path):
    from mmengine.model import BaseModule

    class Wrapped(BaseModule):

        def __init__(self, init_cfg=None):
            super().__init__(init_cfg=init_cfg)
            self.lin = nn.Linear(3, 2)

    src = Wrapped()
    path = str(tmp_path / 'weights.pth')
    torch.save({'state_dict': src.state_dict()}, path)
    model = Wrapped(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    torch.testing.assert_close(model.lin.weight, src.lin.weight,
                               rtol=0, atol=0)


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        safe_torch_load(str(tmp_path / 'nope.pth'))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch, safe_io):
    """A write that dies half-way leaves the previous checkpoint intact."""
    from mmengine.fileio import get_file_backend
    from mmengine.runner.checkpoint import save_checkpoint

    from kiv.engine.safe_io import AtomicLocalBackend
    path = str(tmp_path / 'iter_1.pth')
    assert isinstance(get_file_backend(path), AtomicLocalBackend)
    save_checkpoint({'state_dict': {'w': torch.ones(3)}}, path)

    def crash(fd, *args, **kwargs):  # the disk fills up mid-write
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', crash)
    with pytest.raises(OSError, match='No space'):
        save_checkpoint({'state_dict': {'w': torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert safe_torch_load(path)['state_dict']['w'].sum() == 3
    assert os.listdir(tmp_path) == ['iter_1.pth']  # no temp file left
