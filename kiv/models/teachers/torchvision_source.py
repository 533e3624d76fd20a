"""Teacher source ``'torchvision'``: a torchvision model + a weights file."""
from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches

from torch import nn

from kiv.registry import TEACHER_SOURCES
from kiv.utils.weights import load_teacher_checkpoint


@TEACHER_SOURCES.register_module(name='torchvision')
def build_torchvision_teacher(model_name: str,
                              checkpoint: str,
                              model_kwargs: dict | None = None,
                              strict: bool = True,
                              state_dict_key: str | None = None,
                              rename: Sequence[Sequence[str]] = (),
                              drop_keys: Sequence[str] = ()) -> nn.Module:
    """Build ``torchvision.models.get_model(model_name, weights=None)`` and
    load a local file (e.g. a ``resnet50-11ad3fa6.pth`` download).

    Args:
        model_name (str): torchvision constructor name, e.g. ``'resnet18'``.
        checkpoint (str): local weights in torchvision's layout.
        model_kwargs (dict, optional): constructor arguments, e.g.
            ``dict(num_classes=10)``.
        strict (bool): keys and shapes must match exactly. Defaults to True.
        state_dict_key, rename, drop_keys: see
            :func:`~kiv.utils.weights.load_teacher_checkpoint`.

    Returns:
        nn.Module: the torchvision model with its weights loaded.
    """
    import torchvision
    names = torchvision.models.list_models()
    if model_name not in names:
        raise ValueError(f'torchvision has no model {model_name!r}; close '
                         f'names: {get_close_matches(model_name, names)}')
    model = torchvision.models.get_model(model_name, weights=None,
                                         **(model_kwargs or {}))
    load_teacher_checkpoint(model, checkpoint, state_dict_key=state_dict_key,
                            rename=rename, drop_keys=drop_keys, strict=strict)
    return model
