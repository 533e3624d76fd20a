"""The checkpoint of a model that needs no training (zero-shot configs).

``tools/test.py`` (kiv's, mmpretrain's, mmseg's) evaluates a checkpoint and
does not run ``init_weights()``: a zero-shot classifier or segmentor, whose
backbone comes from the exported student (``init_cfg``) and whose heads
read their fixed parts from files, first has to be written once as a
checkpoint. :func:`write_init_checkpoint` builds the config's model, runs
``init_weights()`` and saves its state dict (``{'state_dict', 'meta'}``,
atomically, loadable weights-only).
"""
from __future__ import annotations

import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from kiv.utils.atomic import atomic_torch_save

__all__ = ['write_init_checkpoint']


def write_init_checkpoint(config: str, out: str,
                          cfg_options: Optional[dict] = None) -> dict:
    """Build ``config``'s model, initialise it and save it.

    Args:
        config (str): an OpenMMLab config file (its ``custom_imports`` are
            imported).
        out (str): the checkpoint file to write.
        cfg_options (dict, optional): overrides merged into the config.

    Returns:
        dict: the ``meta`` written (``config``, ``num_tensors``).
    """
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope', 'mmengine')
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = dict(config=osp.abspath(config), num_tensors=len(state),
                note='initialised, not trained (tools/misc/'
                'init_checkpoint.py)')
    atomic_torch_save(dict(state_dict=state, meta=meta), out)
    return meta
