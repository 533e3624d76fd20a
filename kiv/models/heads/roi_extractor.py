"""mmdet's single-level RoI extractor with kiv's RoI layers (mmdet head
part; imports mmdet)."""
from __future__ import annotations

from mmdet.models.roi_heads.roi_extractors import \
    SingleRoIExtractor as _MMDetSingleRoIExtractor
from torch import nn

from kiv.registry import MODELS

__all__ = ['SingleRoIExtractor']


@MODELS.register_module()
class SingleRoIExtractor(_MMDetSingleRoIExtractor):
    """mmdet's ``SingleRoIExtractor`` whose ``roi_layer`` may be a
    registered layer, e.g. ``type='kiv.RoIAlign'`` (kiv's CPU RoIAlign,
    :class:`kiv.models.layers.RoIAlign`).

    mmdet looks a ``roi_layer`` type up in ``mmcv.ops`` only; a scoped type
    (``'<scope>.<Name>'``) is looked up in the registries here instead,
    any other type as mmdet does. Everything else (level mapping by
    ``finest_scale``, ``gc_context``, ``roi_scale_factor``) is mmdet's::

        bbox_roi_extractor=dict(
            type='kiv.SingleRoIExtractor',
            roi_layer=dict(type='kiv.RoIAlign', output_size=7,
                           sampling_ratio=0),
            out_channels=256, featmap_strides=[4, 8, 16, 32])

    Args: those of mmdet's ``SingleRoIExtractor``.
    """

    def build_roi_layers(self, layer_cfg: dict,
                         featmap_strides: list[int]) -> nn.ModuleList:
        """Build one RoI layer per level.

        Args:
            layer_cfg (dict): ``type`` (an ``mmcv.ops`` name, a scoped
                registry name such as ``'kiv.RoIAlign'``, or a class) and
                the layer's arguments except ``spatial_scale``.
            featmap_strides (list[int]): stride of each level.

        Returns:
            nn.ModuleList: the layers, ``spatial_scale = 1 / stride``.

        Raises:
            KeyError: a scoped ``type`` that no registry knows.
        """
        cfg = dict(layer_cfg)
        layer_type = cfg.get('type')
        if isinstance(layer_type, str) and '.' in layer_type:
            layer_cls = MODELS.get(layer_type)
            if layer_cls is None:
                raise KeyError(
                    f'SingleRoIExtractor: roi_layer type {layer_type!r} is '
                    'not registered (is its package imported, e.g. '
                    "custom_imports=dict(imports=['kiv'])?)")
            cfg['type'] = layer_cls
        return super().build_roi_layers(cfg, featmap_strides)
