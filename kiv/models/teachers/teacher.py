"""The frozen teacher wrapper of knowledge inheritance."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import DefaultScope
from torch import Tensor, nn

from kiv.registry import MODELS, TEACHER_SOURCES
from kiv.structures import FeatureOutput
from .inference import fuse_frozen_conv_bn
from .recorder import ModuleOutputsRecorder, flatten_tensors, to_feature_map
from .value_path import ValuePathRecorder

#: ``dtype`` option -> autocast dtype of the model forward (``None``: fp32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    'fp32': None,
    'bf16': torch.bfloat16,
    'fp16': torch.float16,
}

_FEATURE_KEYS = ('from_output', 'layers', 'indices', 'nhwc', 'text_space')
_SUMMARY_KEYS = {
    'cls': ('index', 'token'),
    'avg': ('index', ),
    'layer': ('name', 'index'),
    'none': (),
}
_HEAD_INPUTS = ('summary', 'features')

Recorded = list[tuple[str, Tensor]]


def build_teacher_model(source: dict | nn.Module) -> nn.Module:
    """Build the network a :class:`Teacher` wraps.

    Args:
        source (dict | nn.Module): a ``TEACHER_SOURCES`` config such as
            ``dict(type='timm', model_name=..., checkpoint=...)``, or a
            module whose weights are already loaded.

    Returns:
        nn.Module: the network with its weights.
    """
    if isinstance(source, nn.Module):
        return source
    names = sorted(TEACHER_SOURCES.module_dict)
    if not isinstance(source, Mapping) or 'type' not in source:
        raise TypeError('Teacher(source=...) must be an nn.Module or a dict '
                        f'with a type among {names}, got {source!r}')
    if isinstance(source['type'], str) and source['type'] not in names:
        raise ValueError(f'unknown teacher source type {source["type"]!r}; '
                         f'registered: {names}')
    with DefaultScope.overwrite_default_scope('kiv'):
        model = TEACHER_SOURCES.build(dict(source))
    if not isinstance(model, nn.Module):
        raise TypeError(f'teacher source {source["type"]!r} returned '
                        f'{type(model).__name__}, not an nn.Module')
    return model


def _model_prefix_tokens(model: nn.Module) -> int | None:
    """``num_prefix_tokens`` (timm) / ``num_extra_tokens`` (mmpretrain) of
    the model or of its ``backbone``, if it declares one."""
    for module in (model, getattr(model, 'backbone', None)):
        for attr in ('num_prefix_tokens', 'num_extra_tokens'):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _check_keys(option: str, cfg: Mapping, allowed: Sequence[str]) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f'Teacher {option} has unknown keys {unknown}; '
                         f'allowed: {list(allowed)}')


def _parse_layer(spec: str | Mapping) -> tuple[str, int | None]:
    """``'blocks.11'`` or ``dict(name='encoder.layer.11', index=0)``."""
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, Mapping) and 'name' in spec:
        _check_keys('features.layers entry', spec, ('name', 'index'))
        return spec['name'], spec.get('index')
    raise ValueError('Teacher features.layers entries must be module names '
                     f'or dict(name=..., index=...), got {spec!r}')


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in.

    Args:
        module (nn.Module): e.g. a teacher's kept head.

    Returns:
        torch.dtype: dtype of its first floating parameter (or buffer);
        float32 for a module without any.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a head's input to ``dtype``.

    Args:
        obj (Tensor | Sequence[Tensor]): a summary ``(B, C)`` or a sequence
            of dense maps.
        dtype (torch.dtype): target dtype.

    Returns:
        Tensor | Sequence[Tensor]: the same structure (a sequence keeps its
        type), floating tensors cast, others unchanged.
    """
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    return type(obj)(_cast_floating(v, dtype) for v in obj)


