"""Strict, weights-only loading of a weights file into a built network.

Every teacher source (and the student's timm base ViT, through
:mod:`kiv.utils.timm_weights`) loads its file through
:func:`load_teacher_checkpoint`:

1. read the file and take the state dict out of it
   (:func:`kiv.utils.state_dict.read_state_dict`: weights-only, the
   ``state_dict_key`` or ``'state_dict'`` / ``'model'`` entry, ``module.``
   prefix stripped);
2. apply the user's ``rename`` rules, the source's own conversion (timm's
   ``checkpoint_filter_fn``, the ``part`` of an mm model) and ``drop_keys``;
3. load it, strictly by default
   (:func:`kiv.utils.state_dict.load_state_dict_checked`): a teacher must
   never silently stay random, so missing keys, unexpected keys and shape
   mismatches raise one :class:`TeacherCheckpointError` that names the file
   and the first keys.

Nothing in a file is discarded silently. Official files often hold more
than the network a teacher needs (SAM's prompt encoder and mask decoder,
DINOv2's ``mask_token``): a conversion that throws such entries away (timm's
filters do) runs through :func:`convert_checked`, and every discarded entry
must then be named by a ``drop_keys`` pattern of the source config.
Declared drops are logged.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

from mmengine.logging import print_log
from torch import Tensor, nn

from .state_dict import (StateDict, StateDictError, first_keys,
                         load_state_dict_checked, read_state_dict)


class TeacherCheckpointError(StateDictError, RuntimeError):
    """A teacher checkpoint does not match the model it should initialise.
    """


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


def summarize_keys(keys: Sequence[str]) -> str:
    """Keys grouped by their first name component, for log messages.

    Example: ``['mask_decoder.a', 'mask_decoder.b', 'mask_token']`` gives
    ``"mask_decoder.* (2 keys), 'mask_token'"``.
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split('.', 1)[0], []).append(key)
    parts = []
    for head, members in groups.items():
        if len(members) == 1 and members[0] == head:
            parts.append(repr(head))
        else:
            parts.append(f'{head}.* ({len(members)} '
                         f'key{"s" if len(members) > 1 else ""})')
    return ', '.join(parts)


def _data_id(tensor: Tensor) -> int:
    """Address of a tensor's first element (0 for tensors without data).

    Renamed entries and views that start at the same element (transposes,
    ``unsqueeze``) keep it, even in files whose tensors share one storage
    (memory-mapped safetensors).
    """
    try:
        return tensor.data_ptr() if tensor.numel() else 0
    except RuntimeError:  # e.g. tensors without storage
        return 0


def discarded_entries(before: Mapping[str, Tensor],
                      after: Mapping[str, Tensor]) -> list[str]:
    """Entries of ``before`` that a conversion did not carry into ``after``.

    A key is *carried* if ``after`` has the same key (possibly converted,
    e.g. DINOv2's ``cls_token`` plus its position, or a sliced
    ``pos_embed``) or the same tensor data under another name (renamed,
    e.g. SAM's ``image_encoder.blocks.0.mlp.lin1.weight`` ->
    ``blocks.0.mlp.fc1.weight``, or viewed, e.g. OpenAI CLIP's transposed
    ``visual.proj`` -> ``head.weight``). Everything else was thrown away by
    the conversion.

    Args:
        before (Mapping[str, Tensor]): the state dict given to the
            conversion (read before calling it: conversions may mutate it).
        after (Mapping[str, Tensor]): the conversion's result.

    Returns:
        list[str]: the discarded keys of ``before``, in file order.
    """
    carried = {_data_id(v) for v in after.values()} - {0}
    return [
        k for k, v in before.items()
        if k not in after and _data_id(v) not in carried
    ]


def _matching(keys: Sequence[str], patterns: Sequence[str]) -> list[str]:
    if not patterns:
        return []
    regex = re.compile('|'.join(f'(?:{p})' for p in patterns))
    return [k for k in keys if regex.search(k)]


