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

Options are compared as mmengine writes them: a ``custom_keys`` group
carries mmengine's ``lr_mult`` / ``decay_mult`` notes and an explicit base
``lr``, so a custom key that only zeroes the decay keeps a group of its own
beside the norms and biases (the same update; one group more).

A checkpoint's optimizer state is saved per group: a run resumes with the
constructor it started with.
"""
from __future__ import annotations

import logging

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from kiv.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['GroupedOptimWrapperConstructor', 'merge_param_groups']


class _FrozenWarnings(logging.Filter):
    """Drops mmengine's warning per frozen parameter (the constructor
    logs them in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(
            ' is skipped since its requires_grad=False')


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
    merged: dict[str, dict] = {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != 'params'}
        # repr: exact for floats, and lists / dicts / tensors have no hash
        key = repr(sorted(options.items()))
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
        quiet = _FrozenWarnings()
        logger.addFilter(quiet)
        try:
            super().add_params(groups, module, prefix, is_dcn_module)
        finally:
            logger.removeFilter(quiet)
        merged = merge_param_groups(groups)
        params.extend(merged)
        frozen = [n for n, p in module.named_parameters()
                  if not p.requires_grad]
        if frozen:
            more = ', ...' if len(frozen) > 3 else ''
            print_log(
                f'{type(self).__name__}: {len(frozen)} frozen parameters '
                f'(requires_grad=False) are not optimized '
                f'({", ".join(frozen[:3])}{more}); {len(groups)} trainable '
                f'in {len(merged)} parameter groups',
                logger='current', level=logging.INFO)