def _to_float(obj: Any) -> Any:
    """Cast every floating tensor in a nested output to float32."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    return obj


def precision_autocast(compute_dtype: str,
                       device_type: str) -> torch.autocast:
    """The autocast a teacher of precision ``compute_dtype`` (a key of
    :data:`AUTOCAST_DTYPES`) runs under: off for ``'fp32'``.

    Args:
        compute_dtype (str): ``'fp32'``, ``'bf16'`` or ``'fp16'``.
        device_type (str): e.g. ``'cpu'``, ``'cuda'``.

    Returns:
        torch.autocast: the context.
    """
    amp_dtype = AUTOCAST_DTYPES[compute_dtype]
    if amp_dtype is None:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=amp_dtype)


class TeacherHeadMixin:
    """:meth:`forward_head`: a teacher's own kept head on inherited inputs.

    Shared by :class:`Teacher` and ``kiv.CachedTeacher`` (which keeps only
    the head). The class provides ``head`` (the module or None),
    ``head_layer``, ``head_input`` (``'summary'`` or ``'features'``),
    ``summary_dim``, ``feature_dims`` and ``_head_autocast()``.
    """

    def forward_head(self, inputs: Tensor | Sequence[Tensor]) -> Any:
        """Apply the teacher's own task head (inherited head).

        The head's weights are frozen but this is not wrapped in
        ``no_grad``: gradients flow back to ``inputs`` when they need them.
        It runs in the teacher's own precision (``dtype``), whatever the
        caller's autocast: the inputs are first cast to the dtype of the
        head's parameters (e.g. the bf16 output of a student under AMP fed
        to a float32 teacher's ``nn.Linear``), then an ``'fp32'`` teacher
        runs the head with autocast off and a ``'bf16'`` / ``'fp16'`` one
        under its own autocast.

        Args:
            inputs (Tensor | Sequence[Tensor]): a summary ``(B, summary_dim)``
                if ``head['input'] == 'summary'``, else a sequence of dense
                maps ``(B, feature_dims[l], H_l, W_l)``.

        Returns:
            Any: the head's output with floating tensors in float32, e.g.
            ``(B, num_classes)`` logits for a classifier.
        """
        head = self.head
        if head is None:
            raise RuntimeError(
                f'{type(self).__name__} has no head; build the Teacher with '
                "head=dict(layer=<module name>, input='summary') (a "
                'CachedTeacher with head_from=<that teacher config>)')
        if self.head_input == 'summary':
            if (not isinstance(inputs, Tensor) or inputs.dim() != 2
                    or inputs.shape[1] != self.summary_dim):
                raise ValueError(
                    f'Teacher head {self.head_layer!r} expects a summary '
                    f'(B, {self.summary_dim}), got '
                    f'{getattr(inputs, "shape", type(inputs).__name__)}')
        else:
            inputs = tuple(inputs)
            dims = [f.shape[1] for f in inputs]
            if dims != self.feature_dims:
                raise ValueError(
                    f'Teacher head {self.head_layer!r} expects features with '
                    f'channels {self.feature_dims}, got {dims}')
        inputs = _cast_floating(inputs, _module_dtype(head))
        with self._head_autocast():
            return _to_float(head(inputs))


@MODELS.register_module()
class Teacher(BaseModule, TeacherHeadMixin):
    """A frozen pretrained model that provides knowledge to the student.

    The teacher takes raw RGB pixels in [0, 255], applies its own
    preprocessing (resize, normalise, pad) and returns
    :class:`~kiv.structures.FeatureOutput` ``(summary (B, C_s), features)``
    with dense features ``(B, C_l, H_l, W_l)`` from the highest resolution
    to the lowest. It is frozen for good: every parameter has
    ``requires_grad=False``, :meth:`train` keeps it (and its BatchNorm
    statistics) in eval mode, :meth:`forward` runs under ``torch.no_grad()``
    and :meth:`init_weights` never re-initialises the loaded weights.

    Where the tensors come from:

    * ``features=dict(from_output=True)``: the output of
      ``model.<forward_method>(x, **forward_kwargs)``, a Tensor or a nested
      tuple / list / dict of Tensors, flattened depth first (e.g. timm's
      ``forward_features`` or ``forward_intermediates``, an mm backbone's
      tuple of maps).
    * ``features=dict(layers=['blocks.5', 'blocks.11'])``: the outputs of
      named submodules, recorded by forward hooks registered once, here.
      An entry ``dict(name=..., index=i)`` takes element ``i`` of a layer
      that returns a tuple (e.g. a HF layer's ``(hidden_states, ...)``).

    These *recorded* tensors (model output first, then the layers in order)
    become the dense features; ``features['indices']`` keeps a subset.
    ``(B, N, C)`` ViT tokens become NCHW maps: the ``num_prefix_tokens``
    leading tokens (CLS, registers) are dropped and the rest reshaped to the
    patch grid of the padded input. ``(B, H, W, C)`` maps are permuted when
    ``features['nhwc']`` is set.

    ``features=dict(..., text_space=dict(block='blocks.11', norm='norm',
    proj='head'))`` adds one last level for a CLIP image tower: MaskCLIP's
    per-patch embeddings in CLIP's text space (the last block's value path
    through the final norm and the image projection, see
    :mod:`~kiv.models.teachers.value_path`), distilled like any dense level
    and read by ``kiv.TextSegHead``.

    Summary options (``summary=dict(type=...)``):

    * ``'cls'``: token ``token`` (default 0, the CLS token) of recorded
      tensor ``index`` (default: the last ``(B, N, C)`` one).
    * ``'avg'``: global average of dense feature ``index`` (default -1, the
      last one).
    * ``'layer'``: output of the submodule ``name`` (element ``index`` if it
      returns a tuple), flattened to ``(B, C)``, e.g. a pooling layer.
    * ``'none'``: the teacher has no summary (e.g. SAM's image encoder or a
      detector's FPN, whose average-pooled maps mean nothing):
      ``summary`` is None and ``summary_dim`` is None; only its dense
      features are distilled.

    Inherited head: ``head=dict(layer='_fc', input='summary')`` keeps the
    teacher's own task head (a submodule of the model) available as
    :meth:`forward_head`, applied to a summary ``(B, C_s)``
    (``input='summary'``, e.g. a classifier giving logits) or to a tuple of
    dense features (``input='features'``, e.g. an mmdet dense head given
    neck maps). The student's projected outputs, de-standardised to the
    teacher's space, can be fed to it: the student then performs the
    teacher's task without downstream training (inherited heads).

    ``summary_dim``, ``feature_dims`` and ``feature_strides`` are measured
    once, at construction, by a dry-run forward on one zero image of size
    ``input_size`` (or ``probe_size`` when the teacher keeps the input
    size), so necks can size their heads from them. Strides are relative to
    the teacher's (resized, padded) input.

    Args:
        source (dict | nn.Module): how to build the network with its
            weights: a ``kiv.registry.TEACHER_SOURCES`` config
            (``type`` = ``'mm'``, ``'timm'``, ``'hf'``, ``'torchvision'`` or
            ``'module'``), or a module whose weights are already loaded.
        mean (Sequence[float]): per-channel mean on the 0-255 scale, like
            OpenMMLab data preprocessors, e.g. ``[123.675, 116.28, 103.53]``.
        std (Sequence[float]): per-channel std on the 0-255 scale.
        input_size (int | tuple[int, int], optional): ``(H, W)`` the images
            are resized to (bilinear, no antialias). ``None`` keeps the
            input size. Defaults to None.
        pad_to_multiple (int): pad bottom/right with zeros (after
            normalisation) to a multiple of this, e.g. the patch size.
            Defaults to 1.
        features (dict, optional): ``from_output`` (bool), ``layers``
            (list), ``indices`` (list[int]), ``nhwc`` (bool) and
            ``text_space`` (dict), see above.
            Defaults to ``dict(from_output=True)``.
        summary (dict, optional): see above. Defaults to
            ``dict(type='avg')``.
        head (dict, optional): ``dict(layer=<submodule name>,
            input='summary' | 'features')``. Defaults to None.
        forward_method (str): method of the model to run, e.g.
            ``'forward_features'`` (timm), ``'forward_intermediates'``
            (timm), ``'extract_feat'`` (mm models). Defaults to
            ``'forward'``.
        forward_kwargs (dict, optional): keyword arguments of that method,
            e.g. ``dict(indices=[5, 11], intermediates_only=True)``.
        num_prefix_tokens (int, optional): leading non-patch tokens of
            ``(B, N, C)`` features. Read from the model when it declares
            ``num_prefix_tokens`` (timm) or ``num_extra_tokens``
            (mmpretrain), itself or on its ``backbone``; must agree if both
            are given. Defaults to 0 when neither gives it.
        dtype (str): ``'fp32'`` (autocast disabled, even inside an outer
            autocast region), ``'bf16'`` or ``'fp16'`` (autocast for the
            model). Outputs are float32 in every case. Defaults to
            ``'fp32'``.
        probe_size (int | tuple[int, int]): image size of the dry run when
            ``input_size`` is None; 256 measures strides up to 128 exactly.
            Defaults to 256.
        fuse_conv_bn (bool): fold every BatchNorm into the convolution
            before it (mmcv's ``fuse_conv_bn``, as mmdet's benchmark tool
            does): the teacher is frozen in eval mode, so this is the same
            function with fewer operations, up to float rounding. Checked
            at construction on random images: outputs that move by more
            than rounding (a BatchNorm that does not follow its
            convolution in the forward) raise. Defaults to False.
        channels_last (bool): run the model on channels-last images and
            weights (faster convolutions with oneDNN and on tensor cores);
            the outputs are contiguous NCHW as always. Defaults to False.
    """

    def __init__(self,
                 source: dict | nn.Module,
                 mean: Sequence[float],
                 std: Sequence[float],
                 input_size: int | Sequence[int] | None = None,
                 pad_to_multiple: int = 1,
                 features: dict | None = None,
                 summary: dict | None = None,
                 head: dict | None = None,
                 forward_method: str = 'forward',
                 forward_kwargs: dict | None = None,
                 num_prefix_tokens: int | None = None,
                 dtype: str = 'fp32',
                 probe_size: int | Sequence[int] = 256,
                 fuse_conv_bn: bool = False,
                 channels_last: bool = False) -> None:
        super().__init__(init_cfg=None)
        self.model = build_teacher_model(source)
        self.channels_last = False  # set once the weights are converted

        # preprocessing
        if len(mean) != len(std):
            raise ValueError(f'Teacher mean {list(mean)} and std {list(std)} '
                             'need one value per channel')
        self.register_buffer(
            'mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            persistent=False)
        self.register_buffer(
            'std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
            persistent=False)
        self.input_size = self._pair('input_size', input_size)
        if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
            raise ValueError('Teacher pad_to_multiple must be a positive int, '
                             f'got {pad_to_multiple!r}')
        self.pad_to_multiple = pad_to_multiple
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f'Teacher dtype must be one of '
                             f'{list(AUTOCAST_DTYPES)}, got {dtype!r}')
        self.compute_dtype = dtype

        # how to run the model
        if not callable(getattr(self.model, forward_method, None)):
            raise ValueError(f'{type(self.model).__name__} has no method '
                             f'forward_method={forward_method!r}')
        self.forward_method = forward_method
        self.forward_kwargs = dict(forward_kwargs or {})
        declared = _model_prefix_tokens(self.model)
        if (declared is not None and num_prefix_tokens is not None
                and declared != num_prefix_tokens):
            raise ValueError(
                f'Teacher num_prefix_tokens={num_prefix_tokens} but '
                f'{type(self.model).__name__} declares {declared}')
        self.num_prefix_tokens = (declared if declared is not None else
                                  num_prefix_tokens or 0)

        self._init_features(features)
        self._init_summary(summary)
        self._init_head(head)

        # frozen for good
        self.requires_grad_(False)
        self.train(False)
        self._is_init = True  # parents' init_weights() skip the teacher

        try:
            probe_hw = self.input_size or self._pair('probe_size', probe_size)
            if fuse_conv_bn:
                fuse_frozen_conv_bn(self, probe_hw)
            if channels_last:
                self.model.to(memory_format=torch.channels_last)
                self.channels_last = True
            self._measure(probe_hw)
        except Exception:
            self.recorder.remove()  # leave a user-given module hook-free
            if self.text_space is not None:
                self.text_space.remove()
            raise

    def _init_features(self, features: dict | None) -> None:
        """Parse ``features``; the hooks are registered in _init_summary."""
        features = dict(from_output=True) if features is None else features
        _check_keys('features', features, _FEATURE_KEYS)
        self.layers = [_parse_layer(s) for s in features.get('layers', ())]
        self.from_output = bool(features.get('from_output', not self.layers))
        if not self.from_output and not self.layers:
            raise ValueError('Teacher features need from_output=True or a '
                             'non-empty layers list')
        indices = features.get('indices')
        self.feature_indices = None if indices is None else list(indices)
        self.nhwc = bool(features.get('nhwc', False))
        self.text_space_cfg = features.get('text_space')

    def _init_summary(self, summary: dict | None) -> None:
        """Parse ``summary`` and hook every recorded layer once."""
        summary = dict(type='avg') if summary is None else dict(summary)
        self.summary_type = summary.pop('type', None)
        if self.summary_type not in _SUMMARY_KEYS:
            raise ValueError('Teacher summary type must be one of '
                             f'{list(_SUMMARY_KEYS)}, got '
                             f'{self.summary_type!r}')
        _check_keys(f'summary (type={self.summary_type!r})', summary,
                    _SUMMARY_KEYS[self.summary_type])
        self.summary_cfg = summary
        if self.summary_type == 'layer' and 'name' not in summary:
            raise ValueError("Teacher summary type 'layer' needs name=<module"
                             ' name>')
        if (self.summary_type == 'cls'
                and summary.get('token', 0) >= self.num_prefix_tokens):
            raise ValueError(
                f"Teacher summary type 'cls' reads prefix token "
                f"{summary.get('token', 0)} but the model has "
                f'num_prefix_tokens={self.num_prefix_tokens}; set '
                "num_prefix_tokens or use summary type 'avg' / 'layer'")
        hooked = [name for name, _ in self.layers]
        if self.summary_type == 'layer':
            hooked.append(summary['name'])
        self.recorder = ModuleOutputsRecorder(self.model, hooked)
        self.text_space = None if self.text_space_cfg is None else \
            ValuePathRecorder(self.model, self.text_space_cfg)

    def _init_head(self, head: dict | None) -> None:
        """Parse ``head`` (the inherited task head)."""
        self.head_layer = self.head_input = None
        if head is None:
            return
        _check_keys('head', head, ('layer', 'input'))
        self.head_layer = head.get('layer')
        self.head_input = head.get('input', 'summary')
        if self.head_input not in _HEAD_INPUTS:
            raise ValueError(f'Teacher head input must be one of '
                             f'{list(_HEAD_INPUTS)}, got {self.head_input!r}')
        if self.head_input == 'summary' and self.summary_type == 'none':
            raise ValueError("Teacher head input 'summary' needs a summary; "
                             "the teacher has summary=dict(type='none')")
        try:
            self.model.get_submodule(self.head_layer)
        except (AttributeError, TypeError):
            raise ValueError(f'Teacher head layer {self.head_layer!r} is not '
                             f'a submodule of {type(self.model).__name__}') \
                from None

    def _measure(self, probe_hw: tuple[int, int]) -> None:
        """Dry run on one zero image: set ``summary_dim``, ``feature_dims``
        and ``feature_strides`` and check the level order."""
        probe = self(torch.zeros(1, self.mean.shape[1], *probe_hw))
        padded_h = -(-probe_hw[0] // self.pad_to_multiple) * \
            self.pad_to_multiple
        heights = [f.shape[-2] for f in probe.features]
        if any(a < b for a, b in zip(heights, heights[1:])):
            raise ValueError(
                'Teacher features must be ordered from the highest '
                f'resolution to the lowest; got heights {heights} at a '
                f'{probe_hw} input (reorder features.layers / indices)')
        self.summary_dim: int | None = None if probe.summary is None \
            else probe.summary.shape[1]
        self.feature_dims: list[int] = [f.shape[1] for f in probe.features]
        self.feature_strides: list[int] = [
            max(round(padded_h / h), 1) for h in heights
        ]

    @staticmethod
    def _pair(name: str, size: int | Sequence[int] | None
              ) -> tuple[int, int] | None:
        if size is None:
            return None
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or not all(isinstance(s, int) and s > 0
                                     for s in pair):
            raise ValueError(f'Teacher {name} must be an int or (H, W), got '
                             f'{size!r}')
        return pair

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever ``mode`` is (frozen BatchNorm, no
        dropout): the teacher is never trained.

        Returns:
            Teacher: self.
        """
        return super().train(False)

    def init_weights(self) -> None:
        """Do nothing: the weights come from the source's checkpoint and
        must not be re-initialised by a parent's ``init_weights()``."""

    def _autocast(self, device: torch.device) -> torch.autocast:
        return precision_autocast(self.compute_dtype, device.type)

    def preprocess(self, inputs: Tensor) -> Tensor:
        """Resize, normalise and pad raw images for the model.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` RGB in [0, 255], any dtype.

        Returns:
            Tensor: ``(B, 3, H', W')`` float32, ``(H', W')`` being
            ``input_size`` (or ``(H, W)``) rounded up to
            ``pad_to_multiple``.

        Normalisation comes before resizing: bilinear weights sum to 1, so
        the result is the same as resizing first, and the distiller's student
        normalises the same pixels the same way.
        """
        if inputs.dim() != 4 or inputs.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f'Teacher expects (B, {self.mean.shape[1]}, H, W) images in '
                f'[0, 255], got shape {tuple(inputs.shape)}')
        x = (inputs.float() - self.mean) / self.std
        if self.input_size is not None and x.shape[-2:] != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode='bilinear',
                              align_corners=False, antialias=False)
        pad_h = -x.shape[-2] % self.pad_to_multiple
        pad_w = -x.shape[-1] % self.pad_to_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def _recorded(self, output: Any) -> Recorded:
        """Labelled tensors: the flattened model output (if
        ``from_output``), then the hooked layers' outputs in order."""
        recorded = flatten_tensors(output, 'output') if self.from_output \
            else []
        for name, index in self.layers:
            value, label = self.recorder.get(name), f'layer {name!r}'
            if index is not None:
                value, label = value[index], f'{label}[{index}]'
            recorded += flatten_tensors(value, label)
        return recorded

    def _dense_features(self, recorded: Recorded,
                        image_hw: tuple[int, int]) -> tuple[Tensor, ...]:
        """The recorded tensors kept by ``features['indices']``, as float32
        NCHW maps ``(B, C_l, H_l, W_l)``."""
        indices = (range(len(recorded)) if self.feature_indices is None else
                   self.feature_indices)
        try:
            chosen = [recorded[i] for i in indices]
        except IndexError:
            raise ValueError(
                f'Teacher features.indices={list(indices)} but the recorded '
                f'tensors are {[label for label, _ in recorded]}') from None
        # contiguous NCHW whatever the model computes in (channels_last):
        # consumers such as mmcv's RoIAlign read raw memory
        return tuple(
            to_feature_map(t, label, image_hw, self.num_prefix_tokens,
                           self.nhwc).float().contiguous()
            for label, t in chosen)

    def _summary(self, recorded: Recorded,
                 features: tuple[Tensor, ...]) -> Tensor | None:
        """The ``(B, C_s)`` summary chosen by ``summary['type']`` (None for
        ``'none'``)."""
        cfg = self.summary_cfg
        if self.summary_type == 'none':
            return None
        if self.summary_type == 'avg':
            return features[cfg.get('index', -1)].mean(dim=(2, 3))
        if self.summary_type == 'layer':
            value = self.recorder.get(cfg['name'])
            if cfg.get('index') is not None:
                value = value[cfg['index']]
            return value.flatten(1)
        index = cfg.get('index')
        if index is None:
            index = max((i for i, (_, t) in enumerate(recorded)
                         if t.dim() == 3), default=None)
            if index is None:
                raise ValueError(
                    "Teacher summary type 'cls' needs (B, N, C) tokens but "
                    f'the recorded tensors are {[lb for lb, _ in recorded]}')
        label, tokens = recorded[index]
        if tokens.dim() != 3:
            raise ValueError(
                f"Teacher summary type 'cls' reads {label}, which has shape "
                f'{tuple(tokens.shape)}, not (B, N, C) tokens')
        return tokens[:, cfg.get('token', 0)]

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> FeatureOutput:
        """Extract the teacher's knowledge.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` RGB images in [0, 255].

        Returns:
            FeatureOutput: ``summary`` ``(B, summary_dim)`` (None with
            ``summary=dict(type='none')``) and ``features``,
            one ``(B, feature_dims[l], H'/feature_strides[l],
            W'/feature_strides[l])`` float32 map per level, ``(H', W')``
            being the preprocessed size.
        """
        with self._autocast(inputs.device):
            x = self.preprocess(inputs)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            run = (self.model if self.forward_method == 'forward' else
                   getattr(self.model, self.forward_method))
            try:
                recorded = self._recorded(run(x, **self.forward_kwargs))
                features = self._dense_features(recorded, x.shape[-2:])
                summary = self._summary(recorded, features)
                if self.text_space is not None:
                    # after the summary: its modules' hooks fire again
                    features += (to_feature_map(
                        self.text_space.tokens(), 'text_space',
                        x.shape[-2:], self.num_prefix_tokens).float(), )
                if summary is not None:
                    summary = summary.float().contiguous()
            finally:
                self.recorder.clear()
                if self.text_space is not None:
                    self.text_space.clear()
        return FeatureOutput(summary, features)

    @property
    def head(self) -> nn.Module | None:
        """The teacher's own task head (``head['layer']``), or None."""
        if self.head_layer is None:
            return None
        return self.model.get_submodule(self.head_layer)

    def _head_autocast(self) -> torch.autocast:
        """The autocast :meth:`forward_head` runs the head under."""
        return self._autocast(self.mean.device)
