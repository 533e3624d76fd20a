"""Teacher source ``'timm'``: a timm model + a local weights file.

The file is loaded by :func:`kiv.utils.timm_weights.load_timm_checkpoint`
(weights-only read, ``rename``, timm's own ``checkpoint_filter_fn`` with
every discarded entry named by ``drop_keys``, position tables resampled to
the model's size, strict loading), the same path as the student's timm base
ViT.
"""
from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches

from torch import nn

from kiv.registry import TEACHER_SOURCES
from kiv.utils.timm_weights import load_timm_checkpoint


@TEACHER_SOURCES.register_module(name='timm')
def build_timm_teacher(model_name: str,
                       checkpoint: str,
                       model_kwargs: dict | None = None,
                       use_filter_fn: bool = True,
                       resample_positions: bool = True,
                       strict: bool = True,
                       state_dict_key: str | None = None,
                       rename: Sequence[Sequence[str]] = (),
                       drop_keys: Sequence[str] = ()) -> nn.Module:
    """Build ``timm.create_model(model_name, pretrained=False, ...)`` and
    load a local file (``.pth`` / ``.bin`` / ``.safetensors``).

    Args:
        model_name (str): e.g. ``'vit_base_patch14_reg4_dinov2'``,
            ``'vit_base_patch16_clip_quickgelu_224'``,
            ``'samvit_base_patch16'``.
        checkpoint (str): local weights, in timm's layout or in the layout
            of the original repository when timm's filter converts it.
        model_kwargs (dict, optional): ``create_model`` arguments, e.g.
            ``dict(img_size=448, num_classes=0)``.
        use_filter_fn (bool): pass the weights through timm's
            ``checkpoint_filter_fn`` of the model's module, if it has one.
            Defaults to True.
        resample_positions (bool): resample NHWC ``pos_embed`` and
            ``rel_pos_h/w`` tables to the model's size
            (:func:`~kiv.utils.timm_weights.resample_position_tables`),
            e.g. SAM's 1024-px file into an ``img_size=448`` model.
            Defaults to True.
        strict (bool): keys and shapes must match exactly and every entry
            timm's filter discards must be named by ``drop_keys``. Defaults
            to True.
        state_dict_key, rename: see
            :func:`~kiv.utils.weights.load_teacher_checkpoint`.
        drop_keys (Sequence[str]): regexes of entries not to load, matched
            against the file's keys timm's filter discards (e.g.
            ``[r'^prompt_encoder\\.', r'^mask_decoder\\.']`` for the SAM
            file, ``[r'^mask_token$']`` for the DINOv2 file) and against the
            converted keys (e.g. ``[r'^head\\.']`` for a CLIP projection
            kept out with ``num_classes=0``).

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
    load_timm_checkpoint(model, model_name, checkpoint,
                         use_filter_fn=use_filter_fn,
                         resample_positions=resample_positions,
                         strict=strict, state_dict_key=state_dict_key,
                         rename=rename, drop_keys=drop_keys)
    return model
