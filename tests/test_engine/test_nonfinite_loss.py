"""A NaN/Inf loss never reaches the weights or a checkpoint.

A toy model with two loss terms whose ``loss_b`` turns non-finite at chosen
iterations trains in a real mmengine Runner with ``kiv.NonFiniteLossHook``.
"""
import copy
import math
import os
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner

import kiv  # noqa: F401
from kiv.utils.checkpoint import safe_torch_load
from kiv.apis.launch import add_nonfinite_loss_hook
from kiv.engine.hooks.nonfinite_loss_hook import (NonFiniteLossError,
                                                  NonFiniteLossHook,
                                                  NonFiniteWeightsError,
                                                  _describe, nonfinite_terms)
from kiv.testing.paths import REPO
from kiv.testing.tools import run_python, toy_config


class TwoTermModel(BaseModel):
    """``loss_a`` is always finite; ``loss_b`` is ``bad_value`` at the
    1-based training iterations in ``bad_iters``."""

    def __init__(self, bad_iters=(), bad_value=float('nan')):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.bad_iters = set(bad_iters)
        self.bad_value = bad_value
        self.calls = 0

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.lin(inputs)
        if mode != 'loss':
            return out
        self.calls += 1
        loss_b = out.abs().mean()
        if self.calls in self.bad_iters:
            loss_b = loss_b * self.bad_value
        return dict(loss_a=(out - 1).pow(2).mean(), loss_b=loss_b)


class RecordHook(Hook):
    """Weights and gradients after every iteration."""

    priority = 'LOWEST'

    def __init__(self):
        self.weights = []
        self.grads = []

    def before_train(self, runner):
        self.weights.append(copy.deepcopy(runner.model.state_dict()))

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.weights.append(copy.deepcopy(runner.model.state_dict()))
        self.grads.append([
            None if p.grad is None else p.grad.clone()
            for p in runner.model.parameters()
        ])


def make_runner(work_dir, model, hook_cfg, max_iters=6, optim_wrapper=None,
                extra_hooks=(), **kwargs):
    dataset = [
        dict(inputs=torch.randn(4, generator=torch.Generator().manual_seed(i)))
        for i in range(32)
    ]
    torch.manual_seed(0)
    record = RecordHook()
    hooks = [dict(type='kiv.SafeCheckpointHook'), record, *extra_hooks]
    if hook_cfg is not None:
        hooks.insert(0, hook_cfg)
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f'nonfinite_{osp.basename(str(work_dir))}_'
        f'{os.getpid()}',
        train_dataloader=dict(dataset=dataset,
                              batch_size=2,
                              sampler=dict(type='DefaultSampler',
                                           shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=optim_wrapper
        or dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=hooks,
        default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=2, by_epoch=False)),
        log_level='INFO',
        **kwargs)
    runner.record = record
    return runner


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _log_lines(runner, text):
    with open(osp.join(runner.log_dir, f'{runner.timestamp}.log')) as f:
        return [ln for ln in f if text in ln]


