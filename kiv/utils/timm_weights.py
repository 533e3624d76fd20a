"""Loading a local weights file into a timm model.

Used by the timm teacher source (``kiv.models.teachers.timm_source``) and
the student's timm base ViT (``kiv.models.backbones.base_vit``), so both
read a file the same way (:func:`load_timm_checkpoint`):

1. read it (``weights_only=True`` or safetensors, see
   :mod:`kiv.utils.weights`) and apply the ``rename`` rules;
2. timm's own ``checkpoint_filter_fn`` of the model's module converts the
   layouts of the original repositories (DINOv2, OpenAI / OpenCLIP, SAM ...)
   to timm's. It may throw entries away (SAM's prompt encoder and mask
   decoder, DINOv2's ``mask_token``): each must be named by ``drop_keys``,
   otherwise loading fails (nothing is dropped silently);
3. :func:`resample_position_tables` resamples the position tables timm's
   filter leaves at the file's size (SAM / ViTDet-style NHWC ``pos_embed``
   and the relative position tables ``rel_pos_h`` / ``rel_pos_w``) to the
   model's, e.g. SAM's 1024-px file into a 448-px model;
4. ``drop_keys`` removes converted keys the model does not have, and the
   rest is loaded strictly.

What timm's filters do (timm 1.0.x):

- ``vision_transformer``: OpenAI CLIP's original layout (``visual.*``) ->
  timm, DINOv2's original layout -> timm (``register_tokens`` ->
  ``reg_token``, the CLS position added to ``cls_token``, ``mask_token``
  discarded), absolute ``pos_embed`` resampled to the model's grid. timm's
  own files (e.g. the Hugging Face ``timm/...`` safetensors) pass unchanged.
- ``vision_transformer_sam``: ``image_encoder.*`` -> timm (prefix stripped,
  ``mlp.lin1/2`` -> ``mlp.fc1/2``), every other entry of a SAM file
  (``prompt_encoder.*``, ``mask_decoder.*``) discarded. It does NOT resample
  ``pos_embed`` or the global-attention ``rel_pos_h/w`` (step 3 does).
"""
from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor, nn

from .state_dict import StateDict
from .weights import convert_checked, load_teacher_checkpoint

__all__ = [
    'timm_checkpoint_filter', 'resample_rel_pos', 'resample_position_tables',
    'load_timm_checkpoint'
]

#: Relative position tables ``(2 * size - 1, head_dim)`` of SAM / ViTDet /
#: MViT-style attention (timm ``vision_transformer_sam``).
REL_POS_KEY = re.compile(r'(^|\.)rel_pos_[hw]$')


