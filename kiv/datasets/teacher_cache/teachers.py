"""The teachers of a distillation config, built alone for the cache writer.

The writer needs the teachers and the distiller's data preprocessor, never
the student, its latent-space heads, losses or task heads:
:class:`ConfigTeachers` builds exactly those two from ``cfg.model``, in the
config's registry scope, as ``kiv.KnowledgeInheritance`` builds them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.registry import DefaultScope
from torch import Tensor

from kiv.models.distillers import DEFAULT_DATA_PREPROCESSOR
from kiv.registry import MODELS, TRANSFORMS
from kiv.structures import FeatureOutput

__all__ = ['ConfigTeachers']


class ConfigTeachers:
    """The teachers of ``cfg.model`` and its data preprocessor, in eval mode.

    Args:
        model_cfg (Mapping): ``cfg.model`` of a ``kiv.KnowledgeInheritance``
            config (``teachers``, optional ``data_preprocessor``).
        scope (str): registry scope to build in (the config's
            ``default_scope``).
        device (torch.device): where the teachers run.
    """

    def __init__(self, model_cfg: Mapping, scope: str,
                 device: torch.device) -> None:
        self.scope = scope
        preprocessor = model_cfg.get('data_preprocessor', None) or \
            DEFAULT_DATA_PREPROCESSOR
        with DefaultScope.overwrite_default_scope(scope):
            self.teachers = {
                name: MODELS.build(cfg).to(device).eval()
                for name, cfg in model_cfg['teachers'].items()
            }
            self.data_preprocessor = MODELS.build(preprocessor).to(
                device).eval()

    @torch.no_grad()
    def __call__(self, inputs: list[Tensor],
                 skip: Sequence[str] = (),
                 only: Sequence[str] | None = None
                 ) -> dict[str, FeatureOutput]:
        """Preprocess packed views like the distiller and run the teachers.

        Args:
            inputs (list[Tensor]): packed ``(3, H, W)`` uint8 views.
            skip (Sequence[str]): teachers not to run (their outputs are
                reused from another cache). Defaults to none.
            only (Sequence[str], optional): run these teachers only.
                Defaults to every teacher.

        Returns:
            dict[str, FeatureOutput]: the raw outputs per teacher run.
        """
        data = self.data_preprocessor(
            dict(inputs=inputs, data_samples=None), False)
        images = data['inputs']
        return {name: teacher(images)
                for name, teacher in self.teachers.items()
                if name not in skip and (only is None or name in only)}

    def probe(self, view: Mapping, pack: Mapping) -> dict[str, dict[str, Any]]:
        """Teacher output shapes for one view (run on a black image).

        Args:
            view (Mapping): the ``kiv.ReplayView`` config (its ``scale``).
            pack (Mapping): the packing transform config.

        Returns:
            dict[str, dict]: per teacher ``summary_dim`` (None without a
            summary), ``feature_dims``, ``feature_strides`` and ``grids``.
        """
        h, w = view['scale']
        with DefaultScope.overwrite_default_scope(self.scope):
            packer = TRANSFORMS.build(pack)
        inputs = packer({'img': np.zeros((h, w, 3), np.uint8)})['inputs']
        outputs = self([inputs])
        teachers = {}
        for name, out in outputs.items():
            teacher = self.teachers[name]
            teachers[name] = dict(
                summary_dim=None if out.summary is None
                else int(out.summary.shape[1]),
                feature_dims=[int(f.shape[1]) for f in out.features],
                feature_strides=[int(s) for s in teacher.feature_strides],
                grids=[[int(f.shape[2]), int(f.shape[3])]
                       for f in out.features])
        return teachers