def _checkpoints_are_finite(work_dir):
    names = sorted(n for n in os.listdir(work_dir) if n.endswith('.pth'))
    for name in names:
        state = safe_torch_load(osp.join(work_dir, name))['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values()), name
    return names


# ----------------------------------------------------------------- skip --
@pytest.mark.parametrize('wrapper', ['OptimWrapper', 'AmpOptimWrapper'])
def test_skip_leaves_weights_unchanged_and_names_the_term(
        tmp_path, monkeypatch, wrapper):
    optim = dict(type=wrapper, optimizer=dict(type='SGD', lr=0.1,
                                              momentum=0.9))
    if wrapper == 'AmpOptimWrapper':
        # mmengine refuses AMP without a GPU; on CPU its GradScaler is a
        # pass-through and autocast runs in bfloat16: the wrapper's own
        # backward/step still run, which is what the guard must precede
        from mmengine.optim.optimizer import amp_optimizer_wrapper
        monkeypatch.setattr(amp_optimizer_wrapper, 'is_cuda_available',
                            lambda: True)
        optim['dtype'] = 'bfloat16'
    runner = make_runner(tmp_path / wrapper, TwoTermModel(bad_iters=[3]),
                         dict(type='kiv.NonFiniteLossHook'),
                         optim_wrapper=optim)
    runner.train()
    weights = runner.record.weights  # [initial, after it 1, ..., after it 6]
    assert _same(weights[3], weights[2])  # iteration 3 changed nothing
    for it in (1, 2, 4, 5, 6):
        assert not _same(weights[it], weights[it - 1]), it
    assert all(g is None or not g.any() for g in runner.record.grads[2])
    assert runner.message_hub.get_scalar(
        'train/nonfinite_skips').current() == 1
    lines = _log_lines(runner, 'NonFiniteLossHook: iteration')
    assert len(lines) == 1
    assert 'WARNING' in lines[0]
    assert 'iteration 3: non-finite loss (loss=nan): loss_b=nan' in lines[0]
    assert 'loss_a' not in lines[0]
    assert 'batch skipped: no backward, no optimizer step' in lines[0]
    assert _checkpoints_are_finite(runner.work_dir) == [
        'iter_2.pth', 'iter_4.pth', 'iter_6.pth'
    ]
    # the guard is removed after the run
    assert 'update_params' not in vars(runner.optim_wrapper)
    assert 'parse_losses' not in vars(runner.model)


def test_skip_limit_of_consecutive_losses_stops_the_run(tmp_path):
    runner = make_runner(tmp_path, TwoTermModel(bad_iters=range(4, 100),
                                                bad_value=float('inf')),
                         dict(type='kiv.NonFiniteLossHook',
                              max_consecutive=2),
                         max_iters=8)
    with pytest.raises(NonFiniteLossError) as err:
        runner.train()
    message = str(err.value)
    assert 'iteration 6: non-finite loss (loss=inf): loss_b=inf' in message
    assert '3 consecutive non-finite losses (max_consecutive=2)' in message
    assert 'iter_4.pth' in message and '--resume' in message
    assert err.value.terms == {'loss_b': math.inf}
    assert err.value.iteration == 6
    weights = runner.record.weights
    assert len(weights) == 6  # initial + iterations 1-5
    assert _same(weights[5], weights[3])  # 4 and 5 skipped
    assert _same(runner.model.state_dict(), weights[3])  # so was 6
    assert _checkpoints_are_finite(runner.work_dir) == [
        'iter_2.pth', 'iter_4.pth'
    ]


def test_skip_limit_of_total_losses(tmp_path):
    runner = make_runner(tmp_path, TwoTermModel(bad_iters=[2, 4, 6]),
                         dict(type='kiv.NonFiniteLossHook', max_total=2),
                         max_iters=8)
    with pytest.raises(NonFiniteLossError,
                       match=r'iteration 6:.*3 non-finite losses in this '
                       r'run \(max_total=2\)'):
        runner.train()


def test_skip_with_gradient_accumulation_keeps_the_schedule(tmp_path):
    """The skipped micro-batch counts in the accumulation window; the
    gradients accumulated so far in that window are dropped."""
    runner = make_runner(
        tmp_path, TwoTermModel(bad_iters=[4]),
        dict(type='kiv.NonFiniteLossHook'),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1),
                           accumulative_counts=2))
    runner.train()
    weights = runner.record.weights
    assert runner.optim_wrapper.inner_count == 6
    # steps after iterations 2 and 6 only: iteration 4's window was dropped
    for it, stepped in enumerate([False, True, False, False, False, True],
                                 start=1):
        assert _same(weights[it], weights[it - 1]) != stepped, it


# ----------------------------------------------------------------- stop --
def test_stop_raises_before_the_update_and_keeps_checkpoints(tmp_path):
    runner = make_runner(tmp_path, TwoTermModel(bad_iters=[5]),
                         dict(type='kiv.NonFiniteLossHook', action='stop'))
    with pytest.raises(NonFiniteLossError) as err:
        runner.train()
    message = str(err.value)
    assert message.startswith('NonFiniteLossHook: iteration 5: non-finite '
                              'loss (loss=nan): loss_b=nan. Stopping the '
                              "run: action='stop'.")
    assert 'No update was applied' in message and 'iter_4.pth' in message
    assert _same(runner.model.state_dict(), runner.record.weights[4])
    assert _checkpoints_are_finite(runner.work_dir) == [
        'iter_2.pth', 'iter_4.pth'
    ]
    with open(osp.join(runner.work_dir, 'last_checkpoint')) as f:
        assert f.read().endswith('iter_4.pth')


