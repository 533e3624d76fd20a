"""Whole mm task models on given features: multi-task training and probes.

The demo trains and probes the *same* downstream structures everywhere:
mmpretrain's ``ImageClassifier`` (linear head on the summary), mmdet's
Mask R-CNN (FPN + RPN + RoI heads on the pyramid) and mmseg's Semantic FPN
(FPN + ``FPNHead`` on the pyramid), each built from its toolbox config with
``backbone=dict(type='kiv_demo.FeaturePassthrough')``: the model's
``extract_feat`` then starts from features computed elsewhere, and the
toolbox's own ``loss`` / ``predict`` code runs unchanged.

* :class:`TaskHead` wraps one such model as a task head of
  ``kiv.KnowledgeInheritance`` (``task_heads``) or of
  :class:`MultiTaskModel`.
* :class:`MultiTaskModel` is the data-centric rival: one backbone, the
  three heads, trained jointly on every label of the world.
* :class:`FeatureDataPreprocessor` feeds cached frozen-backbone features to
  such a model in the probes (``kiv_demo.AttachFeatures``).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.model import BaseDataPreprocessor, BaseModel, BaseModule
from mmengine.model import ModuleDict
from mmengine.registry import MODELS as ROOT_MODELS
from torch import Tensor

from kiv.utils import in_own_scope

from .registry import MODELS

__all__ = ['FeaturePassthrough', 'FeatureDataPreprocessor', 'TaskHead',
           'MultiTaskModel', 'TASK_FIELDS']

#: task kind -> (features it reads, ground-truth field of the data sample)
TASK_FIELDS = {
    'cls': ('summary', 'gt_label'),
    'det': ('pyramid', 'gt_instances'),
    'seg': ('pyramid', 'gt_sem_seg'),
}


@MODELS.register_module()
class FeaturePassthrough(nn.Module):
    """A "backbone" whose input already is the feature tuple.

    Args:
        num_levels (int, optional): keep only the first ``num_levels``
            tensors (e.g. the four pyramid levels of a student that also
            returns its patch grid). Defaults to all.
    """

    def __init__(self, num_levels: Optional[int] = None) -> None:
        super().__init__()
        self.num_levels = num_levels

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Return the features (first ``num_levels``)."""
        feats = tuple(feats)
        return feats if self.num_levels is None else \
            feats[:self.num_levels]

    def init_weights(self) -> None:
        """Nothing to initialise."""


