"""Shared set-up for ``tools/train.py`` and ``tools/test.py``.

Both tools accept any OpenMMLab 2.x config (mmpretrain, mmdet, mmseg, kiv).
The config's ``default_scope`` picks the toolbox; :mod:`kiv` is always
imported so ``type='kiv.<Name>'`` resolves from every scope.
"""
from __future__ import annotations

import os
import os.path as osp
import sys
from typing import NoReturn

import torch
from mmengine.config import Config, DictAction

__all__ = [
    'DictAction', 'die', 'load_config', 'require_file', 'setup_work_dir',
    'setup_cpu_distributed', 'finish_distributed', 'config_scope',
    'add_safe_checkpoint_hook',
    'add_nonfinite_loss_hook', 'NONFINITE_LOSS_OPTIONS'
]

#: keys of the config's ``nonfinite_loss`` dict (the hook's arguments)
NONFINITE_LOSS_OPTIONS = ('action', 'max_consecutive', 'max_total',
                          'check_checkpoint')
_NONFINITE_HOOK_NAMES = ('NonFiniteLossHook', 'kiv.NonFiniteLossHook')


def die(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is an existing file (or a URL), else exit.

    Args:
        path (str): the path given on the command line.
        what (str): what the file is, for the error message.
    """
    if '://' in path or osp.isfile(osp.expanduser(path)):
        return path
    die(f'{what} not found: {path}')


def load_config(path: str, cfg_options: dict | None = None) -> Config:
    """Load an OpenMMLab config file and merge ``--cfg-options``.

    Args:
        path (str): config file (``.py``).
        cfg_options (dict, optional): overrides from ``--cfg-options``.

    Returns:
        Config: the merged config.
    """
    require_file(path, 'config file')
    try:
        cfg = Config.fromfile(path)
    except (FileNotFoundError, ImportError, SyntaxError, KeyError) as err:
        die(f'cannot load config {path}: {type(err).__name__}: {err}')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def config_scope(cfg: Config) -> str:
    """The toolbox scope a config runs in (``default_scope``, else mmengine).
    """
    return cfg.get('default_scope', None) or 'mmengine'


def setup_work_dir(cfg: Config, config_path: str,
                   work_dir: str | None) -> None:
    """Set ``cfg.work_dir``: CLI > config > ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])


def finish_distributed() -> None:
    """Leave the process group cleanly at the end of a tool.

    Without it, a rank that finishes first exits while the process group's
    communication threads are still alive (gloo: ``terminate called without
    an active exception``, SIGABRT). A barrier first, so no rank tears down
    while another still communicates. A no-op outside distributed runs.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Make ``--launcher pytorch`` work on machines without a GPU.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and its Runner
    wraps models with ``device_ids=[LOCAL_RANK]``; both fail on CPU. When
    there is no GPU we initialise the gloo process group from the variables
    torchrun sets (the Runner then skips its own initialisation) and use
    :class:`~kiv.engine.model_wrappers.CPUDistributedDataParallel`. On GPU
    machines nothing changes.

    Args:
        cfg (Config): the run's config, modified in place.
        launcher (str): ``none``, ``pytorch`` or ``slurm``.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    import torch.distributed as dist
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = \
        'gloo'
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='kiv.CPUDistributedDataParallel',
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type') in ('MMDistributedDataParallel',
                                 'mmengine.MMDistributedDataParallel'):
        # keep the options (e.g. find_unused_parameters), drop device_ids
        wrapper['type'] = 'kiv.CPUDistributedDataParallel'
    if not dist.is_initialized():
        if launcher == 'slurm':
            die('--launcher slurm needs GPUs; use --launcher pytorch '
                '(torchrun) for CPU runs')
        dist.init_process_group(
            backend='gloo',
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']))


def add_safe_checkpoint_hook(cfg: Config) -> None:
    """Add :class:`~kiv.engine.hooks.SafeCheckpointHook` to a run.

    Checkpoints of the run then load with ``weights_only=True`` (see
    :mod:`kiv.utils.checkpoint`), so ``--resume`` works without unpickling
    arbitrary objects. No-op if the config already has it.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    names = ('SafeCheckpointHook', 'kiv.SafeCheckpointHook')
    if not any(h.get('type') in names for h in hooks):
        hooks.append(dict(type='kiv.SafeCheckpointHook'))
    cfg.custom_hooks = hooks


def add_nonfinite_loss_hook(cfg: Config, action: str | None = None) -> None:
    """Guard the run against NaN/Inf losses (``kiv.NonFiniteLossHook``).

    kiv's configs carry the hook in ``custom_hooks`` (the default runtime),
    so it runs under any entry point; for other configs ``tools/train.py``
    adds it here, never a second one. Configured by, in order of
    precedence:

    1. ``action`` (``tools/train.py --nonfinite-loss {skip,stop,off}``);
    2. the config key ``nonfinite_loss``: a dict of the hook's arguments
       (:data:`NONFINITE_LOSS_OPTIONS`, e.g. ``dict(action='stop')``, also
       settable as ``--cfg-options nonfinite_loss.max_consecutive=3``), or
       ``'off'``; it is folded into the hook entry and the key cleared
       (the hook reads the key itself under other entry points);
    3. the arguments of the ``NonFiniteLossHook`` entry in ``custom_hooks``
       (an entry with arguments and the key must not both be set; a bare
       entry, as in kiv's default runtime, takes the key's options).

    Args:
        cfg (Config): the run's config; ``custom_hooks`` is updated.
        action (str, optional): ``'skip'``, ``'stop'`` or ``'off'``.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    found = [i for i, h in enumerate(hooks)
             if h.get('type') in _NONFINITE_HOOK_NAMES]
    if len(found) > 1:
        die(f'custom_hooks holds {len(found)} NonFiniteLossHook entries; '
            'keep one')
    existing = dict(hooks[found[0]]) if found else None
    setting = cfg.get('nonfinite_loss', None)
    if existing and set(existing) != {'type'} and setting is not None:
        die('the non-finite loss guard is set twice: by the config key '
            'nonfinite_loss and by the arguments of the NonFiniteLossHook in '
            'custom_hooks; keep one')
    default = existing or dict(type='kiv.NonFiniteLossHook')
    if setting is None or setting is True:
        hook = default
    elif setting == 'off' or setting is False:
        hook = None
    elif isinstance(setting, dict):
        unknown = sorted(set(setting) - set(NONFINITE_LOSS_OPTIONS))
        if unknown:
            die(f'config key nonfinite_loss: unknown option(s) '
                f'{", ".join(unknown)}; expected '
                f'{", ".join(NONFINITE_LOSS_OPTIONS)}')
        hook = dict(default, **setting)
    else:
        die(f"config key nonfinite_loss must be a dict or 'off', got "
            f'{setting!r}')
    if action == 'off':
        hook = None
    elif action is not None:
        hook = dict(hook or default, action=action)
    index = found[0] if found else len(hooks)
    hooks[index:index + 1] = [] if hook is None else [hook]
    cfg.custom_hooks = hooks
    if setting is not None:
        cfg.nonfinite_loss = None  # folded into the hook entry
