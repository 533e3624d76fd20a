"""``kiv.GroupedOptimWrapperConstructor``: mmengine's rules, few groups."""
from __future__ import annotations

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.optim.scheduler import LinearParamScheduler
from torch import nn

import kiv  # noqa: F401  registers kiv.GroupedOptimWrapperConstructor
from kiv.engine.optimizers import merge_param_groups

PARAMWISE = dict(
    norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
    custom_keys={'.gamma': dict(lr_mult=10.0, decay_mult=0.0),
                 'head': dict(lr_mult=0.5)})


class _Block(nn.Module):

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc(self.norm(x))


class _Net(nn.Module):

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Block() for _ in range(3)])
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _wrapper(model: nn.Module, grouped: bool, **optimizer):
    cfg = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05,
                              **optimizer),
               paramwise_cfg=PARAMWISE)
    if grouped:
        cfg['constructor'] = 'kiv.GroupedOptimWrapperConstructor'
    return build_optim_wrapper(model, cfg)


def _options(wrapper) -> dict[int, dict]:
    """Parameter id -> its group's options (the optimizer's defaults
    filled in, as torch fills them)."""
    return {id(p): {k: v for k, v in g.items() if k != 'params'}
            for g in wrapper.optimizer.param_groups for p in g['params']}


def test_same_options_per_parameter_in_few_groups():
    model = _Net()
    default = _wrapper(model, grouped=False)
    grouped = _wrapper(model, grouped=True)
    # every trainable parameter, the same options as mmengine gives it
    assert _options(grouped) == _options(default)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(default.optimizer.param_groups) == len(trainable)
    # gates (10x lr, no decay) / norms and biases (no decay) / decayed
    # weights / the head (0.5x lr; its custom key decays its bias too)
    groups = grouped.optimizer.param_groups
    assert sorted((g['lr'], g['weight_decay']) for g in groups) == [
        (5e-4, 0.05), (1e-3, 0.0), (1e-3, 0.05), (1e-2, 0.0)]
    # groups in the order of their first parameter, parameters in model
    # order; the frozen layer in no group
    order = {id(p): i for i, p in enumerate(model.parameters())}
    firsts = [order[id(g['params'][0])] for g in groups]
    assert firsts == sorted(firsts)
    for g in groups:
        idx = [order[id(p)] for p in g['params']]
        assert idx == sorted(idx)
    assert not any(p is model.frozen.weight for g in groups
                   for p in g['params'])


@pytest.mark.parametrize('optimizer', [dict(foreach=True), dict()])
def test_updates_equal_mmengines_bit_for_bit(optimizer):
    """Merged groups change no parameter's update (no clipping: its total
    norm's summation order is the one thing grouping changes)."""
    torch.manual_seed(0)
    model_a = _Net()
    model_b = _Net()
    model_b.load_state_dict(model_a.state_dict())
    wrap_a = _wrapper(model_a, grouped=False)
    wrap_b = _wrapper(model_b, grouped=True, **optimizer)
    x = torch.randn(16, 8)
    target = torch.randint(0, 3, (16, ))
    for _ in range(5):
        for model, wrapper in ((model_a, wrap_a), (model_b, wrap_b)):
            loss = nn.functional.cross_entropy(model(x), target)
            wrapper.update_params(loss)
    for (name, a), b in zip(model_a.state_dict().items(),
                            model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_adamw_on_the_merged_groups():
    torch.manual_seed(0)
    model_a, model_b = _Net(), _Net()
    model_b.load_state_dict(model_a.state_dict())
    wrap_a = _wrapper(model_a, grouped=False)
    wrap_b = _wrapper(model_b, grouped=True, fused=True)
    assert wrap_b.optimizer.defaults['fused']
    x = torch.randn(16, 8)
    target = torch.randint(0, 3, (16, ))
    for _ in range(5):
        for model, wrapper in ((model_a, wrap_a), (model_b, wrap_b)):
            wrapper.update_params(
                nn.functional.cross_entropy(model(x), target))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scheduler_keeps_each_groups_multiplier():
    model = _Net()
    wrapper = _wrapper(model, grouped=True)
    sched = LinearParamScheduler(wrapper, 'lr', start_factor=0.1,
                                 end_factor=1.0, begin=0, end=4)
    for _ in range(2):
        wrapper.step()
        sched.step()
    # the same warm-up factor (< 1) of each group's own lr
    groups = wrapper.optimizer.param_groups
    assert sorted({g['initial_lr'] for g in groups}) == [5e-4, 1e-3, 1e-2]
    factor = groups[0]['lr'] / groups[0]['initial_lr']
    assert 0.1 < factor < 1.0
    for g in groups:
        assert g['lr'] == pytest.approx(factor * g['initial_lr'])


def test_without_paramwise_cfg_one_group():
    model = _Net()
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='AdamW', lr=1e-3),
        constructor='kiv.GroupedOptimWrapperConstructor'))
    assert len(wrapper.optimizer.param_groups) == 1


def test_shared_parameter_added_once_with_bypass_duplicate():
    model = _Net()
    model.tied = model.head  # the same parameters under two names
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
        constructor='kiv.GroupedOptimWrapperConstructor',
        paramwise_cfg=dict(PARAMWISE, bypass_duplicate=True)))
    params = [p for g in wrapper.optimizer.param_groups for p in g['params']]
    assert len(params) == len({id(p) for p in params})


def test_merge_param_groups_unhashable_options():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = merge_param_groups([
        dict(params=[a], betas=[0.9, 0.99], extra=dict(k=1)),
        dict(params=[b], betas=(0.9, 0.999)),
        dict(params=[c], betas=[0.9, 0.99], extra=dict(k=1))])
    assert [[id(p) for p in g['params']] for g in groups] == [
        [id(a), id(c)], [id(b)]]
    assert groups[0]['betas'] == [0.9, 0.99]


def test_frozen_parameters_logged_once_not_per_parameter():
    """mmengine warns once per frozen tensor (thousands for a distiller's
    teachers); the constructor logs their number in one line."""
    import logging

    from mmengine.logging import MMLogger

    class _Records(logging.Handler):

        def __init__(self) -> None:
            super().__init__(level=logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    records = _Records()
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        model = _Net()
        model.blocks.requires_grad_(False)  # 15 frozen tensors
        wrapper = _wrapper(model, grouped=True)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert not [m for m in records.messages
                if 'is skipped since its requires_grad=False' in m]
    summary = [m for m in records.messages if 'frozen parameters' in m]
    assert summary == [
        'GroupedOptimWrapperConstructor: 17 frozen parameters '
        '(requires_grad=False) are not optimized (blocks.0.gamma, '
        'blocks.0.norm.weight, blocks.0.norm.bias, ...); 2 trainable in '
        '1 parameter groups'], summary
    # the logger filters nothing afterwards
    assert not logger.filters
    params = [p for g in wrapper.optimizer.param_groups for p in g['params']]
    assert [id(p) for p in params] == [id(p) for p in model.head.parameters()]
