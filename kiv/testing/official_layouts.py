"""Random weights in the layouts of the official teacher files.

The real-scale recipe
(``configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_8xb64-100k_in1k.py``)
loads four files as they are published (README, "Teacher weights"). The
writers here produce files with the same key names, shapes, dtypes and
nesting, filled with seeded random values, so that tests and docs can run
the real loading code without the real files. Only the number of
transformer blocks can be reduced (it changes no key name); everything else
(widths, position tables, extra entries) is the official one.

========  ===========================================  =====================
teacher   official file                                writer
========  ===========================================  =====================
DINOv2    ``dinov2_vitb14_reg4_pretrain.pth``          :func:`write_dinov2`
CLIP      ``model.safetensors`` of the Hugging Face    :func:`write_clip`
          repo ``timm/vit_base_patch16_clip_224.openai``
SAM       ``sam_vit_b_01ec64.pth``                     :func:`write_sam`
detector  ``mask_rcnn_r50_fpn_1x_coco_20200205-        :func:`write_mmdet`
          d4b0c5d6.pth``
========  ===========================================  =====================
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kiv.utils.atomic import atomic_path, atomic_torch_save

StateDict = dict[str, Tensor]
#: key -> shape of a layout
Shapes = dict[str, tuple[int, ...]]

__all__ = [
    'OfficialFile', 'OFFICIAL_FILES', 'dinov2_shapes', 'clip_shapes',
    'sam_shapes', 'random_state_dict', 'write_dinov2', 'write_clip',
    'write_sam', 'write_mmdet'
]


@dataclass(frozen=True)
class OfficialFile:
    """Where a teacher's weights come from and which layout they have.

    Attributes:
        filename (str): the name the recipe expects under
            ``checkpoints/teachers/``.
        source (str): download URL, or Hugging Face repo and file.
        layout (str): the key layout the file holds.
    """

    filename: str
    source: str
    layout: str


#: The files of the real-scale recipe's teachers (README's table).
OFFICIAL_FILES: dict[str, OfficialFile] = dict(
    dinov2=OfficialFile(
        'dinov2_vitb14_reg4_pretrain.pth',
        'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/'
        'dinov2_vitb14_reg4_pretrain.pth',
        'original facebookresearch/dinov2 keys (cls_token, pos_embed at '
        '518 px, register_tokens, mask_token, blocks.N.*)'),
    clip=OfficialFile(
        'vit_base_patch16_clip_quickgelu_224.openai.safetensors',
        'Hugging Face timm/vit_base_patch16_clip_224.openai, '
        'model.safetensors (renamed)',
        'timm keys, head.* = the 768 -> 512 image->text projection'),
    sam=OfficialFile(
        'sam_vit_b_01ec64.pth',
        'https://dl.fbaipublicfiles.com/segment_anything/'
        'sam_vit_b_01ec64.pth',
        'original segment-anything keys at 1024 px: image_encoder.* '
        '(neck included), prompt_encoder.*, mask_decoder.*'),
    detector=OfficialFile(
        'mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth',
        'https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/'
        'mask_rcnn_r50_fpn_1x_coco/'
        'mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth',
        'mmdet checkpoint: state_dict (backbone.*, neck.*, rpn_head.*, '
        'roi_head.*) + meta'),
)


def _vit_block_shapes(prefix: str, dim: int, mlp_ratio: float,
                      mlp_names: tuple[str, str]) -> Shapes:
    """A pre-norm ViT block: norm1, attn.qkv, attn.proj, norm2, MLP."""
    hidden = int(dim * mlp_ratio)
    fc1, fc2 = mlp_names
    return {
        f'{prefix}norm1.weight': (dim, ),
        f'{prefix}norm1.bias': (dim, ),
        f'{prefix}attn.qkv.weight': (3 * dim, dim),
        f'{prefix}attn.qkv.bias': (3 * dim, ),
        f'{prefix}attn.proj.weight': (dim, dim),
        f'{prefix}attn.proj.bias': (dim, ),
        f'{prefix}norm2.weight': (dim, ),
        f'{prefix}norm2.bias': (dim, ),
        f'{prefix}mlp.{fc1}.weight': (hidden, dim),
        f'{prefix}mlp.{fc1}.bias': (hidden, ),
        f'{prefix}mlp.{fc2}.weight': (dim, hidden),
        f'{prefix}mlp.{fc2}.bias': (dim, ),
    }


def dinov2_shapes(depth: int = 12, embed_dim: int = 768, patch_size: int = 14,
                  img_size: int = 518, num_register_tokens: int = 4,
                  mlp_ratio: float = 4.0) -> Shapes:
    """Keys of facebookresearch/dinov2's ``dinov2_vit*14_reg4_pretrain.pth``.

    Defaults: ViT-B/14 with 4 registers. Position embeddings for the
    518-px pretraining grid (37 x 37) plus the CLS token; the unused iBOT
    ``mask_token`` is in the file; LayerScale ``ls1/ls2.gamma`` per block.

    Args:
        depth (int): blocks ``blocks.0`` .. ``blocks.{depth-1}``.
        embed_dim (int): token width.
        patch_size (int): patch side.
        img_size (int): pretraining image side.
        num_register_tokens (int): register tokens.
        mlp_ratio (float): MLP hidden width / ``embed_dim``.

    Returns:
        dict[str, tuple[int, ...]]: key -> shape, in file order.
    """
    grid = img_size // patch_size
    shapes: Shapes = {
        'cls_token': (1, 1, embed_dim),
        'pos_embed': (1, grid * grid + 1, embed_dim),
        'register_tokens': (1, num_register_tokens, embed_dim),
        'mask_token': (1, embed_dim),
        'patch_embed.proj.weight': (embed_dim, 3, patch_size, patch_size),
        'patch_embed.proj.bias': (embed_dim, ),
    }
    for i in range(depth):
        block = _vit_block_shapes(f'blocks.{i}.', embed_dim, mlp_ratio,
                                  ('fc1', 'fc2'))
        for key, shape in block.items():
            shapes[key] = shape
            if key.endswith('attn.proj.bias'):
                shapes[f'blocks.{i}.ls1.gamma'] = (embed_dim, )
        shapes[f'blocks.{i}.ls2.gamma'] = (embed_dim, )
    shapes['norm.weight'] = (embed_dim, )
    shapes['norm.bias'] = (embed_dim, )
    return shapes


def clip_shapes(depth: int = 12, embed_dim: int = 768, patch_size: int = 16,
                img_size: int = 224, proj_dim: int = 512,
                mlp_ratio: float = 4.0) -> Shapes:
    """Keys of timm's OpenAI CLIP image tower file (Hugging Face
    ``timm/vit_base_patch16_clip_224.openai``, ``model.safetensors``).

    timm's layout of OpenAI's ViT-B/16: a bias-free patch embedding, the
    pre-norm ``norm_pre``, and ``head.weight`` / ``head.bias`` holding
    OpenAI's image->text projection ``visual.proj`` (``(512, 768)``; timm
    stores a zero bias).

    Args:
        depth (int): blocks.
        embed_dim (int): token width.
        patch_size (int): patch side.
        img_size (int): image side of ``pos_embed``.
        proj_dim (int): width of the joint image-text space.
        mlp_ratio (float): MLP hidden width / ``embed_dim``.

    Returns:
        dict[str, tuple[int, ...]]: key -> shape, in file order.
    """
    grid = img_size // patch_size
    shapes: Shapes = {
        'cls_token': (1, 1, embed_dim),
        'pos_embed': (1, grid * grid + 1, embed_dim),
        'patch_embed.proj.weight': (embed_dim, 3, patch_size, patch_size),
        'norm_pre.weight': (embed_dim, ),
        'norm_pre.bias': (embed_dim, ),
    }
    for i in range(depth):
        shapes.update(_vit_block_shapes(f'blocks.{i}.', embed_dim, mlp_ratio,
                                        ('fc1', 'fc2')))
    shapes.update({
        'norm.weight': (embed_dim, ),
        'norm.bias': (embed_dim, ),
        'head.weight': (proj_dim, embed_dim),
        'head.bias': (proj_dim, ),
    })
    return shapes


def _sam_attention_shapes(prefix: str, dim: int, internal: int) -> Shapes:
    """segment-anything's two-way-transformer ``Attention``."""
    return {
        f'{prefix}q_proj.weight': (internal, dim),
        f'{prefix}q_proj.bias': (internal, ),
        f'{prefix}k_proj.weight': (internal, dim),
        f'{prefix}k_proj.bias': (internal, ),
        f'{prefix}v_proj.weight': (internal, dim),
        f'{prefix}v_proj.bias': (internal, ),
        f'{prefix}out_proj.weight': (dim, internal),
        f'{prefix}out_proj.bias': (dim, ),
    }