def timm_checkpoint_filter(model_name: str, model: nn.Module
                           ) -> Callable[[StateDict], StateDict] | None:
    """timm's ``checkpoint_filter_fn`` for ``model_name``, bound to ``model``.

    The function lives in the module that registers the model (e.g.
    ``timm.models.vision_transformer``); it converts the layouts of the
    original repositories (DINOv2, OpenAI / Open CLIP, SAM, ...) to timm's
    and, for ``VisionTransformer`` models, resamples position embeddings to
    the model's grid.

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


def resample_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Resample a relative position table to ``length`` rows.

    Linear interpolation along the relative distance, the exact operation
    SAM's and timm's ``get_rel_pos`` apply at run time when the table does
    not fit the attention's size (ViTDet / SAM fine-tuning at other
    resolutions).

    Args:
        rel_pos (Tensor): ``(2 * S - 1, C)`` table for an ``S``-token side.
        length (int): rows wanted, ``2 * S' - 1``.

    Returns:
        Tensor: ``(length, C)``, in the dtype of ``rel_pos``.
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos.float().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
        size=length, mode='linear')
    return resized.reshape(-1, length).permute(1, 0).to(rel_pos.dtype)


def resample_position_tables(state_dict: StateDict,
                             model: nn.Module) -> StateDict:
    """Resample position tables the model has at another size.

    Handles the two kinds timm's filters leave at the file's size:

    - ``pos_embed`` of shape ``(1, H, W, C)`` (SAM / ViTDet, NHWC):
      :func:`timm.layers.resample_abs_pos_embed_nhwc` (bicubic, antialias),
      the function timm's ``VisionTransformerSAM`` itself applies at run
      time to inputs of another size;
    - ``*.rel_pos_h`` / ``*.rel_pos_w`` of shape ``(2 * S - 1, C)``:
      :func:`resample_rel_pos` (linear), as ``get_rel_pos`` at run time.

    So a SAM file loaded into a 448-px model computes exactly what the
    1024-px model computes on a 448-px image. Every resampled key is
    logged; other shape differences are left to the strict loader to
    report.

    Args:
        state_dict (dict[str, Tensor]): weights in the model's layout.
        model (nn.Module): the model they are for.

    Returns:
        dict[str, Tensor]: the weights with the tables resampled.
    """
    from timm.layers import resample_abs_pos_embed_nhwc
    own = model.state_dict()
    out, resampled = {}, []
    for key, value in state_dict.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            out[key] = value
            continue
        if (REL_POS_KEY.search(key) and value.dim() == target.dim() == 2
                and value.shape[1] == target.shape[1]):
            value = resample_rel_pos(value, target.shape[0])
        elif (key.split('.')[-1] == 'pos_embed'
              and value.dim() == target.dim() == 4
              and value.shape[0] == target.shape[0] == 1
              and value.shape[-1] == target.shape[-1]):
            value = resample_abs_pos_embed_nhwc(value,
                                                list(target.shape[1:3]))
        else:
            out[key] = value
            continue
        resampled.append(f'{key} {tuple(state_dict[key].shape)} -> '
                         f'{tuple(value.shape)}')
        out[key] = value
    if resampled:
        print_log(f'resampled {len(resampled)} position tables to the '
                  f'model\'s size: {"; ".join(resampled)}',
                  logger='current', level=logging.INFO)
    return out


def load_timm_checkpoint(model: nn.Module,
                         model_name: str,
                         checkpoint: str,
                         use_filter_fn: bool = True,
                         resample_positions: bool = True,
                         strict: bool = True,
                         state_dict_key: str | None = None,
                         rename: Sequence[Sequence[str]] = (),
                         drop_keys: Sequence[str] = ()) -> None:
    """Load a local file into a timm model (steps 1-4 of the module doc).

    Args:
        model (nn.Module): built by ``timm.create_model(model_name, ...)``.
        model_name (str): its timm name (selects timm's filter).
        checkpoint (str): local ``.pth`` / ``.bin`` / ``.safetensors`` file.
        use_filter_fn (bool): apply timm's ``checkpoint_filter_fn``.
            Defaults to True.
        resample_positions (bool): apply :func:`resample_position_tables`.
            Defaults to True.
        strict (bool): keys and shapes must match exactly, and timm's filter
            may discard only entries named by ``drop_keys``. Defaults to
            True.
        state_dict_key, rename, drop_keys: see
            :func:`~kiv.utils.weights.load_teacher_checkpoint`.

    Raises:
        TeacherCheckpointError: naming the file and the first keys, if the
            weights do not fit or entries would be dropped undeclared.
    """
    filter_fn = timm_checkpoint_filter(model_name, model) \
        if use_filter_fn else None
    what = f"timm's checkpoint_filter_fn of {model_name!r}"

    def convert(state_dict: StateDict) -> StateDict:
        if filter_fn is not None:
            state_dict = convert_checked(state_dict, filter_fn, drop_keys,
                                         checkpoint, what, strict)
        if resample_positions:
            state_dict = resample_position_tables(state_dict, model)
        return state_dict

    load_teacher_checkpoint(
        model, checkpoint, state_dict_key=state_dict_key, rename=rename,
        drop_keys=drop_keys, strict=strict, convert=convert)
