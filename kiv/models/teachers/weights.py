"""Strict, weights-only loading of teacher checkpoints.

Every teacher source loads its file through :func:`load_teacher_checkpoint`:

1. read the file with :func:`kiv.engine.checkpoint.safe_torch_load`
   (``weights_only=True``) or, for ``.safetensors`` files, with
   :func:`safetensors.torch.load_file` (a format that cannot hold code);
2. take the state dict out of the checkpoint (``state_dict_key``, or the
   ``'state_dict'`` / ``'model'`` entry mmengine, timm and most research
   repos use) and strip the ``module.`` prefix DDP adds, as mmengine's
   ``load_checkpoint`` does;
3. apply the user's ``rename`` rules, the source's own conversion (timm's
   ``checkpoint_filter_fn``, the ``part`` of an mm model) and ``drop_keys``;
4. load it, strictly by default: a teacher must never silently stay random,
   so missing keys, unexpected keys and shape mismatches raise one
   :class:`TeacherCheckpointError` that names the file and the first keys.
"""
from __future__ import annotations

import logging
import os.path as osp
import re
from collections.abc import Callable, Mapping, Sequence

from mmengine.logging import print_log
from torch import Tensor, nn

from kiv.engine.checkpoint import safe_torch_load

StateDict = dict[str, Tensor]

#: Entries that hold the weights in common checkpoint layouts (mmengine
#: ``Runner``, timm / DeiT / MAE training scripts), tried in this order when
#: no ``state_dict_key`` is given.
DEFAULT_STATE_DICT_KEYS = ('state_dict', 'model')

#: How many keys an error message lists per category.
_NUM_KEYS_SHOWN = 5


class TeacherCheckpointError(RuntimeError):
    """A teacher checkpoint does not match the model it should initialise."""


def first_keys(keys: Sequence[str]) -> str:
    """The first keys of a list, quoted, with a count of the rest."""
    shown = ', '.join(repr(k) for k in keys[:_NUM_KEYS_SHOWN])
    more = len(keys) - _NUM_KEYS_SHOWN
    return shown + (f', ... (+{more} more)' if more > 0 else '')