def test_without_the_guard_nan_reaches_the_weights(tmp_path):
    """What the hook prevents (the test above fails without it)."""
    runner = make_runner(tmp_path, TwoTermModel(bad_iters=[3]), None,
                         max_iters=4)
    runner.train()
    state = safe_torch_load(osp.join(runner.work_dir,
                                     'iter_4.pth'))['state_dict']
    assert not all(torch.isfinite(v).all() for v in state.values())


# ---------------------------------------------------------- checkpoints --
class PoisonHook(Hook):
    """Puts a NaN into the weights after iteration 3 (a finite loss)."""

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter == 2:
            with torch.no_grad():
                runner.model.lin.bias.fill_(float('nan'))


def test_checkpoint_with_nan_weights_is_not_written(tmp_path):
    runner = make_runner(tmp_path, TwoTermModel(),
                         dict(type='kiv.NonFiniteLossHook'),
                         extra_hooks=[PoisonHook()])
    with pytest.raises(NonFiniteWeightsError,
                       match=r'refusing to write the checkpoint at iteration '
                       r'4: 1 weight tensor\(s\) hold NaN/Inf values: '
                       r'lin.bias;.*iter_2.pth') as err:
        runner.train()
    assert err.value.keys == ['lin.bias']
    assert _checkpoints_are_finite(runner.work_dir) == ['iter_2.pth']
    assert not any('.part' in n for n in os.listdir(runner.work_dir))


def test_resume_keeps_the_counters(tmp_path):
    first = make_runner(tmp_path, TwoTermModel(bad_iters=[1, 3]),
                        dict(type='kiv.NonFiniteLossHook'), max_iters=4)
    first.train()
    ckpt = osp.join(str(tmp_path), 'iter_4.pth')
    meta = safe_torch_load(ckpt)['meta']['kiv_nonfinite_loss']
    assert meta == dict(total=2, consecutive=1, last_bad_iter=2)
    second = make_runner(tmp_path, TwoTermModel(bad_iters=[1]),
                         dict(type='kiv.NonFiniteLossHook', max_total=2),
                         max_iters=6, resume=True, load_from=ckpt)
    with pytest.raises(NonFiniteLossError, match='max_total=2'):
        second.train()  # the third skip of the run, counted across resume


# --------------------------------------------------------------- units --
def test_nonfinite_terms_and_arguments():
    log_vars = dict(loss=torch.tensor(float('nan')),
                    loss_a=torch.tensor(1.0),
                    **{'seg.loss_ce': torch.tensor([1.0, float('inf')])},
                    acc=torch.tensor(float('nan')))
    assert nonfinite_terms(log_vars) == {'seg.loss_ce': math.inf}
    assert nonfinite_terms(dict(loss=torch.tensor(1.0),
                                acc=float('nan')))['acc'] != 0
    assert nonfinite_terms(None) == {}
    assert _describe({'seg.loss_ce': math.inf}) == 'seg.loss_ce=inf'
    assert 'no logged loss term is non-finite' in _describe({})
    with pytest.raises(ValueError, match='action'):
        NonFiniteLossHook(action='ignore')
    with pytest.raises(ValueError, match='max_consecutive'):
        NonFiniteLossHook(max_consecutive=-1)
    with pytest.raises(ValueError, match='max_total'):
        NonFiniteLossHook(max_total=1.5)
    assert NonFiniteLossHook(max_total=None).max_total is None


def test_train_tool_adds_the_guard_by_default_and_reads_the_config(capsys):
    def hooks(cfg_dict, action=None):
        cfg = Config(cfg_dict)
        add_nonfinite_loss_hook(cfg, action)
        return [h for h in cfg.custom_hooks
                if 'NonFinite' in h['type']]

    assert hooks({}) == [dict(type='kiv.NonFiniteLossHook')]
    assert hooks(dict(nonfinite_loss=dict(action='stop'))) == [
        dict(type='kiv.NonFiniteLossHook', action='stop')
    ]
    assert hooks(dict(nonfinite_loss='off')) == []
    assert hooks({}, 'off') == []
    assert hooks(dict(nonfinite_loss=dict(max_total=3)), 'stop') == [
        dict(type='kiv.NonFiniteLossHook', max_total=3, action='stop')
    ]
    own = dict(type='NonFiniteLossHook', max_consecutive=1)
    assert hooks(dict(custom_hooks=[own])) == [own]
    assert hooks(dict(custom_hooks=[own]), 'skip') == [
        dict(own, action='skip')
    ]
    with pytest.raises(SystemExit):
        hooks(dict(nonfinite_loss=dict(max_skips=3)))
    assert 'unknown option(s) max_skips' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hooks(dict(nonfinite_loss=dict(), custom_hooks=[own]))
    assert 'set twice' in capsys.readouterr().err