def drop_patterns(keys: Sequence[str]) -> list[str]:
    """``drop_keys`` regexes that name ``keys`` by their first component.

    Example: ``['mask_token', 'mask_decoder.a']`` gives
    ``['^mask_token$', '^mask_decoder\\.']``.
    """
    patterns = []
    for key in keys:
        head = key.split('.', 1)[0]
        pattern = (rf'^{re.escape(head)}$' if key == head else
                   rf'^{re.escape(head)}\.')
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def convert_checked(state_dict: StateDict,
                    convert: Callable[[StateDict], StateDict],
                    drop_keys: Sequence[str],
                    path: str,
                    what: str,
                    strict: bool = True) -> StateDict:
    """Run a layout conversion that must not discard entries silently.

    Every entry the conversion throws away (see :func:`discarded_entries`)
    must match one of ``drop_keys``: declared drops are logged; undeclared
    ones raise (``strict``) or are logged as a warning.

    Args:
        state_dict (dict[str, Tensor]): weights in the file's layout (after
            ``rename``).
        convert (Callable): the conversion, e.g. timm's
            ``checkpoint_filter_fn`` bound to the model.
        drop_keys (Sequence[str]): the source's ``drop_keys`` regexes,
            matched (:func:`re.search`) against the discarded file keys.
        path (str): the checkpoint file (named in messages).
        what (str): the conversion, for messages (e.g. ``"timm's
            checkpoint_filter_fn of 'samvit_base_patch16'"``).
        strict (bool): raise on undeclared drops. Defaults to True.

    Returns:
        dict[str, Tensor]: the converted weights.

    Raises:
        TeacherCheckpointError: with ``strict=True``, if the conversion
            discarded entries that no ``drop_keys`` pattern names; the
            message lists them and the ``drop_keys`` that would declare them.
    """
    before = dict(state_dict)
    converted = convert(dict(state_dict))
    discarded = discarded_entries(before, converted)
    declared = _matching(discarded, drop_keys)
    if declared:
        print_log(f'{path}: dropped {len(declared)} entries of the file '
                  f'(drop_keys): {summarize_keys(declared)}',
                  logger='current', level=logging.INFO)
    declared_set = set(declared)
    undeclared = [k for k in discarded if k not in declared_set]
    if undeclared:
        message = (f'{what} discards {len(undeclared)} entries of {path} '
                   f'that drop_keys does not name: '
                   f'{summarize_keys(undeclared)} (first: '
                   f'{first_keys(undeclared)})')
        if strict:
            raise TeacherCheckpointError(
                f'{message}. Nothing is dropped silently: if the teacher '
                'does not need them, add '
                f'drop_keys={drop_patterns(undeclared)} to the source config.')
        print_log(message + ' (strict=False: dropped anyway)',
                  logger='current', level=logging.WARNING)
    return converted


def load_teacher_checkpoint(
        model: nn.Module,
        checkpoint: str,
        state_dict_key: str | None = None,
        rename: Sequence[Sequence[str]] = (),
        drop_keys: Sequence[str] = (),
        strict: bool = True,
        convert: Callable[[StateDict], StateDict] | None = None) -> None:
    """Read ``checkpoint`` and load it into ``model`` (steps 1-3 above).

    Args:
        model (nn.Module): the teacher network, already built.
        checkpoint (str): local file path.
        state_dict_key (str, optional): entry of the checkpoint dict that
            holds the weights; see
            :func:`kiv.utils.state_dict.unwrap_state_dict`.
        rename (Sequence[tuple[str, str]]): regex rules applied first, see
            :func:`rename_keys`.
        drop_keys (Sequence[str]): regexes of keys (in the model's layout,
            after ``rename`` and ``convert``) to discard; dropped keys are
            logged. A source whose conversion may throw file entries away
            (timm's filters) also checks them against ``drop_keys`` with
            :func:`convert_checked`.
        strict (bool): raise on missing keys, unexpected keys and shape
            mismatches; with ``False`` load the matching weights and log the
            rest as a warning. Defaults to True.
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
    state_dict = read_state_dict(checkpoint, state_dict_key,
                                 error=TeacherCheckpointError)
    state_dict = rename_keys(state_dict, rename)
    if convert is not None:
        state_dict = convert(state_dict)
    dropped = _matching(list(state_dict), drop_keys)
    if dropped:
        print_log(f'{checkpoint}: dropped {len(dropped)} converted entries '
                  f'(drop_keys): {summarize_keys(dropped)}',
                  logger='current', level=logging.INFO)
    state_dict = drop_matching_keys(state_dict, drop_keys)
    load_state_dict_checked(
        model, state_dict, checkpoint, f'the teacher {type(model).__name__}',
        strict=strict, error=TeacherCheckpointError,
        hint='Fix the source\'s state_dict_key / rename / drop_keys / part '
        'options, or set strict=False to load the matching weights only.')