def read_state_dict(path: str, state_dict_key: str | None = None) -> StateDict:
    """Read the state dict stored in a local checkpoint file.

    Args:
        path (str): ``.pth`` / ``.pt`` / ``.bin`` file (read with
            ``weights_only=True``) or ``.safetensors`` file.
        state_dict_key (str, optional): entry of the checkpoint dict that
            holds the weights (e.g. ``'state_dict'``, ``'model'``,
            ``'teacher'``). ``None`` takes the first of
            :data:`DEFAULT_STATE_DICT_KEYS` that exists, else the checkpoint
            itself.

    Returns:
        dict[str, Tensor]: parameter/buffer name -> tensor, with the
        ``module.`` prefix of DDP-wrapped checkpoints removed.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        TeacherCheckpointError: if ``state_dict_key`` is missing or the
            checkpoint is not a mapping of names to tensors.
    """
    path = osp.expanduser(path)
    if path.endswith('.safetensors'):
        if not osp.isfile(path):
            raise FileNotFoundError(f'checkpoint file not found: {path}')
        from safetensors.torch import load_file
        checkpoint = load_file(path, device='cpu')
    else:
        checkpoint = safe_torch_load(path, map_location='cpu')
    if not isinstance(checkpoint, Mapping):
        raise TeacherCheckpointError(
            f'{path}: expected a dict of tensors, got '
            f'{type(checkpoint).__name__}')
    if state_dict_key is not None:
        if state_dict_key not in checkpoint:
            raise TeacherCheckpointError(
                f'{path}: state_dict_key={state_dict_key!r} is not in the '
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
        raise TeacherCheckpointError(
            f'{path}: the state dict holds non-tensor entries '
            f'{first_keys(not_tensors)}; set state_dict_key to the entry that '
            'holds the weights')
    return {re.sub(r'^module\.', '', k): v for k, v in checkpoint.items()}


def rename_keys(state_dict: StateDict,
                rules: Sequence[Sequence[str]]) -> StateDict:
    """Rewrite keys with regular expressions, applied in order.

    Args:
        state_dict (dict[str, Tensor]): weights.
        rules (Sequence[tuple[str, str]]): ``(pattern, replacement)`` pairs
            for :func:`re.sub`, e.g. ``[(r'^encoder\\.', '')]``.

    Returns:
        dict[str, Tensor]: the renamed state dict.

    Raises:
        TeacherCheckpointError: if two keys are renamed to the same name.
    """
    if not rules:
        return state_dict
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    renamed: StateDict = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, repl in compiled:
            new_key = pattern.sub(repl, new_key)
        if new_key in renamed:
            raise TeacherCheckpointError(
                f'rename rules {list(rules)} map both {origin[new_key]!r} and '
                f'{key!r} to {new_key!r}')
        renamed[new_key] = value
        origin[new_key] = key
    return renamed


def drop_matching_keys(state_dict: StateDict,
                       patterns: Sequence[str]) -> StateDict:
    """Remove the keys that match any of ``patterns`` (:func:`re.search`).

    Args:
        state_dict (dict[str, Tensor]): weights.
        patterns (Sequence[str]): regular expressions, e.g. ``[r'^head\\.']``
            for a classifier the teacher does not use.

    Returns:
        dict[str, Tensor]: the remaining entries.
    """
    if not patterns:
        return state_dict
    regex = re.compile('|'.join(f'(?:{p})' for p in patterns))
    return {k: v for k, v in state_dict.items() if not regex.search(k)}


def load_state_dict_checked(model: nn.Module, state_dict: StateDict,
                            path: str, strict: bool = True) -> None:
    """Load weights into ``model``; report every mismatch in one error.

    Args:
        model (nn.Module): the teacher network.
        state_dict (dict[str, Tensor]): weights in the model's key layout.
        path (str): file the weights come from (named in messages).
        strict (bool): raise on missing keys, unexpected keys and shape
            mismatches. With ``False`` they are skipped and logged as a
            warning. Defaults to True.

    Raises:
        TeacherCheckpointError: with ``strict=True``, if the keys or shapes
            differ; the message names ``path`` and the first keys of each
            kind.
    """
    own = model.state_dict()
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        state_dict = {
            k: v for k, v in state_dict.items()
            if k not in own or v.shape == own[k].shape
        }
    result = model.load_state_dict(state_dict, strict=False)
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
    message = (f'checkpoint {path} does not match the teacher '
               f'{type(model).__name__}: ' + '; '.join(problems))
    if strict:
        raise TeacherCheckpointError(
            message + '. Fix the source\'s state_dict_key / rename / '
            'drop_keys / part options, or set strict=False to load the '
            'matching weights only.')
    print_log(message + ' (strict=False: loaded the matching weights only)',
              logger='current', level=logging.WARNING)


def load_teacher_checkpoint(
        model: nn.Module,
        checkpoint: str,
        state_dict_key: str | None = None,
        rename: Sequence[Sequence[str]] = (),
        drop_keys: Sequence[str] = (),
        strict: bool = True,
        convert: Callable[[StateDict], StateDict] | None = None) -> None:
    """Read ``checkpoint`` and load it into ``model`` (steps 1-4 above).

    Args:
        model (nn.Module): the teacher network, already built.
        checkpoint (str): local file path.
        state_dict_key (str, optional): see :func:`read_state_dict`.
        rename (Sequence[tuple[str, str]]): regex rules applied first, see
            :func:`rename_keys`.
        drop_keys (Sequence[str]): regexes of keys (in the model's layout,
            after ``rename`` and ``convert``) to discard.
        strict (bool): see :func:`load_state_dict_checked`.
        convert (Callable, optional): the source's own layout conversion,
            applied after ``rename``.

    Raises:
        FileNotFoundError: if ``checkpoint`` does not exist.
        TeacherCheckpointError: if the weights do not fit the model.
    """
    if not isinstance(checkpoint, str) or not checkpoint:
        raise TypeError(
            'a teacher source needs checkpoint=<path of a local weights '
            f'file>, got {checkpoint!r}; a teacher must not stay random')
    state_dict = read_state_dict(checkpoint, state_dict_key)
    state_dict = rename_keys(state_dict, rename)
    if convert is not None:
        state_dict = convert(state_dict)
    state_dict = drop_matching_keys(state_dict, drop_keys)
    load_state_dict_checked(model, state_dict, checkpoint, strict)
