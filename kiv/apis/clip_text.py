"""CLIP's text tower from a local file, and class embeddings with prompt
ensembles (the side of ``tools/misc/text_embeddings.py``).

The tower is built with ``open_clip`` (``open_clip_torch``, what RADIO and
OpenCLIP users have; its BPE vocabulary ships in the wheel, so nothing is
downloaded) from one of these official layouts:

* **open_clip / OpenAI state dict** (``.safetensors`` / ``.bin`` / ``.pth``,
  read weights-only): keys ``token_embedding.weight``,
  ``positional_embedding``, ``transformer.resblocks.N.*``, ``ln_final.*``,
  ``text_projection`` (``visual.*`` and ``logit_scale`` beside them), e.g.
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` of the
  Hugging Face repo ``timm/vit_base_patch16_clip_224.openai``;
* **OpenAI's TorchScript archive** ``ViT-B-16.pt``: read with
  ``torch.jit.load`` (TorchScript deserialisation, not Python pickle), of
  which only ``state_dict()`` is used;
* **Hugging Face ``CLIPModel`` directory** (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``, e.g.
  ``openai/clip-vit-base-patch16``): its ``text_model.*`` and
  ``text_projection`` keys are renamed to open_clip's (no ``transformers``
  needed).

The architecture is read off the weights (width, layers, context length,
vocabulary, projection width); heads are ``width // 64`` as in OpenAI's
models (HF: ``num_attention_heads``) and the activation is QuickGELU, which
OpenAI's weights were trained with (``act='gelu'`` for LAION-trained
open_clip towers; HF: ``hidden_act``).
"""
from __future__ import annotations

import json
import os.path as osp
import re
import zipfile
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiv.fileio.text_embeddings import save_text_embeddings
from kiv.utils.state_dict import StateDictError, first_keys, read_state_dict

__all__ = [
    'ClipTextTowerError', 'read_clip_state_dict', 'hf_to_open_clip',
    'build_text_tower', 'encode_classes', 'write_text_embeddings'
]

_TEXT_KEYS = ('token_embedding.weight', 'positional_embedding',
              'ln_final.weight', 'text_projection')
_HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
_ACTS = ('quick_gelu', 'gelu')


class ClipTextTowerError(ValueError):
    """A CLIP file that cannot give a text tower (named in the message)."""


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's ``.pt``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.search(r'(^|/)(constants\.pkl|code/)', name)
                   for name in archive.namelist())


