"""Forward-hook recording of submodule outputs and token-to-map layout.

:class:`ModuleOutputsRecorder` follows mmrazor's recorder of the same name:
hooks are registered once, on named submodules, and keep the latest output
of each. :func:`to_feature_map` turns what a layer returns (ViT tokens,
NHWC or NCHW maps) into the NCHW maps of :class:`kiv.structures.FeatureOutput`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn


class ModuleOutputsRecorder:
    """Record the output of named submodules with forward hooks.

    The hooks are bound methods (through :func:`functools.partial`), not
    closures, so ``copy.deepcopy`` of the model (e.g. by an EMA wrapper)
    gives a copy whose hooks fill the copied recorder.

    Args:
        model (nn.Module): the network to observe.
        names (Iterable[str]): submodule names as in
            ``model.named_modules()`` (``''`` is the model itself);
            duplicates are hooked once.

    Raises:
        ValueError: if a name is not a submodule of ``model``.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, Any] = {}
        self.names = list(dict.fromkeys(names))
        missing = [name for name in self.names if name not in modules]
        if missing:
            children = ', '.join(n for n, _ in model.named_children())
            raise ValueError(
                f'{type(model).__name__} has no submodule {missing[0]!r} to '
                f'record; its top-level children are [{children}] (use '
                'dotted names from model.named_modules(), e.g. "blocks.11")')
        self._handles = [
            modules[name].register_forward_hook(partial(self._store, name))
            for name in self.names
        ]

    def _store(self, name: str, module: nn.Module, args: tuple,
               output: Any) -> None:
        self.outputs[name] = output

    def get(self, name: str) -> Any:
        """The output of ``name`` in the last forward pass.

        Raises:
            RuntimeError: if the module did not run since :meth:`clear`.
        """
        if name not in self.outputs:
            raise RuntimeError(
                f'submodule {name!r} did not run in the teacher forward; '
                'check the layer name and the forward_method')
        return self.outputs[name]

    def clear(self) -> None:
        """Drop the recorded outputs (releases their memory)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def flatten_tensors(obj: Any, label: str) -> list[tuple[str, Tensor]]:
    """Flatten a nested model output into labelled tensors, depth first.

    Args:
        obj: a Tensor, or a tuple / list / mapping (e.g. a HF ``ModelOutput``)
            of them; ``None`` entries are skipped.
        label (str): name of ``obj`` used in messages, e.g. ``'output'``.

    Returns:
        list[tuple[str, Tensor]]: ``(label, tensor)`` pairs, e.g.
        ``('output[1][0]', t)``.

    Raises:
        TypeError: if ``obj`` holds something else.
    """
    if isinstance(obj, Tensor):
        return [(label, obj)]
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        items = [(f'{label}[{k!r}]', v) for k, v in obj.items()]
    elif isinstance(obj, (tuple, list)):
        items = [(f'{label}[{i}]', v) for i, v in enumerate(obj)]
    else:
        raise TypeError(f'{label} is a {type(obj).__name__}; a teacher '
                        'feature must be a Tensor or a tuple/list/dict of '
                        'Tensors')
    return [pair for sub, value in items
            for pair in flatten_tensors(value, sub)]


def token_grid(num_tokens: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of ``num_tokens`` patches of an image.

    The patch size ``s`` solves ``(H / s) * (W / s) = num_tokens``; the grid
    is ``(round(H / s), round(W / s))``, which is exact for patch embeddings
    that floor or pad the image.

    Args:
        num_tokens (int): number of patch tokens (prefix tokens removed).
        image_hw (tuple[int, int]): ``(H, W)`` of the (padded) input image.

    Returns:
        tuple[int, int]: ``(h, w)`` with ``h * w == num_tokens``.

    Raises:
        ValueError: if no such grid exists.
    """
    height, width = image_hw
    stride = math.sqrt(height * width / max(num_tokens, 1))
    grid = (max(round(height / stride), 1), max(round(width / stride), 1))
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(
            f'{num_tokens} patch tokens do not form a grid for a {height}x'
            f'{width} input')
    return grid


def to_feature_map(feature: Tensor, label: str, image_hw: tuple[int, int],
                   num_prefix_tokens: int, nhwc: bool = False) -> Tensor:
    """Convert a recorded feature to an NCHW map.

    Args:
        feature (Tensor): ``(B, N, C)`` tokens (ViT), or a ``(B, C, H, W)``
            map, or ``(B, H, W, C)`` if ``nhwc``.
        label (str): name of the feature, used in messages.
        image_hw (tuple[int, int]): ``(H, W)`` of the (padded) model input.
        num_prefix_tokens (int): leading non-patch tokens (CLS, registers,
            distillation token) of ``(B, N, C)`` tokens; dropped.
        nhwc (bool): 4-D features are channels-last (timm's SAM ViT blocks,
            timm Swin stages). Defaults to False.

    Returns:
        Tensor: ``(B, C, h, w)``.

    Raises:
        ValueError: if the feature is not a dense map.
    """
    if feature.dim() == 4:
        return feature.permute(0, 3, 1, 2) if nhwc else feature
    if feature.dim() == 3:
        batch, num_tokens, channels = feature.shape
        try:
            grid = token_grid(num_tokens - num_prefix_tokens, image_hw)
        except ValueError as err:
            raise ValueError(
                f'teacher feature {label} has {num_tokens} tokens: {err} '
                f'after dropping num_prefix_tokens={num_prefix_tokens}; set '
                'num_prefix_tokens to the number of CLS/register tokens') \
                from None
        patches = feature[:, num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(batch, channels, *grid)
    raise ValueError(
        f'teacher feature {label} has shape {tuple(feature.shape)}; dense '
        'features must be (B, N, C) tokens or 4-D maps (use a 2-D output as '
        'the summary instead)')
