"""Build modules of other OpenMMLab toolboxes from kiv code."""
from __future__ import annotations

from typing import Mapping


def in_own_scope(cfg: Mapping) -> dict:
    """Make ``type='mmdet.X'`` build inside mmdet's scope.

    A scoped type name finds the class from any registry, but the modules
    the class builds itself (its losses, coders, samplers, heads) are looked
    up in the *current* default scope, e.g. ``kiv``, where they do not
    exist. Setting ``_scope_`` makes mmengine switch to the class's own
    toolbox for the whole build.

    Args:
        cfg (Mapping): a module config.

    Returns:
        dict: a copy with ``_scope_`` set when ``type`` has a scope prefix
        and no ``_scope_`` was given.
    """
    cfg = dict(cfg)
    type_ = cfg.get('type')
    if isinstance(type_, str) and '.' in type_ and '_scope_' not in cfg:
        cfg['_scope_'] = type_.split('.', 1)[0]
    return cfg
