"""Turn a distillation checkpoint into a student-only backbone checkpoint.

The exported file is ``{'state_dict': <AdapterViT state dict>, 'meta':
<JSON-safe dict>}`` (plus ``'inherited_heads'`` with ``--keep-heads``). It
loads with ``torch.load(weights_only=True)`` and into ``kiv.AdapterViT`` via
``init_cfg=dict(type='Pretrained', checkpoint=...)`` in mmpretrain, mmdet and
mmseg configs (like mmrazor's ``convert_kd_ckpt_to_student.py``).
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Optional

from mmengine.config import Config

from kiv.utils.atomic import atomic_torch_save
from kiv.utils.checkpoint import safe_torch_load
from kiv.utils.state_dict import select_prefix, unwrap_state_dict

STUDENT_PREFIX = 'student.'
LATENT_PREFIX = 'latent.'


def _json_safe(obj: Any) -> Any:
    """Drop everything that is not plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(obj, default=lambda o: None))


def student_meta(model_cfg: dict) -> dict:
    """JSON-safe description of the student taken from the distiller config.

    Args:
        model_cfg (dict): the ``model`` section of a distillation config.

    Returns:
        dict: ``arch``, ``student`` (backbone config), ``base_teacher``,
        ``teachers``, ``patch_size``, ``img_size`` and ``student_mean/std``.
    """
    student = dict(model_cfg['student'])
    base = student.get('base', {})
    teachers = model_cfg.get('teachers', {})
    base_name = model_cfg.get('base_teacher')
    img_size = None
    if base_name in teachers:
        img_size = teachers[base_name].get('input_size')
    meta = dict(
        arch=student.get('type'),
        student=student,
        base_teacher=base_name,
        teachers=sorted(teachers),
        patch_size=base.get('patch_size') or
        base.get('model_kwargs', {}).get('patch_size'),
        img_size=img_size,
        student_mean=model_cfg.get('student_mean'),
        student_std=model_cfg.get('student_std'))
    return _json_safe(meta)


def export_student(checkpoint: str, out: str,
                   config: Optional[str] = None,
                   keep_heads: bool = False) -> dict:
    """Write the student-only checkpoint atomically.

    Args:
        checkpoint (str): distillation checkpoint (Runner output).
        out (str): path of the exported ``.pth``.
        config (str, optional): distillation config; defaults to the one
            stored in the checkpoint's ``meta['cfg']``.
        keep_heads (bool): also store the shared latent space (s2t heads and
            standardiser buffers) under ``'inherited_heads'``.

    Returns:
        dict: the ``meta`` written.

    Raises:
        KeyError: if the checkpoint has no ``student.*`` weights or no config
            can be found.
    """
    ckpt = safe_torch_load(checkpoint, map_location='cpu')
    state = unwrap_state_dict(ckpt, checkpoint)
    student = select_prefix(state, STUDENT_PREFIX)
    if not student:
        raise KeyError(f'{checkpoint}: no `student.*` weights; is it a '
                       'kiv distillation checkpoint?')
    if config is not None:
        cfg = Config.fromfile(config)
    elif isinstance(ckpt.get('meta', {}).get('cfg'), str):
        cfg = Config.fromstring(ckpt['meta']['cfg'], file_format='.py')
    else:
        raise KeyError(f'{checkpoint}: no config stored in meta["cfg"]; '
                       'pass --config')
    meta = student_meta(cfg.model.to_dict())
    meta['source_checkpoint'] = osp.abspath(checkpoint)
    result = dict(state_dict=student, meta=meta)
    if keep_heads:
        result['inherited_heads'] = select_prefix(state, LATENT_PREFIX)
    atomic_torch_save(result, out)
    return meta
