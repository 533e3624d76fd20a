"""A tiny random CLIP (image and text towers) in open_clip's / OpenAI's
official state-dict layout, for the zero-shot tests and CPU examples.

The file is what ``open_clip_model.safetensors`` of the Hugging Face repo
``timm/vit_base_patch16_clip_224.openai`` holds at ViT-B/16 size (the same
keys: ``visual.*``, ``transformer.resblocks.*``, ``token_embedding``,
``text_projection``, ``logit_scale``, ...), at tiny sizes. timm reads its
image tower (``vit_base_patch16_clip_quickgelu_224`` with
:data:`TINY_CLIP_TIMM_KWARGS`, the text keys dropped), kiv's text tool its
text tower.
"""
from __future__ import annotations

import os.path as osp

import torch
from torch import nn

from kiv.fileio.teacher_cache_format import write_safetensors_atomic

__all__ = [
    'TINY_CLIP', 'TINY_CLIP_TIMM', 'tiny_open_clip', 'write_tiny_clip',
    'write_tiny_student_with_heads'
]

#: sizes of the tiny CLIP: joint width 32, image ViT 48 wide (patch 16, 64
#: px, 2 heads), text transformer 64 wide (1 head = 64 // 64, as OpenAI)
TINY_CLIP = dict(embed_dim=32, vision_width=48, vision_layers=2,
                 vision_head_width=24, patch_size=16, image_size=64,
                 text_width=64, text_layers=2, context_length=77)

#: the kiv teacher source reading the tiny file's image tower with timm,
#: the summary being the image projection (``head``), as the real recipe
TINY_CLIP_TIMM = dict(
    type='timm',
    model_name='vit_base_patch16_clip_quickgelu_224',
    model_kwargs=dict(img_size=TINY_CLIP['image_size'],
                      embed_dim=TINY_CLIP['vision_width'],
                      depth=TINY_CLIP['vision_layers'],
                      num_heads=TINY_CLIP['vision_width'] //
                      TINY_CLIP['vision_head_width'],
                      num_classes=TINY_CLIP['embed_dim']),
    # the file is the whole CLIP: timm's filter keeps the image tower
    drop_keys=[r'^(transformer|token_embedding|ln_final)\.',
               r'^(positional_embedding|text_projection|logit_scale)$'])


def tiny_open_clip(seed: int = 0) -> nn.Module:
    """open_clip's ``CLIP`` at :data:`TINY_CLIP` sizes, QuickGELU, random.

    Args:
        seed (int): random seed of the weights.

    Returns:
        nn.Module: the model in eval mode.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    c = TINY_CLIP
    torch.manual_seed(seed)
    model = CLIP(
        c['embed_dim'],
        CLIPVisionCfg(layers=c['vision_layers'], width=c['vision_width'],
                      head_width=c['vision_head_width'],
                      patch_size=c['patch_size'],
                      image_size=c['image_size']),
        CLIPTextCfg(context_length=c['context_length'], vocab_size=49408,
                    width=c['text_width'], heads=1,
                    layers=c['text_layers']),
        quick_gelu=True)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'ln' in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_tiny_clip(path: str, seed: int = 0) -> nn.Module:
    """Write :func:`tiny_open_clip`'s state dict as a safetensors file.

    Args:
        path (str): the file (``.safetensors``), written atomically.
        seed (int): random seed.

    Returns:
        nn.Module: the model written.
    """
    model = tiny_open_clip(seed)
    state = {k: v for k, v in model.state_dict().items()
             if k != 'attn_mask'}
    write_safetensors_atomic(state, path, dict(format='pt'))
    return model


def write_tiny_student_with_heads(path: str, teacher_dims: tuple = (48, 32),
                                  seed: int = 0) -> dict:
    """Write an exported tiny student (``configs/_base_/models/
    kiv_adapter-vit-t14-reg4.py``, random adapter) with ``inherited_heads``
    for a CLIP teacher like the real recipe's: summary = the image
    projection (``TINY_CLIP['embed_dim']``), dense levels ln_post tokens
    and text space (``teacher_dims``), both on the stride-16 level.

    The standardisers hold PHI-S statistics of random targets, so the
    inverse standardisation is not the identity.

    Args:
        path (str): the ``.pth`` file (the layout of
            ``tools/export_student.py --keep-heads``), written atomically.
        teacher_dims (tuple[int, int]): the CLIP teacher's dense widths.
        seed (int): random seed.

    Returns:
        dict: ``backbone`` (the student config), ``latent`` (the
        ``SharedLatentSpace``).
    """
    from mmengine.config import Config

    from kiv.models.backbones import AdapterViT
    from kiv.models.connectors import SharedLatentSpace
    from kiv.structures import FeatureOutput
    from kiv.utils.atomic import atomic_torch_save
    from .paths import REPO
    torch.manual_seed(seed)
    cfg = Config.fromfile(osp.join(REPO, 'configs', '_base_', 'models',
                                   'kiv_adapter-vit-t14-reg4.py'))
    backbone = cfg.kiv_student_t14.to_dict()
    backbone.pop('type')
    student = AdapterViT(**backbone)
    student.init_weights()
    width = backbone['base']['model_kwargs']['embed_dim']
    latent = SharedLatentSpace(
        width, [width] * 4, hidden_dim=16,
        teachers=dict(clip=dict(summary_dim=TINY_CLIP['embed_dim'],
                                feature_dims=list(teacher_dims),
                                student_levels=[2, 2])))
    latent.init_weights()
    targets = FeatureOutput(
        torch.randn(64, TINY_CLIP['embed_dim']) * 2 + 1,
        tuple(torch.randn(4, d, 4, 4) * 3 - 1 for d in teacher_dims))
    latent.load_statistics(latent.statistic_sums(dict(clip=targets)))
    atomic_torch_save(dict(state_dict=student.state_dict(),
                           meta=dict(arch='kiv.AdapterViT'),
                           inherited_heads=latent.state_dict()), path)
    return dict(backbone=backbone, latent=latent)