@MODELS.register_module()
class FeatureDataPreprocessor(BaseDataPreprocessor):
    """Collate per-sample feature tuples into a batch.

    ``inputs`` are tuples of tensors per sample (``kiv_demo.AttachFeatures``
    puts them there); each position is stacked over the batch and cast to
    float32. ``batch_input_shape`` and ``pad_shape`` (what mmdet's and
    mmseg's data preprocessors set) are the images' ``img_shape``, so the
    heads see the geometry of the original images; box-type ground truth
    becomes plain tensors, as mmdet's ``DetDataPreprocessor`` does.
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        """Stack the feature tuples and set the batch metainfo.

        Args:
            data (dict): ``inputs`` (per level the list of the samples'
                tensors: mmengine's ``pseudo_collate`` transposes the
                samples' tuples) and ``data_samples``.
            training (bool): unused.

        Returns:
            dict: ``inputs`` (tuple of ``(B, ...)`` float32 tensors) and
            ``data_samples``.
        """
        data = self.cast_data(data)
        inputs = tuple(torch.stack(list(level)).float()
                       for level in data['inputs'])
        samples = data.get('data_samples')
        for sample in samples or []:
            shape = tuple(sample.metainfo['img_shape'][:2])
            sample.set_metainfo(dict(batch_input_shape=shape,
                                     pad_shape=shape))
        if samples and 'gt_instances' in samples[0]:
            from mmdet.models.utils.misc import samplelist_boxtype2tensor
            samplelist_boxtype2tensor(samples)
        return dict(inputs=inputs, data_samples=samples)


def _light_sample(sample: Any, field: str) -> Any:
    """A copy of ``sample`` with only its metainfo and ``field`` (mmdet
    deep-copies the samples it gets: leave cached teacher targets out)."""
    light = type(sample)(metainfo=dict(sample.metainfo))
    shape = tuple(sample.metainfo.get('img_shape', ())[:2])
    if shape:
        light.set_metainfo(dict(batch_input_shape=shape, pad_shape=shape))
    light.set_field(getattr(sample, field), field)
    return light


@MODELS.register_module()
class TaskHead(BaseModule):
    """One downstream mm model used as a head on given features.

    Args:
        task (str): ``'cls'`` (summary -> ``gt_label``), ``'det'``
            (pyramid -> ``gt_instances``) or ``'seg'`` (pyramid ->
            ``gt_sem_seg``).
        model (dict): the toolbox model with a scoped type
            (``'mmpretrain.ImageClassifier'``, ``'mmdet.MaskRCNN'``,
            ``'mmseg.EncoderDecoder'``); its ``backbone`` and
            ``data_preprocessor`` are replaced.
        num_levels (int): pyramid levels handed to the model. Defaults
            to 4.
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(self, task: str, model: dict, num_levels: int = 4,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if task not in TASK_FIELDS:
            raise ValueError(f'TaskHead task must be one of '
                             f'{sorted(TASK_FIELDS)}, got {task!r}')
        self.task = task
        self.inputs, self.gt_field = TASK_FIELDS[task]
        model = copy.deepcopy(dict(model))
        model['backbone'] = dict(
            type='kiv_demo.FeaturePassthrough',
            num_levels=None if self.inputs == 'summary' else num_levels)
        model['data_preprocessor'] = None
        model.pop('pretrained', None)
        # ConfigDict: the toolboxes read nested options as attributes
        self.model = ROOT_MODELS.build(ConfigDict(in_own_scope(model)))

    def features(self, summary: Tensor,
                 pyramid: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The tuple this head reads from a student's output."""
        return (summary, ) if self.inputs == 'summary' else tuple(pyramid)

    def loss(self, feats: Sequence[Tensor], data_samples: list,
             **kwargs) -> dict[str, Tensor]:
        """The toolbox model's losses on ``feats``.

        Args:
            feats (Sequence[Tensor]): ``(summary,)`` or pyramid maps of the
                labelled samples.
            data_samples (list): their data samples (with ``gt_field``).

        Returns:
            dict[str, Tensor]: the model's loss dict, per-level lists (e.g.
            mmdet's RPN losses) summed as mmengine's ``parse_losses`` does.
        """
        samples = [_light_sample(s, self.gt_field) for s in data_samples]
        losses = self.model.loss(tuple(feats), samples, **kwargs)
        return {k: sum(v) if isinstance(v, (list, tuple)) else v
                for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, feats: Sequence[Tensor], data_samples: list) -> list:
        """The toolbox model's predictions on ``feats``."""
        return self.model.predict(tuple(feats), data_samples)


@MODELS.register_module()
class MultiTaskModel(BaseModel):
    """A backbone trained jointly on several labelled tasks (the demo's
    data-centric rivals).

    Each sample feeds every task whose ground truth it has; the losses of
    all tasks are summed (each scaled by its weight).

    Args:
        backbone (dict): e.g. ``kiv.AdapterViT``; ``forward_features`` gives
            the summary and the pyramid.
        tasks (dict[str, dict]): name -> ``kiv_demo.TaskHead`` config, plus an
            optional ``weight`` (default 1).
        data_preprocessor (dict, optional): defaults to ImageNet
            normalisation of BGR-loaded images.
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(self, backbone: dict, tasks: dict[str, dict],
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if data_preprocessor is None:
            data_preprocessor = dict(
                type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if not tasks:
            raise ValueError('MultiTaskModel needs at least one task')
        self.backbone = MODELS.build(backbone)
        self.weights: dict[str, float] = {}
        self.tasks = ModuleDict()
        for name, cfg in tasks.items():
            cfg = dict(cfg)
            self.weights[name] = float(cfg.pop('weight', 1.0))
            cfg.setdefault('type', 'kiv_demo.TaskHead')
            self.tasks[name] = MODELS.build(cfg)

    def loss(self, inputs: Tensor, data_samples: list) -> dict[str, Tensor]:
        """Every task's losses on its labelled samples.

        Args:
            inputs (Tensor): normalised images ``(B, 3, H, W)``.
            data_samples (list): per-image samples with ground truths.

        Returns:
            dict[str, Tensor]: ``<task>.<loss name>`` entries.
        """
        out = self.backbone.forward_features(inputs)
        losses: dict[str, Tensor] = {}
        for name, head in self.tasks.items():
            idx = [i for i, s in enumerate(data_samples)
                   if head.gt_field in s]
            if not idx:
                continue
            sel = torch.as_tensor(idx, device=inputs.device)
            feats = head.features(
                out.summary.index_select(0, sel),
                [f.index_select(0, sel) for f in out.features])
            for key, value in head.loss(
                    feats, [data_samples[i] for i in idx]).items():
                if 'loss' in key:
                    value = value * self.weights[name]
                losses[f'{name}.{key}'] = value
        return losses

    def forward(self, inputs: Tensor, data_samples: Optional[list] = None,
                mode: str = 'tensor') -> Any:
        """mmengine entry point: ``'loss'`` or ``'tensor'`` (the backbone's
        :class:`~kiv.structures.FeatureOutput`)."""
        if mode == 'loss':
            return self.loss(inputs, data_samples or [])
        if mode == 'tensor':
            return self.backbone.forward_features(inputs)
        raise ValueError(f"MultiTaskModel mode must be 'loss' or 'tensor', "
                         f'got {mode!r} (evaluate the exported backbone '
                         'with the probes)')
