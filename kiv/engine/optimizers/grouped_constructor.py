"""mmengine's parameter-wise options in as few parameter groups as they need.

mmengine's ``DefaultOptimWrapperConstructor`` gives every parameter its own
parameter group as soon as a config sets ``paramwise_cfg`` (no decay on
norms and biases, ``custom_keys``, ...). A ViT-Adapter student has about 400
trainable tensors, so every optimizer step loops in Python over 400 groups
three times (the update, gradient clipping's parameter list, the param
scheduler), and ``foreach`` / ``fused`` optimizers, which update all tensors
of a group in a few kernels, get one tensor per group.

:class:`GroupedOptimWrapperConstructor` applies exactly mmengine's rules
(its ``add_params``) and then puts the parameters whose options are all
equal (``lr``, ``weight_decay``, ``betas``, ...) into one group, as timm's
``param_groups_weight_decay`` keeps two: the same option for every
parameter, a handful of groups. Groups keep the order in which their first
parameter appears in the model, and their parameters the model's order.
Each parameter's update is unchanged (with ``foreach`` bit for bit; the
total gradient norm of clipping sums the parameters in group order, so its
rounding can differ in the last bit).

Example::

    optim_wrapper = dict(
        constructor='kiv.GroupedOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, fused=True),
        paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))

A checkpoint's optimizer state is saved per group: a run resumes with the
constructor it started with.
"""
from __future__ import annotations

import logging
from typing import Any, Hashable

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from kiv.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['GroupedOptimWrapperConstructor', 'merge_param_groups']


def _hashable(value: Any) -> Hashable:
    """A hashable stand-in for an option value (lists, dicts, tensors)."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


_FROZEN = ' is skipped since its requires_grad=False'


class _FrozenParameters(logging.Filter):
    """Holds back mmengine's one warning per frozen parameter, keeping
    the names."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.endswith(_FROZEN):
            self.names.append(message[:-len(_FROZEN)])
            return False
        return True


def merge_param_groups(groups: list[dict]) -> list[dict]:
    """Merge parameter groups whose options are all equal.

    Args:
        groups (list[dict]): parameter groups, each with ``params`` (a list
            of parameters) and its options.

    Returns:
        list[dict]: one plain-dict group per distinct set of options (option
        names and values), in the order of each set's first group; its
        ``params`` are those of its groups in their order.
    """
    merged: dict[Hashable, dict] = {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != 'params'}
        key = _hashable(options)
        if key not in merged:
            merged[key] = dict(options, params=[])
        merged[key]['params'].extend(group['params'])
    return list(merged.values())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class GroupedOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with equal parameter groups merged.

    Args and ``paramwise_cfg`` keys are those of mmengine's
    ``DefaultOptimWrapperConstructor``; every parameter gets the options
    that constructor gives it. Without ``paramwise_cfg`` there is one group
    already and nothing changes.

    Frozen parameters (a distiller's teachers, the student's frozen
    knowledge base: thousands of tensors in a real recipe) are left out as
    mmengine leaves them out, but logged in one line (their number and the
    first names) instead of one warning each.
    """

    def add_params(self,
                   params: list[dict],
                   module: nn.Module,
                   prefix: str = '',
                   is_dcn_module: int | float | None = None) -> None:
        """Add ``module``'s parameters to ``params``, merged by options.

        Args:
            params (list[dict]): the groups so far; extended in place.
            module (nn.Module): the module whose parameters are added.
            prefix (str): the module's name prefix. Defaults to ''.
            is_dcn_module (int | float, optional): as mmengine's.
        """
        if prefix:  # mmengine's recursion into submodules
            super().add_params(params, module, prefix, is_dcn_module)
            return
        groups: list[dict] = []
        logger = MMLogger.get_current_instance()
        frozen = _FrozenParameters()
        logger.addFilter(frozen)
        try:
            super().add_params(groups, module, prefix, is_dcn_module)
        finally:
            logger.removeFilter(frozen)
        merged = merge_param_groups(groups)
        params.extend(merged)
        if frozen.names:
            shown = ', '.join(frozen.names[:3])
            more = ', ...' if len(frozen.names) > 3 else ''
            print_log(
                f'{type(self).__name__}: {len(frozen.names)} frozen '
                f'parameters (requires_grad=False) are not optimized '
                f'({shown}{more}); {len(groups)} trainable in '
                f'{len(merged)} parameter groups',
                logger='current', level=logging.INFO)