def hf_to_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face ``CLIPModel`` text tower to open_clip's keys.

    Args:
        state_dict (dict[str, Tensor]): HF keys (``text_model.*``,
            ``text_projection.weight``); other keys are ignored.

    Returns:
        dict[str, Tensor]: open_clip keys of the text tower (q/k/v fused into
        ``in_proj_*``, ``text_projection`` transposed to ``(width, dim)``).
    """
    out = {
        'token_embedding.weight':
        state_dict['text_model.embeddings.token_embedding.weight'],
        'positional_embedding':
        state_dict['text_model.embeddings.position_embedding.weight'],
        'ln_final.weight': state_dict['text_model.final_layer_norm.weight'],
        'ln_final.bias': state_dict['text_model.final_layer_norm.bias'],
        'text_projection': state_dict['text_projection.weight'].t(),
    }
    layers = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(r'text_model\.encoder\.layers\.(\d+)\.',
                                       k))})
    pairs = (('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'),
             ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj'),
             ('self_attn.out_proj', 'attn.out_proj'))
    for i in layers:
        src = f'text_model.encoder.layers.{i}.'
        dst = f'transformer.resblocks.{i}.'
        for hf, oc in pairs:
            for kind in ('weight', 'bias'):
                out[f'{dst}{oc}.{kind}'] = state_dict[f'{src}{hf}.{kind}']
        for kind in ('weight', 'bias'):
            out[f'{dst}attn.in_proj_{kind}'] = torch.cat([
                state_dict[f'{src}self_attn.{p}_proj.{kind}']
                for p in 'qkv'
            ])
    return out


def read_clip_state_dict(path: str) -> tuple[dict[str, Tensor], dict]:
    """Read a CLIP file in one of the official layouts (module doc).

    Args:
        path (str): a file or a Hugging Face ``CLIPModel`` directory.

    Returns:
        tuple[dict[str, Tensor], dict]: open_clip-layout weights (text tower,
        plus ``visual.proj`` if the file has an image projection) and the
        settings the file states (``heads``, ``act``, ``layout``).

    Raises:
        ClipTextTowerError: missing file, unknown layout or no text tower.
    """
    settings: dict = {}
    if osp.isdir(path):
        weights = [osp.join(path, n) for n in _HF_WEIGHTS
                   if osp.isfile(osp.join(path, n))]
        config = osp.join(path, 'config.json')
        if not weights or not osp.isfile(config):
            raise ClipTextTowerError(
                f'{path} is a directory but not a Hugging Face CLIPModel '
                f'directory (needs config.json and one of {_HF_WEIGHTS})')
        with open(config, encoding='utf-8') as f:
            text_cfg = json.load(f).get('text_config', {})
        settings.update(layout='Hugging Face CLIPModel directory',
                        heads=text_cfg.get('num_attention_heads'),
                        act=text_cfg.get('hidden_act'))
        path = weights[0]
    elif not osp.isfile(path):
        raise ClipTextTowerError(f'CLIP file not found: {path} (--tower)')
    if _is_torchscript(path):
        state = torch.jit.load(path, map_location='cpu').state_dict()
        settings.setdefault('layout', 'OpenAI TorchScript archive')
    else:
        try:
            state = read_state_dict(path)
        except (StateDictError, RuntimeError) as err:
            raise ClipTextTowerError(f'{path}: not a readable weights file '
                                     f'({err})') from err
    if 'text_model.embeddings.token_embedding.weight' in state:
        converted = hf_to_open_clip(state)
        if 'visual_projection.weight' in state:
            converted['visual.proj'] = state['visual_projection.weight'].t()
        settings.setdefault('layout', 'Hugging Face CLIPModel keys')
        return converted, settings
    missing = [k for k in _TEXT_KEYS if k not in state]
    if missing:
        raise ClipTextTowerError(
            f'{path} holds no CLIP text tower in the open_clip/OpenAI or '
            f'Hugging Face layout: missing {missing}; its keys are '
            f'{first_keys(sorted(state))}')
    settings.setdefault('layout', 'open_clip/OpenAI state dict')
    keep = re.compile(r'^(token_embedding|positional_embedding|transformer\.|'
                      r'ln_final|text_projection|visual\.proj$)')
    return {k: v for k, v in state.items() if keep.match(k)}, settings


def build_text_tower(state_dict: dict[str, Tensor],
                     heads: Optional[int] = None,
                     act: str = 'quick_gelu') -> nn.Module:
    """open_clip's ``TextTransformer`` with the weights loaded strictly.

    Args:
        state_dict (dict[str, Tensor]): open_clip-layout text weights (from
            :func:`read_clip_state_dict`).
        heads (int, optional): attention heads. Defaults to
            ``width // 64`` (OpenAI's rule).
        act (str): ``'quick_gelu'`` (OpenAI weights) or ``'gelu'``.

    Returns:
        nn.Module: the tower in eval mode; ``tower(tokens)`` gives
        ``(B, embed_dim)`` projected text features.
    """
    from open_clip.model import CLIPTextCfg, _build_text_tower
    if act not in _ACTS:
        raise ClipTextTowerError(f'act={act!r} is not one of {list(_ACTS)}')
    width = state_dict['ln_final.weight'].shape[0]
    layers = len({k.split('.')[2] for k in state_dict
                  if k.startswith('transformer.resblocks.')})
    cfg = CLIPTextCfg(
        context_length=state_dict['positional_embedding'].shape[0],
        vocab_size=state_dict['token_embedding.weight'].shape[0],
        width=width, heads=heads or max(width // 64, 1), layers=layers)
    embed_dim = state_dict['text_projection'].shape[1]
    tower = _build_text_tower(embed_dim, cfg, quick_gelu=act == 'quick_gelu')
    text = {k: v for k, v in state_dict.items() if not k.startswith('visual')}
    tower.load_state_dict(text, strict=True)
    return tower.eval()


@torch.no_grad()
def encode_classes(tower: nn.Module, tokenizer, classes: Sequence[str],
                   templates: Sequence[str],
                   batch_size: int = 256) -> Tensor:
    """CLIP's prompt ensemble: per class, the normalised mean of the
    normalised embeddings of its prompts.

    Args:
        tower (nn.Module): from :func:`build_text_tower`.
        tokenizer: open_clip tokenizer (``tokenizer(list[str])`` ->
            ``(N, context_length)`` token ids).
        classes (Sequence[str]): class names.
        templates (Sequence[str]): prompts with ``'{}'`` for the name.
        batch_size (int): prompts per forward pass.

    Returns:
        Tensor: ``(len(classes), embed_dim)`` float32 unit rows.
    """
    rows = []
    for name in classes:
        prompts = [t.format(name) for t in templates]
        feats = torch.cat([
            tower(tokenizer(prompts[i:i + batch_size]))
            for i in range(0, len(prompts), batch_size)
        ])
        rows.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1))
    return torch.stack(rows).float()


def write_text_embeddings(tower_path: str, out: str, classes: Sequence[str],
                          templates: Sequence[str],
                          width: Optional[int] = None,
                          act: Optional[str] = None,
                          heads: Optional[int] = None) -> dict:
    """Read a CLIP text tower and write a text-embedding file.

    Args:
        tower_path (str): a CLIP file or HF directory (module doc).
        out (str): the ``.safetensors`` file to write (atomically).
        classes (Sequence[str]): class names, in label order.
        templates (Sequence[str]): prompt templates.
        width (int, optional): the expected embedding width (the CLIP
            teacher's summary width, 512 for ViT-B/16); another width stops.
        act (str, optional): ``'quick_gelu'`` / ``'gelu'``; defaults to
            the HF config's ``hidden_act`` or QuickGELU.
        heads (int, optional): attention heads; defaults to the HF config's
            or ``width // 64``.

    Returns:
        dict: ``tower`` (description), ``width``, ``classes`` (count).

    Raises:
        ClipTextTowerError: see :func:`read_clip_state_dict`, or the
            tower's width is not ``width``.
    """
    import open_clip
    state, settings = read_clip_state_dict(tower_path)
    dim = state['text_projection'].shape[1]
    if width is not None and dim != width:
        raise ClipTextTowerError(
            f'{tower_path}: the text tower embeds to width {dim}, not '
            f'--width {width} (the CLIP teacher\'s summary width); use the '
            'CLIP file of the distilled teacher')
    act = act or settings.get('act') or 'quick_gelu'
    tower = build_text_tower(state, heads=heads or settings.get('heads'),
                             act=act)
    tokenizer = open_clip.SimpleTokenizer(
        context_length=tower.context_length)
    embeddings = encode_classes(tower, tokenizer, classes, templates)
    description = (
        f'{osp.basename(osp.normpath(tower_path))} ({settings["layout"]}): '
        f'open_clip {open_clip.__version__} TextTransformer width '
        f'{tower.width}, {len(tower.transformer.resblocks)} layers, '
        f'context {tower.context_length}, {act}')
    save_text_embeddings(out, embeddings, classes, templates, description,
                         state.get('visual.proj'))
    return dict(tower=description, width=dim, classes=len(classes))