# ---------------------------------------------------- tools/train.py --
@pytest.mark.slow
def test_train_tool_skips_a_nan_loss_by_default(tmp_path):
    cfg = toy_config(tmp_path / 'cfg.py', model=dict(type='ToyNet',
                                                     nan_iters=[2]))
    work = tmp_path / 'work'
    proc = run_python([osp.join(REPO, 'tools', 'train.py'), cfg,
                       '--work-dir', str(work)], cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert ('NonFiniteLossHook: iteration 2: non-finite loss (loss=nan): '
            'loss_b=nan; batch skipped') in out
    assert _checkpoints_are_finite(str(work)) == ['iter_2.pth', 'iter_4.pth']


@pytest.mark.slow
def test_train_tool_stop_mode_exits_naming_the_term(tmp_path):
    cfg = toy_config(tmp_path / 'cfg.py',
                     model=dict(type='ToyNet', nan_iters=[2]),
                     default_hooks=dict(checkpoint=dict(
                         type='CheckpointHook', interval=1, by_epoch=False)))
    work = tmp_path / 'work'
    proc = run_python([osp.join(REPO, 'tools', 'train.py'), cfg,
                       '--work-dir', str(work), '--nonfinite-loss', 'stop'],
                      cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    lines = [ln for ln in out.splitlines() if 'NonFiniteLossHook:' in ln]
    assert len(lines) == 1 and ' ERROR - ' in lines[0]
    assert ('NonFiniteLossHook: iteration 2: non-finite loss (loss=nan): '
            "loss_b=nan. Stopping the run: action='stop'") in lines[0]
    assert 'work/iter_1.pth, was written before it' in lines[0]
    assert 'Traceback' not in out
    assert _checkpoints_are_finite(str(work)) == ['iter_1.pth']


# --------------------------------------------------- distributed (gloo) --
def _ddp_worker(rank, world_size, port, queue):
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import OptimWrapper
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        # only rank 0 sees a NaN at iteration 2
        model = TwoTermModel(bad_iters=[2] if rank == 0 else [])
        ddp = MMDistributedDataParallel(module=model)
        optim = OptimWrapper(torch.optim.SGD(ddp.parameters(), lr=0.1))

        class FakeRunner:
            iter = 0
            work_dir = '/nonexistent'

            def __init__(self):
                from mmengine.logging import MessageHub, MMLogger
                self.model, self.optim_wrapper = ddp, optim
                self.message_hub = MessageHub.get_instance(f'hub{rank}')
                self.logger = MMLogger.get_instance(f'log{rank}')

        runner = FakeRunner()
        hook = NonFiniteLossHook()
        hook.before_train(runner)
        states = []
        for it in range(3):
            runner.iter = it
            hook.before_train_iter(runner, it)
            data = dict(inputs=torch.ones(2, 4) * (rank + 1))
            ddp.train_step(data, optim_wrapper=optim)
            states.append([p.detach().tolist() for p in model.parameters()])
        hook.after_train(runner)
        queue.put((rank, hook.total, states))  # plain lists: we exit next
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_skip_together(tmp_path):
    """One rank's NaN skips the step on every rank: no DDP hang, no drift.
    """
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # fork: the workers share this process's imports (spawn would import
    # kiv again in each, ~10 s on 2 cores); like DataLoader workers
    ctx = mp.get_context('fork')
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, 2, port, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:  # a rank that did not skip would hang in backward
            rank, total, states = queue.get(timeout=30)
            results[rank] = (total, states)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[0][0] == results[1][0] == 1  # both counted the skip
    states0, states1 = results[0][1], results[1][1]
    assert states0 == states1  # the ranks never drift apart
    assert states0[1] == states0[0]  # iteration 2 skipped on both ranks
    assert states0[2] != states0[1]  # and training goes on
