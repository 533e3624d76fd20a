"""Teacher source ``'mm'``: an mmpretrain / mmdet / mmseg model and its
checkpoint."""
from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence

from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope
from torch import Tensor, nn

from kiv.registry import TEACHER_SOURCES
from kiv.utils.state_dict import StateDict, select_part, select_prefix
from kiv.utils.weights import load_teacher_checkpoint

#: ``part`` option -> the submodules it keeps.
PARTS = ('whole', 'backbone', 'backbone+neck')


class BackboneNeck(nn.Module):
    """An mm model's backbone followed by its neck (e.g. ResNet + FPN).

    Keeps the attribute names ``backbone`` and ``neck``, so checkpoint keys
    (``backbone.*``, ``neck.*``) and hook names (``'neck.fpn_convs.0'``) are
    those of the full model.

    Args:
        backbone (nn.Module): returns a tuple of maps.
        neck (nn.Module): maps that tuple to another tuple of maps.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, inputs: Tensor) -> tuple[Tensor, ...]:
        """Run the backbone, then the neck.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` normalised images.

        Returns:
            tuple[Tensor, ...]: the neck's maps, e.g. FPN levels
            ``(B, C, H / s, W / s)``, highest resolution first.
        """
        return tuple(self.neck(self.backbone(inputs)))


def _load_config(config: str | Mapping) -> tuple[ConfigDict, str | None]:
    """Model config and the config's ``default_scope``.

    ``config`` is a config file path, a ``'mmdet::path/to/cfg.py'`` style
    package path, a full config dict (with a ``model`` entry) or the model
    dict itself. A package path's scope defaults to the package.
    """
    package = None
    if isinstance(config, str):
        if '::' in config:
            package = config.split('::', 1)[0]
            if importlib.util.find_spec(package) is None:
                raise ImportError(f'mm teacher config {config!r} needs the '
                                  f'package {package!r}, not installed')
            from mmengine.hub import get_config
            config = get_config(config)
        else:
            config = Config.fromfile(config)
    if isinstance(config, Config):
        config = config._cfg_dict
    if not isinstance(config, Mapping):
        raise TypeError('mm teacher source config must be a path or a dict, '
                        f'got {type(config).__name__}')
    # ConfigDict, not dict: mm models read nested options as attributes
    # (e.g. mmdet's ``train_cfg.rpn``, mmseg's ``test_cfg.mode``).
    config = ConfigDict(copy.deepcopy(dict(config)))
    if 'type' in config:
        return config, None
    if 'model' not in config:
        raise ValueError('mm teacher source config has neither a model '
                         "entry nor a 'type'")
    return config.model, config.get('default_scope', package)


def _select_part(part: str) -> Callable[[StateDict], StateDict]:
    """State-dict filter that keeps the keys of ``part``.

    A full-model checkpoint (keys ``backbone.*``, ``neck.*``, ``head.*``)
    is cut down to the part; a checkpoint of the backbone alone (no
    ``backbone.`` keys) is used as it is for ``part='backbone'``.
    """

    def select(state_dict: StateDict) -> StateDict:
        if part == 'whole':
            return state_dict
        if part == 'backbone':
            return select_part(state_dict, 'backbone.')
        return select_prefix(state_dict, ('backbone.', 'neck.'), strip=False)

    return select


@TEACHER_SOURCES.register_module(name='mm')
def build_mm_teacher(config: str | Mapping,
                     checkpoint: str,
                     part: str = 'whole',
                     scope: str | None = None,
                     strict: bool = True,
                     state_dict_key: str | None = None,
                     rename: Sequence[Sequence[str]] = (),
                     drop_keys: Sequence[str] = ()) -> nn.Module:
    """Build an OpenMMLab model and load its checkpoint.

    The model is built by the toolbox's own ``MODELS`` registry inside
    ``DefaultScope.overwrite_default_scope(scope)``, so unscoped nested
    types (``'ResNet'``, ``'FPN'``) resolve in that toolbox whatever the
    current run's scope is. The model's data preprocessor is never used:
    the :class:`~kiv.models.teachers.Teacher` normalises images itself.

    Args:
        config (str | dict): config file path, ``'mmdet::path/cfg.py'``
            path of a config shipped with an installed toolbox, full config
            dict (``model=...``, ``default_scope=...``) or model dict.
        checkpoint (str): local checkpoint file, e.g. a full detector
            checkpoint from the toolbox's model zoo.
        part (str): ``'whole'`` (the model; ``forward`` gives its
            ``mode='tensor'`` output), ``'backbone'`` (forward gives the
            backbone's tuple of maps) or ``'backbone+neck'``
            (:class:`BackboneNeck`). A full-model checkpoint is cut to the
            part (``backbone.`` prefix stripped for ``'backbone'``).
            Defaults to ``'whole'``.
        scope (str, optional): ``'mmpretrain'``, ``'mmdet'`` or
            ``'mmseg'``. Defaults to the config's ``default_scope``, then to
            the package of a ``'mmdet::...'`` path, then to the scope prefix
            of the model type (``'mmdet.RetinaNet'``).
        strict (bool): keys and shapes must match exactly. Defaults to True.
        state_dict_key, rename, drop_keys: see
            :func:`~kiv.utils.weights.load_teacher_checkpoint`.

    Returns:
        nn.Module: the selected part with its weights loaded.
    """
    if part not in PARTS:
        raise ValueError(f'mm teacher part must be one of {list(PARTS)}, '
                         f'got {part!r}')
    model_cfg, default_scope = _load_config(config)
    model_type = model_cfg.get('type')
    if scope is None:
        scope = default_scope
    if scope is None and isinstance(model_type, str) and '.' in model_type:
        scope = model_type.split('.', 1)[0]
    if scope is None:
        raise ValueError(
            f'cannot tell which toolbox builds {model_type!r}: pass '
            "scope='mmpretrain' / 'mmdet' / 'mmseg' to the mm teacher source")
    try:
        registry = importlib.import_module(f'{scope}.registry').MODELS
    except ImportError as err:
        raise ImportError(f'mm teacher source scope={scope!r} needs the '
                          f'{scope} package ({err})') from err
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(model_cfg)

    if part != 'whole':
        backbone = getattr(model, 'backbone', None)
        neck = getattr(model, 'neck', None)
        if backbone is None or (part == 'backbone+neck' and neck is None):
            raise ValueError(f'mm teacher part={part!r} but '
                             f'{type(model).__name__} has no '
                             f'{"backbone" if backbone is None else "neck"}')
        model = backbone if part == 'backbone' else BackboneNeck(
            backbone, neck)
    load_teacher_checkpoint(model, checkpoint, state_dict_key=state_dict_key,
                            rename=rename, drop_keys=drop_keys, strict=strict,
                            convert=_select_part(part))
    return model
