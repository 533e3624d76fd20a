"""Teacher source ``'timm'``: a timm model + a local weights file."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from functools import partial

from torch import nn

from kiv.registry import TEACHER_SOURCES
from .weights import StateDict, load_teacher_checkpoint


def timm_checkpoint_filter(model_name: str, model: nn.Module
                           ) -> Callable[[StateDict], StateDict] | None:
    """timm's ``checkpoint_filter_fn`` for ``model_name``, bound to ``model``.

    The function lives in the module that registers the model (e.g.
    ``timm.models.vision_transformer``); it converts the layouts of the
    original repositories (DINOv2, OpenAI / Open CLIP, SAM, ...) to timm's
    and resamples position embeddings to the model's grid.

    Args:
        model_name (str): timm model name, with or without a pretrained tag.
        model (nn.Module): the model built from it.

    Returns:
        Callable | None: ``state_dict -> state_dict``, or None if the model's
        module has no filter.
    """
    from timm.models import model_entrypoint
    module = sys.modules[model_entrypoint(model_name).__module__]
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    return None if filter_fn is None else partial(filter_fn, model=model)


@TEACHER_SOURCES.register_module(name='timm')
def build_timm_teacher(model_name: str,
                       checkpoint: str,
                       model_kwargs: dict | None = None,
                       use_filter_fn: bool = True,
                       strict: bool = True,
                       state_dict_key: str | None = None,
                       rename: Sequence[Sequence[str]] = (),
                       drop_keys: Sequence[str] = ()) -> nn.Module:
    """Build ``timm.create_model(model_name, pretrained=False, ...)`` and
    load a local file (``.pth`` / ``.bin`` / ``.safetensors``).

    Args:
        model_name (str): e.g. ``'vit_large_patch14_dinov2'``,
            ``'vit_base_patch16_clip_224'``, ``'samvit_base_patch16'``.
        checkpoint (str): local weights, in timm's layout or in the layout
            of the original repository when timm's filter converts it.
        model_kwargs (dict, optional): ``create_model`` arguments, e.g.
            ``dict(img_size=224, dynamic_img_size=True, num_classes=0)``.
        use_filter_fn (bool): pass the weights through timm's
            ``checkpoint_filter_fn`` of the model's module, if it has one.
            Defaults to True.
        strict (bool): keys and shapes must match exactly. Defaults to True.
        state_dict_key, rename, drop_keys: see
            :func:`~kiv.models.teachers.weights.load_teacher_checkpoint`;
            ``drop_keys`` applies after the filter, e.g. ``[r'^head\\.']``
            for a CLIP projection kept out with ``num_classes=0``.

    Returns:
        nn.Module: the timm model with its weights loaded.
    """
    import timm
    if not timm.is_model(model_name):
        close = get_close_matches(model_name, timm.list_models())
        raise ValueError(f'timm {timm.__version__} has no model '
                         f'{model_name!r}; close names: {close}')
    model = timm.create_model(model_name, pretrained=False,
                              **(model_kwargs or {}))
    convert = timm_checkpoint_filter(model_name, model) \
        if use_filter_fn else None
    load_teacher_checkpoint(model, checkpoint, state_dict_key=state_dict_key,
                            rename=rename, drop_keys=drop_keys, strict=strict,
                            convert=convert)
    return model
