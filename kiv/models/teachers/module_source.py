"""Teacher source ``'module'``: any registered or importable network plus a
raw state dict with a key filter."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmengine.registry import DefaultScope
from torch import nn

from kiv.registry import MODELS, TEACHER_SOURCES
from kiv.utils import in_own_scope
from kiv.utils.weights import load_teacher_checkpoint


def import_factory(path: str) -> Callable[..., Any]:
    """Resolve ``'package.module:attr.path'`` to a callable.

    Args:
        path (str): module and attribute path separated by ``:``, e.g.
            ``'efficientnet_lite_pytorch:EfficientNet.from_name'``.

    Returns:
        Callable: the object found.

    Raises:
        ValueError: if ``path`` is malformed or does not name a callable.
    """
    module_name, sep, attr_path = path.partition(':')
    if not sep or not module_name or not attr_path:
        raise ValueError(f"module teacher factory must look like "
                         f"'package.module:callable', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split('.'):
        if not hasattr(obj, attr):
            raise ValueError(f'module teacher factory {path!r}: '
                             f'{getattr(obj, "__name__", obj)!r} has no '
                             f'attribute {attr!r}')
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f'module teacher factory {path!r} is not callable')
    return obj


@TEACHER_SOURCES.register_module(name='module')
def build_module_teacher(checkpoint: str,
                         model: Mapping | None = None,
                         factory: str | None = None,
                         args: Sequence[Any] = (),
                         kwargs: Mapping[str, Any] | None = None,
                         strict: bool = True,
                         state_dict_key: str | None = None,
                         rename: Sequence[Sequence[str]] = (),
                         drop_keys: Sequence[str] = ()) -> nn.Module:
    """Build any network and load a raw state dict into it.

    Give exactly one of ``model`` (a config built by ``kiv.registry.MODELS``;
    types of other libraries with their scope prefix, e.g.
    ``'mmpretrain.ResNet'``, ``'mmdet.CSPDarknet'``) or ``factory`` (an import
    path called with ``args`` / ``kwargs``).

    Args:
        checkpoint (str): local weights file.
        model (dict, optional): registry config of the network.
        factory (str, optional): ``'package.module:callable'``, e.g.
            ``'efficientnet_lite_pytorch:EfficientNet.from_name'``.
        args (Sequence): positional arguments of ``factory``.
        kwargs (dict, optional): keyword arguments of ``factory``.
        strict (bool): keys and shapes must match exactly. Defaults to True.
        state_dict_key (str, optional): entry holding the weights, e.g.
            ``'state_dict'``, ``'model'``, ``'teacher'``.
        rename (Sequence[tuple[str, str]]): ``(regex, replacement)`` rules
            applied to the keys before loading, e.g.
            ``[(r'^encoder\\.', ''), (r'\\.gamma$', '.weight')]``.
        drop_keys (Sequence[str]): regexes of keys to discard after
            renaming.

    Returns:
        nn.Module: the network with its weights loaded.
    """
    if (model is None) == (factory is None):
        raise ValueError('module teacher source needs exactly one of '
                         'model=dict(type=...) or factory="pkg.mod:callable"')
    if model is not None:
        with DefaultScope.overwrite_default_scope('kiv'):
            network = MODELS.build(in_own_scope(model))
    else:
        network = import_factory(factory)(*args, **(kwargs or {}))
    if not isinstance(network, nn.Module):
        raise TypeError(f'module teacher source built '
                        f'{type(network).__name__}, not an nn.Module')
    load_teacher_checkpoint(network, checkpoint,
                            state_dict_key=state_dict_key, rename=rename,
                            drop_keys=drop_keys, strict=strict)
    return network