def _sam_mlp_shapes(prefix: str, dims: Sequence[int]) -> Shapes:
    """segment-anything's ``MLP``: ``layers.i`` Linear(dims[i], dims[i+1])."""
    shapes: Shapes = {}
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        shapes[f'{prefix}layers.{i}.weight'] = (n_out, n_in)
        shapes[f'{prefix}layers.{i}.bias'] = (n_out, )
    return shapes


def sam_prompt_decoder_shapes(prompt_dim: int = 256, mask_in_chans: int = 16,
                              decoder_depth: int = 2, mlp_dim: int = 2048,
                              num_mask_tokens: int = 4) -> Shapes:
    """Keys of SAM's ``prompt_encoder.*`` and ``mask_decoder.*``.

    The parts of a SAM file outside the image encoder (they never depend on
    the image encoder's depth).

    Returns:
        dict[str, tuple[int, ...]]: key -> shape, in file order.
    """
    d = prompt_dim
    p = 'prompt_encoder.'
    shapes: Shapes = {
        f'{p}pe_layer.positional_encoding_gaussian_matrix': (2, d // 2)}
    for i in range(4):
        shapes[f'{p}point_embeddings.{i}.weight'] = (1, d)
    shapes[f'{p}not_a_point_embed.weight'] = (1, d)
    c4, c = mask_in_chans // 4, mask_in_chans
    shapes.update({
        f'{p}mask_downscaling.0.weight': (c4, 1, 2, 2),
        f'{p}mask_downscaling.0.bias': (c4, ),
        f'{p}mask_downscaling.1.weight': (c4, ),
        f'{p}mask_downscaling.1.bias': (c4, ),
        f'{p}mask_downscaling.3.weight': (c, c4, 2, 2),
        f'{p}mask_downscaling.3.bias': (c, ),
        f'{p}mask_downscaling.4.weight': (c, ),
        f'{p}mask_downscaling.4.bias': (c, ),
        f'{p}mask_downscaling.6.weight': (d, c, 1, 1),
        f'{p}mask_downscaling.6.bias': (d, ),
        f'{p}no_mask_embed.weight': (1, d),
    })
    m = 'mask_decoder.'
    for i in range(decoder_depth):
        layer = f'{m}transformer.layers.{i}.'
        shapes.update(_sam_attention_shapes(f'{layer}self_attn.', d, d))
        shapes[f'{layer}norm1.weight'] = shapes[f'{layer}norm1.bias'] = (d, )
        shapes.update(_sam_attention_shapes(
            f'{layer}cross_attn_token_to_image.', d, d // 2))
        shapes[f'{layer}norm2.weight'] = shapes[f'{layer}norm2.bias'] = (d, )
        shapes.update({
            f'{layer}mlp.lin1.weight': (mlp_dim, d),
            f'{layer}mlp.lin1.bias': (mlp_dim, ),
            f'{layer}mlp.lin2.weight': (d, mlp_dim),
            f'{layer}mlp.lin2.bias': (d, ),
        })
        shapes[f'{layer}norm3.weight'] = shapes[f'{layer}norm3.bias'] = (d, )
        shapes[f'{layer}norm4.weight'] = shapes[f'{layer}norm4.bias'] = (d, )
        shapes.update(_sam_attention_shapes(
            f'{layer}cross_attn_image_to_token.', d, d // 2))
    shapes.update(_sam_attention_shapes(
        f'{m}transformer.final_attn_token_to_image.', d, d // 2))
    shapes[f'{m}transformer.norm_final_attn.weight'] = (d, )
    shapes[f'{m}transformer.norm_final_attn.bias'] = (d, )
    shapes[f'{m}iou_token.weight'] = (1, d)
    shapes[f'{m}mask_tokens.weight'] = (num_mask_tokens, d)
    shapes.update({
        f'{m}output_upscaling.0.weight': (d, d // 4, 2, 2),
        f'{m}output_upscaling.0.bias': (d // 4, ),
        f'{m}output_upscaling.1.weight': (d // 4, ),
        f'{m}output_upscaling.1.bias': (d // 4, ),
        f'{m}output_upscaling.3.weight': (d // 4, d // 8, 2, 2),
        f'{m}output_upscaling.3.bias': (d // 8, ),
    })
    for i in range(num_mask_tokens):
        shapes.update(_sam_mlp_shapes(
            f'{m}output_hypernetworks_mlps.{i}.', (d, d, d, d // 8)))
    shapes.update(_sam_mlp_shapes(f'{m}iou_prediction_head.',
                                  (d, 256, 256, num_mask_tokens)))
    return shapes


def sam_shapes(depth: int = 12,
               global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
               embed_dim: int = 768, num_heads: int = 12,
               patch_size: int = 16, img_size: int = 1024,
               window_size: int = 14, out_chans: int = 256,
               mlp_ratio: float = 4.0) -> Shapes:
    """Keys of segment-anything's ``sam_vit_b_01ec64.pth`` (the whole SAM).

    ``image_encoder.*``: NHWC ``pos_embed`` for the 1024-px grid (64 x 64),
    blocks whose attention holds relative position tables
    ``rel_pos_h/w`` of ``2 * S - 1`` rows (``S`` = 14, the window, in
    windowed blocks; 64, the grid, in the global blocks
    ``global_attn_indexes``), MLPs named ``lin1/lin2`` and the conv
    ``neck`` (768 -> 256). Then ``prompt_encoder.*`` and ``mask_decoder.*``
    (:func:`sam_prompt_decoder_shapes`).

    Args:
        depth (int): image-encoder blocks.
        global_attn_indexes (Sequence[int]): blocks with global attention.
        embed_dim (int): token width.
        num_heads (int): attention heads (``rel_pos`` width is
            ``embed_dim // num_heads``).
        patch_size (int): patch side.
        img_size (int): image side (1024).
        window_size (int): window side of the other blocks.
        out_chans (int): neck width, also the prompt width.
        mlp_ratio (float): MLP hidden width / ``embed_dim``.

    Returns:
        dict[str, tuple[int, ...]]: key -> shape, in file order.
    """
    grid = img_size // patch_size
    head_dim = embed_dim // num_heads
    e = 'image_encoder.'
    shapes: Shapes = {
        f'{e}pos_embed': (1, grid, grid, embed_dim),
        f'{e}patch_embed.proj.weight': (embed_dim, 3, patch_size,
                                        patch_size),
        f'{e}patch_embed.proj.bias': (embed_dim, ),
    }
    for i in range(depth):
        side = grid if i in global_attn_indexes else window_size
        for key, shape in _vit_block_shapes(f'{e}blocks.{i}.', embed_dim,
                                            mlp_ratio,
                                            ('lin1', 'lin2')).items():
            shapes[key] = shape
            if key.endswith('attn.proj.bias'):
                shapes[f'{e}blocks.{i}.attn.rel_pos_h'] = (2 * side - 1,
                                                           head_dim)
                shapes[f'{e}blocks.{i}.attn.rel_pos_w'] = (2 * side - 1,
                                                           head_dim)
    shapes.update({
        f'{e}neck.0.weight': (out_chans, embed_dim, 1, 1),
        f'{e}neck.1.weight': (out_chans, ),
        f'{e}neck.1.bias': (out_chans, ),
        f'{e}neck.2.weight': (out_chans, out_chans, 3, 3),
        f'{e}neck.3.weight': (out_chans, ),
        f'{e}neck.3.bias': (out_chans, ),
    })
    shapes.update(sam_prompt_decoder_shapes(prompt_dim=out_chans))
    return shapes


def random_state_dict(shapes: Shapes, seed: int = 0,
                      std: float = 0.02) -> StateDict:
    """Seeded float32 ``N(0, std^2)`` tensors of the given shapes.

    Args:
        shapes (dict[str, tuple[int, ...]]): key -> shape.
        seed (int): seed of a private generator (the global RNG is not
            touched).
        std (float): standard deviation. Defaults to 0.02.

    Returns:
        dict[str, Tensor]: key -> contiguous tensor, in the order of
        ``shapes``.
    """
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=gen) * std
        for key, shape in shapes.items()
    }


def _save_torch(obj: object, path: str, legacy: bool = False) -> None:
    """``torch.save`` through a temporary file (no half-written files)."""
    atomic_torch_save(obj, path, _use_new_zipfile_serialization=not legacy)


def write_dinov2(path: str, depth: int = 12, seed: int = 0) -> StateDict:
    """Write ``dinov2_vitb14_reg4_pretrain.pth``'s layout: a plain state
    dict (no wrapper entry) saved by ``torch.save``.

    Args:
        path (str): output file.
        depth (int): blocks (12 in the official file).
        seed (int): random seed.

    Returns:
        dict[str, Tensor]: what was written.
    """
    state_dict = random_state_dict(dinov2_shapes(depth=depth), seed)
    _save_torch(state_dict, path)
    return state_dict


def write_clip(path: str, depth: int = 12, seed: int = 0) -> StateDict:
    """Write the layout of timm's OpenAI CLIP ViT-B/16 ``model.safetensors``
    (metadata ``{'format': 'pt'}``), with a zero ``head.bias`` as in the
    real file.

    Args:
        path (str): output ``.safetensors`` file.
        depth (int): blocks (12 in the official file).
        seed (int): random seed.

    Returns:
        dict[str, Tensor]: what was written.
    """
    from safetensors.torch import save_file
    state_dict = random_state_dict(clip_shapes(depth=depth), seed)
    state_dict['head.bias'].zero_()
    with atomic_path(path) as tmp:
        save_file(state_dict, tmp, metadata={'format': 'pt'})
    return state_dict


def write_sam(path: str, depth: int = 12,
              global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
              seed: int = 0) -> StateDict:
    """Write ``sam_vit_b_01ec64.pth``'s layout: the whole SAM's plain state
    dict (image encoder, prompt encoder, mask decoder).

    Args:
        path (str): output file.
        depth (int): image-encoder blocks (12 in the official file).
        global_attn_indexes (Sequence[int]): global-attention blocks
            (``(2, 5, 8, 11)`` in the official file); pass the same to the
            model (``model_kwargs``) when reducing ``depth``.
        seed (int): random seed.

    Returns:
        dict[str, Tensor]: what was written.
    """
    state_dict = random_state_dict(
        sam_shapes(depth=depth, global_attn_indexes=global_attn_indexes),
        seed)
    _save_torch(state_dict, path)
    return state_dict


#: ``meta`` in the form mmdet 2.x's runner wrote it (plain Python values).
MMDET_META = dict(
    mmdet_version='2.0.0',
    mmcv_version='0.5.1',
    epoch=12,
    iter=87960,
    time='Wed Feb  5 00:00:00 2020',
)


def write_mmdet(path: str,
                config: str = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                seed: int = 0) -> StateDict:
    """Write an mmdet model-zoo checkpoint:
    ``{'meta': {...}, 'state_dict': {...}}``.

    The state dict has the keys and shapes of the whole detector built from
    ``config`` (mmdet 3.x loads the 2.x model-zoo Mask R-CNN file as it is,
    so they are the file's). Float entries are random, BatchNorm
    ``running_var`` positive, ``num_batches_tracked`` kept as int64. The
    ``meta`` holds versions, the epoch, the config text and the class names,
    like the real file. Saved in torch's legacy (pre-1.6, non-zip) format,
    the format of the 2020 file.

    Args:
        path (str): output file.
        config (str): the detector's config, ``'mmdet::...'`` or a path.
        seed (int): random seed.

    Returns:
        dict[str, Tensor]: the state dict written.
    """
    import mmdet.models  # noqa: F401  registers mmdet's modules
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.registry import DefaultScope
    cfg = get_config(config) if '::' in config else Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    gen = torch.Generator().manual_seed(seed)
    state_dict: StateDict = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state_dict[key] = value.clone()
        elif key.endswith('running_var'):
            state_dict[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state_dict[key] = torch.randn(value.shape, generator=gen) * 0.02
    from mmdet.datasets import CocoDataset
    meta = dict(MMDET_META, config=cfg.pretty_text,
                CLASSES=tuple(CocoDataset.METAINFO['classes']))
    _save_torch({'meta': meta, 'state_dict': state_dict}, path, legacy=True)
    return state_dict
