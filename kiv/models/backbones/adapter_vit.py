"""``kiv.AdapterViT``: the student backbone of knowledge inheritance.

Knowledge preservation: the student is the general-purpose teacher's ViT
(DINOv2 ViT-B/14 with 4 registers in the real recipe) with its weights,
frozen; a trainable ViT-Adapter (see :mod:`.adapter_modules`) learns the
purpose-specific teachers' knowledge and turns the single-scale ViT into a
4-level pyramid plus a global vector. All injections are scaled by
zero-initialised ``gamma`` s, so at initialisation the ViT token stream, and
therefore the summary, are exactly the base model's; the adapter's maps
enter the pyramid through zero-initialised gates too, so at initialisation
every pyramid level is the base's normalised tokens of its stage.

Any input size works: images are zero-padded inside to the patch multiple
and the pyramid is cropped back to the ResNet sizes ``ceil(H / s)``.

One class serves the distiller (:meth:`AdapterViT.forward_features`) and, by
``type='kiv.AdapterViT'``, mmpretrain, mmdet and mmseg configs
(:meth:`AdapterViT.forward`).
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.ops import MultiScaleDeformableAttention
from mmengine.model import BaseModule
from mmengine.model.weight_init import (constant_init, normal_init,
                                        trunc_normal_init)
from timm.layers import AttentionPoolLatent
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from ..layers.backbone_io import (check_images, check_outputs, crop_to,
                                  pad_to_patch_multiple,
                                  pretrained_to_init_cfg, pyramid_sizes)
from .adapter_modules import (GlobalToken, InteractionBlock,
                              SpatialPriorModule, TokenNorm,
                              make_deform_inputs, tokens_to_maps)
from .base_vit import BaseViT, build_base_vit

__all__ = ['AdapterViT']


class _Interaction(NamedTuple):
    """What :meth:`AdapterViT._interact` computes once per forward."""
    #: ``(B, P + N_p, C)`` tokens after the last base block (no final norm)
    tokens: Tensor
    #: per interaction stage, the patch tokens ``(B, N_p, C)``
    stage_tokens: list[Tensor]
    #: adapter tokens ``c2..c4`` flattened, ``(B, N_c, C)``
    c: Tensor
    #: stride-4 spatial-prior map ``(B, C, h1, w1)`` of the padded input
    c1: Tensor
    #: ``(h, w)`` of ``c2..c4`` (padded input)
    level_shapes: list[tuple[int, int]]
    #: patch grid ``(H_pad / p, W_pad / p)``
    grid: tuple[int, int]
    #: the input size ``(H, W)`` before padding
    image_size: tuple[int, int]


@MODELS.register_module()
class AdapterViT(BaseModule):
    """Frozen base ViT + zero-initialised ViT-Adapter.

    Data flow for images ``(B, 3, H, W)`` of any size, ``p`` = patch size,
    ``C`` = base width:

    0. padding: the images are zero-padded at the bottom and right to
       ``H_p = ceil(H / p) * p``, ``W_p = ceil(W / p) * p`` (see
       "Input sizes" below);
    1. spatial prior ``c1..c4`` of the padded images (strides 4/8/16/32,
       ``C`` channels); ``c2..c4`` (+ a learnable level embedding) are
       flattened into the adapter tokens ``c``;
    2. base ``embed``: prefix tokens + patch tokens on the ``H_p/p x W_p/p``
       grid with interpolated position embeddings;
    3. per interaction block: injector (``c`` -> patch tokens, scaled by
       ``gamma``), the block's group of base blocks, extractor(s) (patch
       tokens -> ``c``);
    4. pyramid: ``c2..c4`` back to maps, ``a1 = c1 + up(c2)``, ``a_l = c_l``
       otherwise (the adapter maps); with ``add_vit_feature`` level ``l`` is
       ``resize(LN_l(stage-l patch tokens)) + g_l * a_l`` (``g_l`` the
       per-channel pyramid gate); each level is cropped to the ResNet size
       ``(ceil(H / s), ceil(W / s))`` and goes through its output norm;
    5. summary: the base CLS token after the base's final norm (mean patch
       token if the base has no CLS token) plus, with
       ``with_global_token``, ``gamma * GlobalToken(...)``: a learnable
       latent token attending over the final base tokens and ``c`` (see
       :class:`.GlobalToken`; it is not appended to the ViT stream, which
       would change what the frozen base computes). With ``summary_names``
       there is one such token per name (per teacher), each with its own
       latent query, attention, MLP and ``gamma``: ``summary_t = base_CLS +
       gamma_t * GlobalToken_t(...)``.

    Per-teacher summaries (``summary_names``): with one summary vector,
    every teacher's summary head reads the same vector and the knowledge
    base's preserved head pins it to the base CLS token, so the other
    teachers' summaries compete with it (RADIO keeps a summary token per
    teacher for this reason, ``cls_token_per_teacher``). RADIO appends its
    tokens to the ViT stream; here the base ViT is frozen and must compute
    exactly what the knowledge base computes, so each teacher gets its own
    attention pool over the final tokens instead: it reads everything the
    stream and the adapter know, but nothing in the stream reads it. At
    step 0 (``gamma_t = 0``) every summary is exactly the base's CLS token;
    the knowledge base's own summary stays its CLS token until training
    opens its gate, while the others move freely. The extra cost is one
    latent-query attention pool per name (keys folded into the query, see
    :func:`~kiv.models.layers.attention_pool.latent_attention_pool`).

    Knowledge preservation at initialisation (step 0):

    - token stream and summary: the injector and global-token ``gamma`` s
      start at ``init_values`` = 0, so the base tokens and the summary are
      exactly the bare base ViT's (on the same padded input);
    - pyramid: the gates ``g_l`` start at ``pyramid_init_values`` = 0, so
      level ``l`` is ``out_norm_l(resize(LN_l(stage-l tokens)))``: a
      content-preserving function of the base's tokens of its stage (LN
      with weight 1 / bias 0, bilinear resizing, and the output norm, at
      initialisation a per-channel affine map). Neither the randomly
      initialised spatial prior nor the extractors can dominate a level
      before training has opened its gate (ViT-Adapter adds them at full
      strength; its stride-4 level then is mostly a random 2x2 transposed
      convolution of ``c2``, a checkerboard that is nearly the same for
      every image). The gates get gradients from step 0 on, the adapter
      behind them from step 1 on, as any zero-initialised residual branch.
    - ``up`` (2x2, stride 2 transposed conv) starts as nearest-neighbour
      up-sampling of ``c2`` (per-channel identity kernel, zero bias), so
      once the gate opens the stride-4 adapter map is ``c1`` plus a smooth
      copy of ``c2``, not a random sub-pixel pattern.

    Input sizes: any ``H x W``. The zero padding is 0 after normalisation,
    the value the toolboxes' data preprocessors pad batches with, so the
    result equals running on images padded by the data preprocessor to a
    multiple of ``p`` and cropping (tested exactly). The pyramid maps have
    the ResNet sizes ``(ceil(H / s), ceil(W / s))`` (strides 4/8/16/32):
    positions that exist only because of the internal padding are cropped
    off before the output norms, so the heads never see them and they take
    no part in the output norms' batch statistics. What padding does
    influence, as in every padded CNN or ViT backbone (timm's
    ``dynamic_img_pad``, ViTDet, ViT-Adapter): the pad pixels are part of
    the border patches and of the spatial prior's receptive fields, and
    self-attention lets every token see the pad tokens. Attention is not
    masked on purpose: a mask would make the frozen base compute something
    else than the base ViT on the padded image, and a base token stream
    that is exactly the base's is the knowledge-preservation guarantee.

    Stages for ``frozen_stages`` (``N = len(interaction_indexes)``):
    stage 0 = spatial prior module + level embedding; stage ``i`` in
    ``1..N`` = interaction block ``i``; stage ``N + 1`` = output layers
    (``up``, pyramid gates, per-stage token norms, output norms, global
    token). ``frozen_stages=k`` freezes stages ``0..k`` (parameters without
    grad, modules in eval mode); ``-1`` freezes none, ``N + 1`` (or
    :attr:`num_stages` - 1) freezes the whole adapter (linear probing).

    Args:
        base (dict): the base ViT. ``dict(type='timm', model_name=...,
            checkpoint=None, model_kwargs=dict(...))`` or
            ``dict(type='mmpretrain', arch=..., patch_size=...,
            checkpoint=None, **VisionTransformer kwargs)``; see
            :class:`~kiv.models.backbones.base_vit.TimmBaseViT` and
            :class:`~kiv.models.backbones.base_vit.MMPretrainBaseViT`.
            ``checkpoint`` is loaded strictly at construction.
        interaction_indexes (Sequence[Sequence[int]]): ``[start, end]``
            (inclusive) base block ranges of the interaction blocks; must
            tile ``0..depth-1`` in order. Defaults to
            ``[[0, 2], [3, 5], [6, 8], [9, 11]]``.
        conv_inplane (int): spatial prior stem width. Defaults to 64.
        deform_num_heads (int): heads of the deformable attentions and of
            the global token. Must divide ``C``. Defaults to 6.
        n_points (int): sampling points per head and level. Defaults to 4.
        deform_ratio (float): value projection ratio of the deformable
            attentions. Defaults to 1.0.
        with_cffn (bool): ConvFFN in the extractors. Defaults to True.
        cffn_ratio (float): ConvFFN hidden ratio. Defaults to 0.25.
        init_values (float): initial ``gamma`` of the injectors and of the
            global token. Keep 0 for knowledge preservation.
            Defaults to 0.0.
        pyramid_init_values (float): initial per-channel gate ``g_l`` of the
            adapter maps in the pyramid (only with ``add_vit_feature``).
            Keep 0 for knowledge preservation; 1 adds the adapter maps at
            full strength, as ViT-Adapter. Defaults to 0.0.
        drop_path_rate (float): stochastic depth of the extractor ConvFFNs.
            Defaults to 0.0.
        with_global_token (bool): add the learnable global token to the
            summary. Defaults to True.
        summary_names (Sequence[str], optional): one summary per name
            (teacher names in distillation), each with its own global token
            (needs ``with_global_token``). :meth:`forward_features` returns
            them in ``FeatureOutput.summaries`` (``summary`` is the first).
            Downstream configs loading such a student list the same names.
            Defaults to None: one summary.
        summary (str, optional): which named summary :meth:`forward`
            returns with ``out_type='global'`` / ``'both'``, e.g.
            ``'clip'`` for CLIP's text-aligned summary. Defaults to None:
            the first of ``summary_names`` (or the only summary).
        freeze_base (bool): freeze the base ViT (no grad, always in eval
            mode). Defaults to True.
        frozen_stages (int): adapter stages to freeze, see above.
            Defaults to -1.
        out_indices (Sequence[int]): pyramid levels (0..3 = strides
            4/8/16/32) returned by :meth:`forward`. Defaults to
            ``(0, 1, 2, 3)``.
        out_type (str): what :meth:`forward` returns: ``'pyramid'`` (maps at
            ``out_indices``, for mmdet necks / mmseg heads), ``'global'``
            (``(summary,)``, for mmpretrain heads), or ``'both'``.
            Defaults to ``'pyramid'``.
        with_cp (bool): gradient checkpointing of the interaction blocks in
            training. Defaults to False.
        use_extra_extractor (bool): two more extractors in the last
            interaction block (as ViT-Adapter). Defaults to True.
        add_vit_feature (bool): add the per-stage ViT tokens to the pyramid
            (needs 4 interaction blocks). Without them the pyramid is the
            adapter maps alone and is not knowledge-preserving at step 0.
            Defaults to True.
        norm_cfg (dict): norm of the spatial prior convs and the output
            maps. Defaults to ``dict(type='BN')``; use
            ``dict(type='SyncBN')`` for multi-GPU training.
        pretrained (str, optional): deprecated toolbox convention (mmseg's
            ``EncoderDecoder`` passes ``model.pretrained`` here): a
            checkpoint path, turned into ``init_cfg=dict(type='Pretrained',
            checkpoint=pretrained)`` with mmseg's / mmdet's deprecation
            warning. Must not be combined with ``init_cfg``. Defaults to
            None.
        init_cfg (dict, optional): mmengine init config, e.g.
            ``dict(type='Pretrained', checkpoint='student.pth')`` for a
            student exported from a distillation run (the state dict of this
            module), or ``dict(type='Pretrained', checkpoint='det.pth',
            prefix='backbone.')`` to take the backbone out of a whole
            detector / segmentor / classifier checkpoint. Defaults to None.

    Note:
        The adapter is initialised at construction (ViT-Adapter scheme:
        truncated-normal linears, fan-out normal convs, mmcv's deformable
        attention init, ``gamma = init_values``, gates =
        ``pyramid_init_values``, ``up`` = nearest up-sampling); the base
        gets its weights from ``base.checkpoint``. :meth:`init_weights` only
        applies ``init_cfg``: it re-initialises neither the base nor the
        gammas. When ``init_cfg`` loads a full student, ``base.checkpoint``
        may be ``None`` to skip reading the base weights twice.

        ``forward`` runs only what ``out_type`` returns: with
        ``'pyramid'`` the global token is skipped, with ``'global'`` the
        pyramid output layers are (and of named summaries only
        ``summary``'s token runs). When fine-tuning with DDP, freeze the
        unused part, drop it (``with_global_token=False``) or set
        ``find_unused_parameters=True``.
    """

    def __init__(self,
                 base: dict,
                 interaction_indexes: Sequence[Sequence[int]] = ((0, 2),
                                                                 (3, 5),
                                                                 (6, 8),
                                                                 (9, 11)),
                 conv_inplane: int = 64,
                 deform_num_heads: int = 6,
                 n_points: int = 4,
                 deform_ratio: float = 1.0,
                 with_cffn: bool = True,
                 cffn_ratio: float = 0.25,
                 init_values: float = 0.0,
                 pyramid_init_values: float = 0.0,
                 drop_path_rate: float = 0.0,
                 with_global_token: bool = True,
                 summary_names: Sequence[str] | None = None,
                 summary: str | None = None,
                 freeze_base: bool = True,
                 frozen_stages: int = -1,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_type: str = 'pyramid',
                 with_cp: bool = False,
                 use_extra_extractor: bool = True,
                 add_vit_feature: bool = True,
                 norm_cfg: dict = dict(type='BN'),
                 pretrained: str | None = None,
                 init_cfg: dict | list[dict] | None = None) -> None:
        init_cfg = pretrained_to_init_cfg('AdapterViT', pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg)
        out_indices = check_outputs('AdapterViT', out_type, out_indices)
        self.out_type = out_type
        self.out_indices = out_indices
        self.freeze_base = freeze_base
        self.with_cp = with_cp
        self.add_vit_feature = add_vit_feature

        self.base: BaseViT = build_base_vit(base)
        self.interaction_indexes = self._check_interaction_indexes(
            interaction_indexes, self.base.depth, add_vit_feature)
        num_interactions = len(self.interaction_indexes)
        if not -1 <= frozen_stages <= num_interactions + 1:
            raise ValueError(
                f'AdapterViT: frozen_stages={frozen_stages} must be in '
                f'[-1, {num_interactions + 1}] (-1: none, '
                f'{num_interactions + 1}: the whole adapter)')
        self.frozen_stages = frozen_stages
        embed_dim = self.base.embed_dim
        #: Width ``C`` of the summary and of every pyramid level.
        self.embed_dim = embed_dim
        #: Patch size of the base: inputs are zero-padded to multiples of it.
        self.patch_size = self.base.patch_size
        if embed_dim % deform_num_heads:
            raise ValueError(
                f'AdapterViT: deform_num_heads={deform_num_heads} must '
                f'divide the base width {embed_dim}')

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(
            conv_inplane, embed_dim, norm_cfg=norm_cfg)
        self.interactions = nn.ModuleList([
            InteractionBlock(
                embed_dim,
                num_heads=deform_num_heads,
                num_points=n_points,
                deform_ratio=deform_ratio,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                init_values=init_values,
                drop_path=drop_path_rate,
                extra_extractor=use_extra_extractor
                and i == num_interactions - 1)
            for i in range(num_interactions)
        ])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        if add_vit_feature:
            self.vit_norms = nn.ModuleList(
                [TokenNorm(embed_dim) for _ in range(4)])
            # 1-d per level: no weight decay under flat_decay_mult=0
            self.pyramid_gammas = nn.ParameterList([
                nn.Parameter(
                    torch.full((embed_dim, ), float(pyramid_init_values)))
                for _ in range(4)
            ])
        self.out_norms = nn.ModuleList(
            [build_norm_layer(norm_cfg, embed_dim)[1] for _ in range(4)])
        self.summary_names = self._check_summary_names(
            summary_names, summary, with_global_token)
        #: the named summary :meth:`forward` returns (None: the only one)
        self.summary = summary if summary is not None else (
            self.summary_names[0] if self.summary_names else None)
        self.global_token = GlobalToken(
            embed_dim, num_heads=deform_num_heads,
            init_values=init_values) if with_global_token and \
            not self.summary_names else None
        # one global token (and gate) per named summary
        self.summary_tokens = nn.ModuleDict({
            name: GlobalToken(embed_dim, num_heads=deform_num_heads,
                              init_values=init_values)
            for name in self.summary_names
        }) if self.summary_names else None

        self._init_adapter_weights()
        for module in self._frozen_modules():
            module.requires_grad_(False)
        if frozen_stages >= 0:
            self.level_embed.requires_grad_(False)
        self.train()

    # ------------------------------------------------------------------
    # construction helpers
    @staticmethod
    def _check_interaction_indexes(indexes: Sequence[Sequence[int]],
                                   depth: int, add_vit_feature: bool
                                   ) -> tuple[tuple[int, int], ...]:
        """Check that the ``[start, end]`` ranges tile ``0..depth-1``."""
        pairs = tuple(tuple(int(i) for i in pair) for pair in indexes)
        tiles = bool(pairs) and all(
            len(p) == 2 and p[0] <= p[1] for p in pairs) and [
                p[0] for p in pairs
            ] == [0] + [p[1] + 1 for p in pairs[:-1]] \
            and pairs[-1][1] == depth - 1
        shown = [list(p) for p in pairs]
        if not tiles:
            raise ValueError(
                f'AdapterViT: interaction_indexes={shown} must be [start, '
                f'end] block ranges that tile 0..{depth - 1} (the {depth} '
                'blocks of the base ViT) in order, e.g. '
                '[[0, 2], [3, 5], [6, 8], [9, 11]] for 12 blocks')
        if add_vit_feature and len(pairs) != 4:
            raise ValueError(
                'AdapterViT: add_vit_feature=True needs 4 interaction blocks '
                f'(one per pyramid level), got interaction_indexes={shown}')
        return pairs

    @staticmethod
    def _check_summary_names(names: Sequence[str] | None,
                             summary: str | None,
                             with_global_token: bool) -> tuple[str, ...]:
        """Check ``summary_names`` / ``summary``; returns the names."""
        names = tuple(names or ())
        if len(set(names)) != len(names) or not all(
                isinstance(n, str) and n and '.' not in n for n in names):
            raise ValueError(
                f'AdapterViT: summary_names={list(names)} must be distinct '
                'non-empty strings without "."')
        if names and not with_global_token:
            raise ValueError(
                f'AdapterViT: summary_names={list(names)} needs '
                'with_global_token=True (each named summary is a global '
                'token of its own)')
        if summary is not None and summary not in names:
            raise ValueError(
                f'AdapterViT: summary={summary!r} is not one of '
                f'summary_names={list(names)}')
        return names

    def _adapter_modules(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name != 'base']

    def _init_adapter_weights(self) -> None:
        """ViT-Adapter initialisation of every adapter module (not the base).

        Linear: truncated normal (std 0.02), zero bias; norms: 1 / 0;
        convs: normal with std ``sqrt(2 / fan_out)``; then mmcv's deformable
        attention init and timm's latent init; level embedding: N(0, 1);
        ``up``: nearest-neighbour up-sampling (see :meth:`_init_up`).
        Parameters that are not module weights (``gamma`` s, pyramid gates)
        are untouched.
        """

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=0.02, bias=0.0)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)):
                if m.weight is not None:
                    constant_init(m, 1.0, bias=0.0)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] \
                    * m.out_channels // m.groups
                normal_init(m, std=math.sqrt(2.0 / fan_out), bias=0.0)

        for module in self._adapter_modules():
            module.apply(init)
            for m in module.modules():
                if isinstance(m, (MultiScaleDeformableAttention,
                                  AttentionPoolLatent)):
                    m.init_weights()
        nn.init.normal_(self.level_embed)
        self._init_up()

    @torch.no_grad()
    def _init_up(self) -> None:
        """Make ``up`` a nearest-neighbour up-sampling of ``c2``.

        A 2x2 transposed convolution with stride 2 writes each input pixel
        to its own 2x2 output block, so the per-channel identity kernel
        (``weight[i, i] = 1``, zero bias) copies every pixel of every
        channel to its four children: ``up(c2) == F.interpolate(c2,
        scale_factor=2, mode='nearest')``.
        """
        weight = self.up.weight  # (C_in, C_out, 2, 2)
        weight.zero_()
        index = torch.arange(weight.shape[0])
        weight[index, index] = 1.0
        self.up.bias.zero_()

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the maps :meth:`forward` returns at ``out_indices``
        (all ``embed_dim``), e.g. for an FPN's ``in_channels``."""
        return (self.embed_dim, ) * len(self.out_indices)

    @property
    def num_stages(self) -> int:
        """Number of adapter stages (``frozen_stages`` ranges to this - 1).
        """
        return len(self.interactions) + 2

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        if stage == 0:
            return [self.spm]
        if stage <= len(self.interactions):
            return [self.interactions[stage - 1]]
        outputs = [self.up, self.out_norms]
        if self.add_vit_feature:
            outputs += [self.vit_norms, self.pyramid_gammas]
        if self.global_token is not None:
            outputs.append(self.global_token)
        if self.summary_tokens is not None:
            outputs.append(self.summary_tokens)
        return outputs

    def _frozen_modules(self) -> list[nn.Module]:
        modules = [self.base] if self.freeze_base else []
        for stage in range(self.frozen_stages + 1):
            modules.extend(self._stage_modules(stage))
        return modules

    def train(self, mode: bool = True) -> 'AdapterViT':
        """Set the train mode; frozen parts (base, frozen stages) stay in eval.
        """
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    # ------------------------------------------------------------------
    # layer-wise learning-rate decay
    @cached_property
    def _layer_depth_rules(self) -> tuple[tuple[str, int], ...]:
        """``(parameter name prefix, layer id)`` pairs, most specific first.
        """
        last = self.base.depth + 1
        names = {id(m): name for name, m in self.named_modules()}
        rules = [(f'{names[id(block)]}.', i + 1)
                 for i, block in enumerate(self.base.blocks)]
        if id(self.base.norm) in names:  # mmpretrain without final norm
            rules.append((f'{names[id(self.base.norm)]}.', last))
        rules += [('base.', 0), ('level_embed', 0), ('spm.', 0)]
        for k, (start, end) in enumerate(self.interaction_indexes):
            rules += [(f'interactions.{k}.injector.', start),
                      (f'interactions.{k}.', end + 1)]
        return tuple(rules)

    def get_layer_depth(self, param_name: str,
                        prefix: str = '') -> tuple[int, int]:
        """Layer id of a parameter for layer-wise learning-rate decay.

        Same contract as mmpretrain's ``VisionTransformer.get_layer_depth``,
        which ``mmpretrain.LearningRateDecayOptimWrapperConstructor`` calls
        (through ``ImageClassifier.get_layer_depth`` with
        ``prefix='backbone.'``); the parameter gets the learning rate
        ``lr * layer_decay_rate ** (num_layers - 1 - layer_id)``. With ``D``
        base blocks, ``num_layers = D + 2`` and:

        - ``0``: base embeddings (patch embed, position embedding, CLS and
          register tokens, pre-norm), spatial prior module, level embedding
          (the adapter's input stem);
        - ``i + 1``: base block ``i``;
        - adapter interaction ``k`` over base blocks ``[s, e]``: each part
          takes the depth of the ViT token stream it touches: its injector
          writes the input of block ``s`` (``s``; 0 = the embeddings), its
          extractors read the output of block ``e`` (``e + 1``);
        - ``D + 1`` (full learning rate): the base final norm, the output
          layers (``up``, pyramid gates, per-stage token norms, output
          norms, global token)
          and every parameter outside this backbone (``param_name`` not
          starting with ``prefix``: necks, heads).

        mmseg segmentors and mmdet detectors have no ``get_layer_depth`` of
        their own; for them use
        ``constructor='kiv.BackboneLayerDecayOptimWrapperConstructor'``
        (:mod:`kiv.engine.optimizers.layer_decay_constructor`).

        Args:
            param_name (str): parameter name, e.g.
                ``'backbone.base.model.blocks.3.attn.qkv.weight'``.
            prefix (str): prefix of this backbone's parameters in
                ``param_name``. Defaults to ``''``.

        Returns:
            tuple[int, int]: ``(layer_id, num_layers)``,
            ``0 <= layer_id < num_layers``.
        """
        num_layers = self.base.depth + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        for rule, layer_id in self._layer_depth_rules:
            if name.startswith(rule):
                return layer_id, num_layers
        return num_layers - 1, num_layers

    # ------------------------------------------------------------------
    # forward
    def _interact(self, x: Tensor) -> _Interaction:
        """Pad, then run the spatial prior, the base blocks and the
        interactions.

        Args:
            x (Tensor): images ``(B, 3, H, W)``, any ``H, W``.

        Returns:
            _Interaction: tokens, per-stage patch tokens, adapter tokens,
            ``c1``, the shapes of ``c2..c4`` and the patch grid (all of the
            padded input), and the input size ``(H, W)``.
        """
        image_size = check_images('AdapterViT', x)
        p = self.base.patch_size
        x = pad_to_patch_multiple(x, p)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        n_prefix = self.base.num_prefix_tokens

        c1, *levels = self.spm(x)
        level_shapes = [tuple(c.shape[-2:]) for c in levels]
        c = torch.cat([
            c.flatten(2).transpose(1, 2) + self.level_embed[i]
            for i, c in enumerate(levels)
        ], dim=1)
        injector_inputs = make_deform_inputs([grid], level_shapes, x.device)
        extractor_inputs = make_deform_inputs(level_shapes, [grid], x.device)

        tokens = self.base.embed(x)
        blocks = self.base.blocks
        use_cp = self.with_cp and self.training and torch.is_grad_enabled()
        stage_tokens = []
        for block, (start, end) in zip(self.interactions,
                                       self.interaction_indexes):
            args = (tokens, c, blocks[start:end + 1], n_prefix,
                    injector_inputs, extractor_inputs, level_shapes)
            if use_cp:
                tokens, c = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens, c = block(*args)
            stage_tokens.append(tokens[:, n_prefix:])
        return _Interaction(tokens, stage_tokens, c, c1, level_shapes, grid,
                            image_size)

    def _pyramid(self, state: _Interaction) -> tuple[Tensor, ...]:
        """Four NCHW maps ``(B, C, ceil(H/s), ceil(W/s))``, s = 4/8/16/32,
        contiguous: the adapter works channels-last, but mmcv's RoIAlign
        reads any input as contiguous NCHW memory, so channels-last maps
        would give every RoI the wrong features (open-mmlab/mmcv#2203).
        """
        c2, c3, c4 = tokens_to_maps(state.c, state.level_shapes)
        c1 = state.c1
        c1 = c1 + crop_to(self.up(c2), c1.shape[-2:])
        maps = [c1, c2, c3, c4]
        if self.add_vit_feature:
            for i, (norm, gate, tokens) in enumerate(
                    zip(self.vit_norms, self.pyramid_gammas,
                        state.stage_tokens)):
                vit = tokens_to_maps(norm(tokens), [state.grid])[0]
                vit = F.interpolate(
                    vit, size=maps[i].shape[-2:], mode='bilinear',
                    align_corners=False)
                maps[i] = vit + gate.view(-1, 1, 1) * maps[i]
        sizes = pyramid_sizes(*state.image_size)
        return tuple(
            norm(crop_to(m, size)).contiguous()
            for norm, m, size in zip(self.out_norms, maps, sizes))

    def _summaries(self, tokens: Tensor, c: Tensor,
                   normed: Tensor | None = None,
                   names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Summaries from the last base tokens and adapter tokens.

        Args:
            tokens (Tensor): ``(B, P + N_p, C)`` last base tokens (no norm).
            c (Tensor): ``(B, N_c, C)`` adapter tokens.
            normed (Tensor, optional): ``tokens`` after the base's final
                norm, if already computed.
            names (Sequence[str], optional): the named summaries to compute.
                Defaults to all of ``summary_names``.

        Returns:
            dict[str, Tensor]: ``(B, C)`` per name; without
            ``summary_names`` one entry under the key ``''``.
        """
        tokens = self.base.norm(tokens) if normed is None else normed
        if self.base.has_class_token:
            base = tokens[:, 0]
        else:
            base = tokens[:, self.base.num_prefix_tokens:].mean(1)
        if self.summary_tokens is None:
            if self.global_token is not None:
                base = self.global_token(base, tokens, c)
            return {'': base}
        names = self.summary_names if names is None else names
        return {name: self.summary_tokens[name](base, tokens, c)
                for name in names}

    def forward_base_tokens(self, x: Tensor) -> Tensor:
        """The base token stream inside the adapter backbone.

        Args:
            x (Tensor): images ``(B, 3, H, W)``, any ``H, W``.

        Returns:
            Tensor: ``(B, P + ceil(H/p) * ceil(W/p), C)`` tokens after the
            last base block (with the injections, before the final norm) on
            the patch grid of the zero-padded input. With zero gammas this
            equals the bare base model's stream on that padded input,
            exactly.
        """
        return self._interact(x).tokens

    #: index of the patch-grid level in :meth:`forward_features`' features
    patch_level: int = 4

    @property
    def feature_strides(self) -> tuple[int, ...]:
        """Strides of the levels of :meth:`forward_features` (the pyramid,
        then the patch grid)."""
        return (4, 8, 16, 32, self.base.patch_size)

    def forward_features(self, x: Tensor) -> FeatureOutput:
        """Summary, full pyramid and patch-grid level (used by the
        distiller).

        Args:
            x (Tensor): images ``(B, 3, H, W)``, any ``H, W`` (zero-padded
                inside to multiples of the patch size).

        Returns:
            FeatureOutput: ``summary (B, C)`` and ``features`` =
            ``(f1, f2, f3, f4, patches)``, ``f_l`` of shape
            ``(B, C, ceil(H / s_l), ceil(W / s_l))`` with strides
            ``s = 4, 8, 16, 32``, and ``patches (B, C, ceil(H / p),
            ceil(W / p))``: the base's final-norm patch tokens on its own
            grid (:attr:`patch_level`). With zero gammas ``summary`` and
            ``patches`` are exactly the base model's outputs, so the
            knowledge base's targets are read at their own grid, with no
            resize round trip. With ``summary_names``: ``summaries`` maps
            every name to its ``(B, C)`` summary (all exactly the base's at
            zero gammas) and ``summary`` is the one :meth:`forward` returns.
        """
        state = self._interact(x)
        normed = self.base.norm(state.tokens)
        patches = tokens_to_maps(normed[:, self.base.num_prefix_tokens:],
                                 [state.grid])[0].contiguous()
        summaries = self._summaries(state.tokens, state.c, normed)
        features = self._pyramid(state) + (patches, )
        if self.summary_tokens is None:
            return FeatureOutput(summaries[''], features)
        return FeatureOutput(summaries[self.summary], features, summaries)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Toolbox interface.

        Args:
            x (Tensor): images ``(B, 3, H, W)``, any ``H, W``.

        Returns:
            tuple[Tensor, ...]: ``out_type='pyramid'``: the maps of
            :meth:`forward_features` at ``out_indices``, level ``l`` of
            shape ``(B, C, ceil(H / s_l), ceil(W / s_l))``; ``'global'``:
            ``(summary (B, C),)`` (the named summary ``summary``);
            ``'both'``: the maps then the summary.
        """
        state = self._interact(x)
        outs: tuple[Tensor, ...] = ()
        if self.out_type != 'global':
            maps = self._pyramid(state)
            outs = tuple(maps[i] for i in self.out_indices)
        if self.out_type != 'pyramid':
            names = None if self.summary is None else [self.summary]
            summary, = self._summaries(state.tokens, state.c,
                                       names=names).values()
            outs = outs + (summary, )
        return outs

    def extra_repr(self) -> str:
        return (f'interaction_indexes={list(self.interaction_indexes)}, '
                f'out_type={self.out_type!r}, out_indices={self.out_indices}, '
                f'freeze_base={self.freeze_base}, '
                f'frozen_stages={self.frozen_stages}')
