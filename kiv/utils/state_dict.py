"""Reading state dicts out of checkpoint files and loading them, checked.

One path for every weights file kiv reads (teachers, the student's frozen
base ViT, exported students, the demo's checkpoints):

1. :func:`read_checkpoint`: ``.safetensors`` files with safetensors (a
   format that cannot hold code), everything else with
   :func:`kiv.utils.checkpoint.safe_torch_load` (``weights_only=True``);
2. :func:`unwrap_state_dict`: the state dict inside the checkpoint (a given
   ``state_dict_key``, else the ``'state_dict'`` / ``'model'`` entry
   mmengine, timm and most research repos use, else the checkpoint
   itself), checked to hold tensors only, with the ``module.`` prefix DDP
   adds removed (as mmengine's ``load_checkpoint`` does);
3. :func:`select_prefix` / :func:`select_part`: the entries of one
   sub-module (``backbone.``, ``student.``), prefix stripped;
4. :func:`load_state_dict_checked`: missing keys, unexpected keys and shape
   mismatches reported together in one error that names the file and the
   first keys of each kind (or, non-strict, logged as a warning).

Errors are :class:`StateDictError` (a ``ValueError``) unless the caller
passes its own class (the teachers raise
:class:`~kiv.utils.weights.TeacherCheckpointError`, a subclass).
"""
from __future__ import annotations

import logging
import os.path as osp
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mmengine.logging import print_log
from torch import Tensor, nn

from .checkpoint import safe_torch_load

__all__ = [
    'StateDict', 'StateDictError', 'DEFAULT_STATE_DICT_KEYS', 'first_keys',
    'read_checkpoint', 'unwrap_state_dict', 'read_state_dict',
    'select_prefix', 'select_part', 'load_state_dict_checked'
]

StateDict = dict[str, Tensor]

#: Entries that hold the weights in common checkpoint layouts (mmengine
#: ``Runner``, timm / DeiT / MAE training scripts), tried in this order when
#: no ``state_dict_key`` is given.
DEFAULT_STATE_DICT_KEYS = ('state_dict', 'model')

#: How many keys an error message lists per category.
NUM_KEYS_SHOWN = 5


class StateDictError(ValueError):
    """A checkpoint holds no usable state dict, or its weights do not fit
    the model that should hold them."""


def first_keys(keys: Sequence[str]) -> str:
    """The first keys of a list, quoted, with a count of the rest."""
    shown = ', '.join(repr(k) for k in keys[:NUM_KEYS_SHOWN])
    more = len(keys) - NUM_KEYS_SHOWN
    return shown + (f', ... (+{more} more)' if more > 0 else '')


def read_checkpoint(path: str) -> Any:
    """Read a local checkpoint file without running code.

    Args:
        path (str): ``.safetensors`` file, or a ``torch.save`` file
            (``.pth`` / ``.pt`` / ``.bin``) read with ``weights_only=True``.

    Returns:
        Any: the file's content (a dict of tensors for safetensors).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        kiv.utils.checkpoint.UnsafeCheckpointError: a pickle that needs
            globals off the allowlist.
    """
    path = osp.expanduser(path)
    if path.endswith('.safetensors'):
        if not osp.isfile(path):
            raise FileNotFoundError(f'checkpoint file not found: {path}')
        from safetensors.torch import load_file
        return load_file(path, device='cpu')
    return safe_torch_load(path, map_location='cpu')


