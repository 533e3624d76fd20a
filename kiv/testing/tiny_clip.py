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

import torch
from torch import nn

from kiv.fileio.teacher_cache_format import write_safetensors_atomic

__all__ = ['TINY_CLIP', 'TINY_CLIP_TIMM', 'tiny_open_clip', 'write_tiny_clip']

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
