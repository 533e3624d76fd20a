"""Layer-wise learning-rate decay for mmseg / mmdet models.

mmpretrain's ``LearningRateDecayOptimWrapperConstructor`` asks the *model*
for ``get_layer_depth(param_name)``. mmpretrain classifiers have it (they
forward to ``backbone.get_layer_depth(name, 'backbone.')``); mmseg
segmentors and mmdet detectors do not, so the constructor raises on them.
:class:`BackboneLayerDecayOptimWrapperConstructor` is that constructor with
the classifiers' forwarding added for any model with a ``backbone``: the
param groups, weight-decay rules and logging are mmpretrain's.

Example (mmseg / mmdet config)::

    custom_imports = dict(
        imports=['kiv', 'kiv.engine.optimizers.layer_decay_constructor'],
        allow_failed_imports=False)
    optim_wrapper = dict(
        optimizer=dict(type='AdamW', lr=6e-5, weight_decay=0.01),
        constructor='kiv.BackboneLayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(layer_decay_rate=0.9))
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from mmpretrain.engine.optimizers import \
    LearningRateDecayOptimWrapperConstructor
from torch import nn

from kiv.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['BackboneLayerDecayOptimWrapperConstructor']

#: ``get_layer_depth(param_name) -> (layer_id, num_layers)``
LayerDepthFn = Callable[[str], tuple[int, int]]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class BackboneLayerDecayOptimWrapperConstructor(
        LearningRateDecayOptimWrapperConstructor):
    """mmpretrain's layer-decay constructor for models with a ``backbone``.

    The layer id of every parameter comes from the model's own
    ``get_layer_depth`` if it has one, else from
    ``model.backbone.get_layer_depth(param_name, 'backbone.')`` (e.g.
    :meth:`kiv.models.backbones.AdapterViT.get_layer_depth`); parameters
    outside the backbone (necks, heads) get the backbone's last layer id,
    i.e. the full learning rate. Arguments (``optim_wrapper_cfg``,
    ``paramwise_cfg`` with ``layer_decay_rate``, ``norm_decay_mult``,
    ``bias_decay_mult``, ``flat_decay_mult``, ``custom_keys``) are those of
    ``mmpretrain.LearningRateDecayOptimWrapperConstructor``.
    """

    def add_params(self,
                   params: list[dict],
                   module: nn.Module,
                   prefix: str = '',
                   get_layer_depth: LayerDepthFn | None = None,
                   **kwargs) -> None:
        """Add the parameters of ``module`` with decayed learning rates.

        Args:
            params (list[dict]): param groups, extended in place (one group
                per parameter with ``lr``, ``lr_scale``, ``layer_id``,
                ``param_name``, ``weight_decay``).
            module (nn.Module): the whole model on the first call.
            prefix (str): name prefix of ``module``'s parameters.
            get_layer_depth (Callable, optional): ``param_name -> (layer_id,
                num_layers)``; found on the model when None.
        """
        if get_layer_depth is None and not hasattr(module, 'get_layer_depth'):
            get_layer_depth = self._backbone_layer_depth(module)
        super().add_params(
            params, module, prefix=prefix, get_layer_depth=get_layer_depth,
            **kwargs)

    @staticmethod
    def _backbone_layer_depth(model: nn.Module) -> LayerDepthFn:
        backbone = getattr(model, 'backbone', None)
        if not hasattr(backbone, 'get_layer_depth'):
            raise TypeError(
                'kiv.BackboneLayerDecayOptimWrapperConstructor: layer-wise lr '
                f'decay needs {type(model).__name__}.get_layer_depth or '
                f'{type(model).__name__}.backbone.get_layer_depth; '
                f'{type(backbone).__name__} has none (use a backbone such '
                "as kiv.AdapterViT or drop 'layer_decay_rate')")
        return partial(backbone.get_layer_depth, prefix='backbone.')