def unwrap_state_dict(checkpoint: Any,
                      source: str,
                      state_dict_key: str | None = None,
                      error: type[Exception] = StateDictError) -> StateDict:
    """The state dict inside a checkpoint (step 2 of the module doc).

    Args:
        checkpoint: what :func:`read_checkpoint` returned.
        source (str): where it comes from (named in errors).
        state_dict_key (str, optional): entry of the checkpoint dict that
            holds the weights (e.g. ``'state_dict'``, ``'model'``,
            ``'teacher'``). ``None`` takes the first of
            :data:`DEFAULT_STATE_DICT_KEYS` that exists, else the checkpoint
            itself.
        error (type[Exception]): class of the errors raised. Defaults to
            :class:`StateDictError`.

    Returns:
        dict[str, Tensor]: parameter/buffer name -> tensor, with the
        ``module.`` prefix of DDP-wrapped checkpoints removed.

    Raises:
        error: if the checkpoint is not a mapping, ``state_dict_key`` is
            missing or the state dict holds entries that are not tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise error(f'{source}: expected a dict of tensors, got '
                    f'{type(checkpoint).__name__}')
    if state_dict_key is not None:
        if state_dict_key not in checkpoint:
            raise error(
                f'{source}: state_dict_key={state_dict_key!r} is not in the '
                'checkpoint; its top-level keys are '
                f'{first_keys(list(checkpoint))}')
        checkpoint = checkpoint[state_dict_key]
    else:
        for key in DEFAULT_STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    not_tensors = [
        k for k, v in checkpoint.items() if not isinstance(v, Tensor)
    ]
    if not_tensors:
        raise error(
            f'{source}: the state dict holds non-tensor entries '
            f'{first_keys(not_tensors)}; set state_dict_key to the entry '
            'that holds the weights')
    return {re.sub(r'^module\.', '', k): v for k, v in checkpoint.items()}


def read_state_dict(path: str,
                    state_dict_key: str | None = None,
                    error: type[Exception] = StateDictError) -> StateDict:
    """Read the state dict stored in a local checkpoint file.

    :func:`read_checkpoint` then :func:`unwrap_state_dict` (same
    arguments).

    Returns:
        dict[str, Tensor]: the weights.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        error: see :func:`unwrap_state_dict`.
    """
    return unwrap_state_dict(read_checkpoint(path), path, state_dict_key,
                             error)


def select_prefix(state_dict: Mapping[str, Tensor],
                  prefixes: str | Sequence[str],
                  strip: bool = True) -> StateDict:
    """The entries whose keys start with one of ``prefixes``.

    Args:
        state_dict (Mapping[str, Tensor]): weights.
        prefixes (str | Sequence[str]): e.g. ``'student.'`` or
            ``('backbone.', 'neck.')``.
        strip (bool): remove the prefix from the keys. Defaults to True.

    Returns:
        dict[str, Tensor]: the selected entries, in their order.
    """
    if isinstance(prefixes, str):
        prefixes = (prefixes, )
    prefixes = tuple(prefixes)
    selected = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            selected[key[len(prefix):] if strip else key] = value
    return selected


def select_part(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """The weights of one part of a model, whichever way they were saved.

    A checkpoint of the whole model (keys ``backbone.*``, ``neck.*``,
    ``head.*``) is cut to the entries under ``prefix``, prefix stripped; a
    checkpoint of the part alone (no key under ``prefix``) is returned as it
    is.

    Args:
        state_dict (Mapping[str, Tensor]): weights.
        prefix (str): e.g. ``'backbone.'``.

    Returns:
        dict[str, Tensor]: the part's weights.
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return select_prefix(state_dict, prefix)


def load_state_dict_checked(module: nn.Module,
                            state_dict: Mapping[str, Tensor],
                            source: str,
                            what: str | None = None,
                            strict: bool = True,
                            error: type[Exception] = StateDictError,
                            hint: str = '') -> None:
    """Load weights into ``module``; report every mismatch in one error.

    Args:
        module (nn.Module): the model to fill.
        state_dict (Mapping[str, Tensor]): weights in the model's key layout.
        source (str): the file the weights come from (named in messages).
        what (str, optional): a short description of ``module`` for
            messages. Defaults to its class name.
        strict (bool): raise on missing keys, unexpected keys and shape
            mismatches. With ``False`` they are skipped and logged as a
            warning. Defaults to True.
        error (type[Exception]): class of the error raised. Defaults to
            :class:`StateDictError`.
        hint (str): appended to the error message (what to change).

    Raises:
        error: with ``strict=True``, if the keys or shapes differ; the
            message names ``source`` and the first keys of each kind.
    """
    own = module.state_dict()
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        state_dict = {
            k: v for k, v in state_dict.items()
            if k not in own or v.shape == own[k].shape
        }
    result = module.load_state_dict(state_dict, strict=False)
    mismatched_keys = {m.split(':')[0] for m in mismatched}
    missing = [k for k in result.missing_keys if k not in mismatched_keys]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys ({first_keys(missing)})')
    if result.unexpected_keys:
        problems.append(f'{len(result.unexpected_keys)} unexpected keys '
                        f'({first_keys(result.unexpected_keys)})')
    if mismatched:
        problems.append(f'{len(mismatched)} shape mismatches '
                        f'({first_keys(mismatched)})')
    if not problems:
        return
    what = what or type(module).__name__
    message = (f'checkpoint {source}: weights do not fit {what}: ' +
               '; '.join(problems))
    if strict:
        raise error(message + (f'. {hint}' if hint else ''))
    print_log(message + ' (strict=False: loaded the matching weights only)',
              logger='current', level=logging.WARNING)
