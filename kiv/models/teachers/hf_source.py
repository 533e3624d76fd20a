"""Teacher source ``'hf'``: a HF transformers model from a local directory.

transformers is optional (``requirements/optional.txt``): it is imported
only when this source is built.
"""
from __future__ import annotations

import os.path as osp
from typing import Any

from torch import Tensor, nn

from kiv.registry import TEACHER_SOURCES
from kiv.utils.state_dict import first_keys
from kiv.utils.weights import TeacherCheckpointError


def _hf_prefix_tokens(model: nn.Module) -> int | None:
    """CLS + distillation + register tokens of a HF ViT-like model, read
    from its embeddings module (ViT, DeiT, DINOv2 (+registers), CLIP); None
    if it has no such module."""
    embeddings = getattr(model, 'embeddings', None)
    if embeddings is None:
        embeddings = getattr(getattr(model, 'vision_model', None),
                             'embeddings', None)
    if embeddings is None:
        return None
    count = 0
    for attr in ('cls_token', 'class_embedding', 'distillation_token'):
        if getattr(embeddings, attr, None) is not None:
            count += 1
    registers = getattr(embeddings, 'register_tokens', None)
    if registers is not None:
        count += registers.shape[1]
    return count


class HFVisionModel(nn.Module):
    """Calls a HF vision model on pixels and returns one of its outputs.

    Args:
        model (nn.Module): a ``transformers.PreTrainedModel``.
        output (str, optional): ``ModelOutput`` entry to return:
            ``'last_hidden_state'`` (``(B, N, C)`` tokens),
            ``'pooler_output'``, ``'hidden_states'`` (every layer;
            ``output_hidden_states`` is then requested), or None for the
            whole ``ModelOutput``.
        forward_kwargs (dict, optional): extra call arguments, e.g.
            ``dict(interpolate_pos_encoding=True)`` for HF ViT / CLIP.
        num_prefix_tokens (int, optional): leading non-patch tokens;
            inferred from the embeddings module when None.
    """

    def __init__(self, model: nn.Module,
                 output: str | None = 'last_hidden_state',
                 forward_kwargs: dict | None = None,
                 num_prefix_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.forward_kwargs = dict(forward_kwargs or {})
        if output == 'hidden_states':
            self.forward_kwargs.setdefault('output_hidden_states', True)
        if num_prefix_tokens is None:
            num_prefix_tokens = _hf_prefix_tokens(model)
        if num_prefix_tokens is not None:
            self.num_prefix_tokens = num_prefix_tokens

    def forward(self, pixel_values: Tensor) -> Any:
        """Run the HF model on pixels.

        Args:
            pixel_values (Tensor): ``(B, 3, H, W)`` normalised images.

        Returns:
            Any: ``output`` of the model's ``ModelOutput`` (e.g. ``(B, N, C)``
            tokens), or the whole ``ModelOutput``.
        """
        out = self.model(pixel_values=pixel_values, return_dict=True,
                         **self.forward_kwargs)
        if self.output is None:
            return out
        if self.output not in out:
            raise KeyError(f'HF teacher output {self.output!r} is not among '
                           f'{list(out.keys())}')
        return out[self.output]


@TEACHER_SOURCES.register_module(name='hf')
def build_hf_teacher(path: str,
                     output: str | None = 'last_hidden_state',
                     forward_kwargs: dict | None = None,
                     num_prefix_tokens: int | None = None,
                     model_kwargs: dict | None = None,
                     strict: bool = True) -> nn.Module:
    """Load ``transformers.AutoModel.from_pretrained(path,
    local_files_only=True)`` (never downloads).

    Args:
        path (str): local directory with ``config.json`` and the weights.
        output, forward_kwargs, num_prefix_tokens: see :class:`HFVisionModel`.
        model_kwargs (dict, optional): more ``from_pretrained`` arguments.
        strict (bool): raise if the weights miss keys, have unexpected keys
            or mismatched shapes (transformers would otherwise initialise
            the missing ones randomly). Defaults to True.

    Returns:
        nn.Module: :class:`HFVisionModel` around the loaded model, hook
        names prefixed with ``model.`` (e.g. ``'model.encoder.layer.11'``).
    """
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "the 'hf' teacher source needs HF transformers; install it "
            'with `pip install -r requirements/optional.txt` '
            '(transformers<=4.51.3: newer releases break mmdet imports)') \
            from None
    if not osp.isdir(osp.expanduser(path)):
        raise FileNotFoundError(f'HF teacher directory not found: {path}')
    model, info = transformers.AutoModel.from_pretrained(
        osp.expanduser(path), local_files_only=True, output_loading_info=True,
        **(model_kwargs or {}))
    problems = [
        f'{len(info[k])} {k.replace("_", " ")} ({first_keys(list(info[k]))})'
        for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')
        if info.get(k)
    ]
    if strict and problems:
        raise TeacherCheckpointError(
            f'HF teacher {path} does not match {type(model).__name__}: '
            + '; '.join(problems) + '. Set strict=False to load anyway.')
    return HFVisionModel(model.eval(), output, forward_kwargs,
                         num_prefix_tokens)
