"""The real-scale recipe's teachers, loaded from files in the official
layouts.

For each teacher of
``configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_8xb64-100k_in1k.py``
a file with the key names, shapes and nesting of the official file the
README names is written with random values (:mod:`kiv.testing.
official_layouts`), with fewer transformer blocks (no key name changes),
and the teacher is built FROM THE RECIPE, overriding only the checkpoint
path and depth-related ``model_kwargs``. Strict loading must pass, the
teachers must give the dimensions and grids the recipe's latent space
expects at the student's 224 px, and the weights must arrive unchanged
where no conversion applies.
"""
from __future__ import annotations

import copy
import os.path as osp
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS

import kiv  # noqa: F401  registers kiv.*
from kiv.models.layers.backbone_io import pyramid_sizes
from kiv.models.teachers import (Teacher, TeacherCheckpointError,
                                 build_teacher_model)
from kiv.models.teachers.timm_source import build_timm_teacher
from kiv.structures import FeatureOutput
from kiv.testing.official_layouts import (OFFICIAL_FILES, write_clip,
                                          write_dinov2, write_mmdet,
                                          write_sam)
from kiv.testing.paths import REAL_DISTILL_CFG as RECIPE
from kiv.utils.timm_weights import resample_position_tables, resample_rel_pos
from kiv.utils.weights import discarded_entries

#: the student's input side and its pyramid (strides 4, 8, 16, 32)
STUDENT_SIZE = 224
#: reduced depths (key names do not change)
VIT_DEPTH = 4  # DINOv2: the student's adapter needs 4 interaction blocks
CLIP_DEPTH = 2
SAM_DEPTH = 2
SAM_GLOBAL = [1]  # one windowed and one global-attention block


def images(batch: int = 1, size: int = STUDENT_SIZE, seed: int = 0):
    """Raw RGB pixels in [0, 255], as the distiller gives teachers."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 255


def equal(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=msg)


@pytest.fixture(scope='module')
def recipe() -> Config:
    return Config.fromfile(RECIPE)


def teacher_cfg(recipe: Config, name: str, checkpoint: str,
                **model_kwargs) -> dict:
    """The recipe's teacher ``name`` with only the checkpoint path and
    depth-related ``model_kwargs`` overridden."""
    cfg = copy.deepcopy(recipe.model.teachers[name].to_dict())
    cfg['source']['checkpoint'] = checkpoint
    if model_kwargs:
        cfg['source']['model_kwargs'] = dict(
            cfg['source'].get('model_kwargs', {}), **model_kwargs)
    return cfg


def build(cfg: dict):
    return ROOT_MODELS.build(cfg)


@dataclass
class Built:
    """A teacher built from the recipe, the weights written to its file and
    its output on :func:`images` (computed once: bf16 on CPU is slow)."""

    teacher: Teacher
    written: dict[str, torch.Tensor]
    path: str
    out: FeatureOutput = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.teacher(images())


# ------------------------------------------------------------- fixtures ---
@pytest.fixture(scope='module')
def dinov2(recipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('dinov2') /
               OFFICIAL_FILES['dinov2'].filename)
    written = write_dinov2(path, depth=VIT_DEPTH)
    teacher = build(teacher_cfg(recipe, 'dinov2', path, depth=VIT_DEPTH))
    return Built(teacher, written, path)


@pytest.fixture(scope='module')
def clip(recipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('clip') /
               OFFICIAL_FILES['clip'].filename)
    written = write_clip(path, depth=CLIP_DEPTH)
    teacher = build(teacher_cfg(recipe, 'clip', path, depth=CLIP_DEPTH))
    return Built(teacher, written, path)


@pytest.fixture(scope='module')
def sam(recipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('sam') /
               OFFICIAL_FILES['sam'].filename)
    written = write_sam(path, depth=SAM_DEPTH,
                        global_attn_indexes=SAM_GLOBAL)
    teacher = build(teacher_cfg(recipe, 'sam', path, depth=SAM_DEPTH,
                                global_attn_indexes=SAM_GLOBAL))
    return Built(teacher, written, path)


@pytest.fixture(scope='module')
def detector(recipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('detector') /
               OFFICIAL_FILES['detector'].filename)
    written = write_mmdet(path, recipe.model.teachers.detector.source.config)
    teacher = build(teacher_cfg(recipe, 'detector', path))
    return Built(teacher, written, path)


# ---------------------------------------------------------------- recipe ---
def test_recipe_names_the_official_files(recipe):
    teachers = recipe.model.teachers
    for name, official in OFFICIAL_FILES.items():
        assert osp.basename(teachers[name].source.checkpoint) == \
            official.filename, name
    student_base = recipe.model.student.base
    assert student_base.checkpoint == teachers.dinov2.source.checkpoint
    assert student_base.model_name == teachers.dinov2.source.model_name
    # CLIP: OpenAI weights need QuickGELU; timm declares the tower with
    # its 512-d projection head, and the file is the non-quickgelu repo's
    clip = teachers.clip.source
    assert 'quickgelu' in clip.model_name
    pretrained = timm.models.get_pretrained_cfg(f'{clip.model_name}.openai')
    assert pretrained.hf_hub_id == 'timm/vit_base_patch16_clip_224.openai'
    assert pretrained.hf_hub_id in OFFICIAL_FILES['clip'].source
    assert clip.model_kwargs.num_classes == pretrained.num_classes == 512


# ---------------------------------------------------------------- DINOv2 ---
def test_dinov2_teacher_from_original_file(dinov2):
    teacher, written, out = dinov2.teacher, dinov2.written, dinov2.out
    assert teacher.summary_dim == 768
    assert teacher.feature_dims == [768] and teacher.feature_strides == [14]
    assert out.summary.shape == (1, 768)
    assert out.features[0].shape == (1, 768, 16, 16)  # 224 / 14
    own = teacher.model.state_dict()
    for key in ('blocks.0.attn.qkv.weight', 'blocks.3.mlp.fc2.weight',
                'blocks.1.ls1.gamma', 'patch_embed.proj.weight',
                'norm.bias'):
        equal(own[key], written[key], key)
    # timm's conversion: registers renamed, CLS position folded into the
    # CLS token, patch positions kept at 518 px (resampled at run time)
    equal(own['reg_token'], written['register_tokens'], 'reg_token')
    equal(own['cls_token'],
          written['cls_token'] + written['pos_embed'][:, :1], 'cls_token')
    equal(own['pos_embed'], written['pos_embed'][:, 1:], 'pos_embed')


def test_dinov2_mask_token_is_dropped_only_when_declared(recipe, dinov2):
    path = dinov2.path
    source = teacher_cfg(recipe, 'dinov2', path, depth=VIT_DEPTH)['source']
    assert source['drop_keys'] == [r'^mask_token$']
    source['drop_keys'] = []
    with pytest.raises(TeacherCheckpointError) as info:
        build_teacher_model(source)
    message = str(info.value)
    assert path in message and "'mask_token'" in message
    assert "drop_keys=['^mask_token$']" in message


def test_student_base_loads_the_same_dinov2_file(recipe, dinov2):
    teacher, written, path = dinov2.teacher, dinov2.written, dinov2.path
    cfg = copy.deepcopy(recipe.model.student.to_dict())
    cfg['base'] = dict(cfg['base'], checkpoint=path,
                       model_kwargs=dict(depth=VIT_DEPTH))
    cfg['interaction_indexes'] = [[i, i] for i in range(VIT_DEPTH)]
    student = build(cfg)
    base = student.base.model.state_dict()
    own = teacher.model.state_dict()
    assert set(base) == set(own)
    for key, value in own.items():
        equal(base[key], value, key)
    equal(base['blocks.2.attn.qkv.weight'],
          written['blocks.2.attn.qkv.weight'], 'qkv')


def test_recipe_clip_summary_head_reads_clips_own_summary(
        recipe, dinov2, clip, sam, detector):
    """The recipe's student has a summary per teacher with one (DINOv2,
    CLIP); the latent space feeds CLIP's summary head CLIP's own summary,
    which at step 0 is the knowledge base's CLS token."""
    cfg = copy.deepcopy(recipe.model.student.to_dict())
    cfg['base'] = dict(cfg['base'], checkpoint=dinov2.path,
                       model_kwargs=dict(depth=VIT_DEPTH))
    cfg['interaction_indexes'] = [[i, i] for i in range(VIT_DEPTH)]
    cfg['with_cp'] = False
    student = build(cfg).eval()
    built = dict(dinov2=dinov2, clip=clip, sam=sam, detector=detector)
    with_summary = [n for n, b in built.items()
                    if b.teacher.summary_dim is not None]
    assert student.summary_names == tuple(with_summary) == ('dinov2', 'clip')
    latent_cfg = copy.deepcopy(recipe.model.latent.to_dict())
    teachers = {n: dict(summary_dim=b.teacher.summary_dim,
                        feature_dims=list(b.teacher.feature_dims),
                        **latent_cfg.get('teachers', {}).get(n, {}))
                for n, b in built.items()}
    latent = build(dict(latent_cfg, student_summary_dim=768,
                        student_feature_dims=[768] * 5,
                        default_student_level=2, teachers=teachers))
    seen = {}
    latent.summary_heads['clip'].register_forward_pre_hook(
        lambda module, args: seen.setdefault('clip', args[0]))
    x = (images() - torch.tensor([123.675, 116.28, 103.53]).view(
        1, 3, 1, 1)) / torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = student.forward_features(x)
        latent.project(out, 'clip', [f.shape[-2:] for f in clip.out.features])
    assert seen['clip'] is out.summaries['clip']
    assert torch.equal(out.summaries['clip'], out.summaries['dinov2'])


# ------------------------------------------------------------------ CLIP ---
def test_clip_teacher_keeps_the_openai_projection(clip):
    teacher, written, out = clip.teacher, clip.written, clip.out
    model = teacher.model
    assert isinstance(model.blocks[0].mlp.act, timm.layers.QuickGELU)
    assert teacher.summary_dim == 512
    # ln_post tokens and MaskCLIP's text-space tokens (projected: 512)
    assert teacher.feature_dims == [768, 512]
    assert teacher.feature_strides == [16, 16]
    own = model.state_dict()
    for key in ('head.weight', 'head.bias', 'blocks.1.attn.qkv.weight',
                'pos_embed', 'cls_token', 'norm_pre.weight'):
        equal(own[key], written[key], key)
    assert out.features[0].shape == (1, 768, 14, 14)  # 224 / 16
    assert out.features[1].shape == (1, 512, 14, 14)
    # the summary is the projected CLS token of the final norm (the
    # teacher runs in bf16, the reference in fp32)
    with torch.no_grad():
        cls = model.forward_features(teacher.preprocess(images()))[:, 0]
    expected = F.linear(cls, written['head.weight'], written['head.bias'])
    torch.testing.assert_close(out.summary, expected, rtol=0.05, atol=2e-3)


def test_clip_file_does_not_fit_plain_gelu_clip_without_head(recipe, clip):
    """The OpenAI CLIP file does not load silently into timm's plain-GELU
    CLIP without the 512-d head: its head entries are named as unexpected.
    """
    with pytest.raises(TeacherCheckpointError,
                       match=r"unexpected keys \('head\.bias', "
                             r"'head\.weight'\)"):
        build_timm_teacher('vit_base_patch16_clip_224', clip.path,
                           model_kwargs=dict(num_classes=0,
                                             depth=CLIP_DEPTH))


# ------------------------------------------------------------------- SAM ---
def test_sam_teacher_at_448_from_the_1024_file(sam):
    teacher, written, out = sam.teacher, sam.written, sam.out
    assert teacher.summary_dim is None
    assert teacher.feature_dims == [256] and teacher.feature_strides == [16]
    assert out.summary is None
    assert out.features[0].shape == (1, 256, 28, 28)  # 448 / 16
    own = teacher.model.state_dict()
    e = 'image_encoder.'
    for key, original in (
            ('blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.weight'),
            ('blocks.1.mlp.fc1.weight', 'blocks.1.mlp.lin1.weight'),
            ('blocks.0.attn.rel_pos_h', 'blocks.0.attn.rel_pos_h'),
            ('neck.0.weight', 'neck.0.weight'),
            ('neck.3.bias', 'neck.3.bias')):
        equal(own[key], written[e + original], key)
    # resampled from the 1024-px file: 64x64 -> 28x28 positions, global
    # relative positions 127 -> 55 rows (windowed blocks keep 27)
    assert own['pos_embed'].shape == (1, 28, 28, 768)
    assert written[e + 'blocks.1.attn.rel_pos_w'].shape == (127, 64)
    assert own['blocks.1.attn.rel_pos_w'].shape == (55, 64)
    equal(own['blocks.1.attn.rel_pos_w'],
          resample_rel_pos(written[e + 'blocks.1.attn.rel_pos_w'], 55),
          'rel_pos_w')


def test_sam_at_448_computes_what_the_1024_model_computes(recipe, sam):
    """Resampling on load = timm's own run-time resampling of the 1024-px
    model on a 448-px image."""
    teacher = sam.teacher
    source = recipe.model.teachers.sam.source
    reference = build_timm_teacher(
        source.model_name, sam.path, drop_keys=source.drop_keys,
        model_kwargs=dict(num_classes=0, depth=SAM_DEPTH,
                          global_attn_indexes=SAM_GLOBAL)).eval()
    assert reference.pos_embed.shape == (1, 64, 64, 768)
    x = teacher.preprocess(images())
    assert x.shape[-2:] == (448, 448)
    with torch.no_grad():
        expected = reference.forward_features(x)
        actual = teacher.model.forward_features(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_sam_prompt_encoder_and_mask_decoder_dropped_only_when_declared(
        recipe, sam):
    path = sam.path
    source = teacher_cfg(recipe, 'sam', path, depth=SAM_DEPTH,
                         global_attn_indexes=SAM_GLOBAL)['source']
    assert sorted(source['drop_keys']) == [r'^mask_decoder\.',
                                           r'^prompt_encoder\.']
    source['drop_keys'] = [r'^prompt_encoder\.']
    with pytest.raises(TeacherCheckpointError) as info:
        build_teacher_model(source)
    message = str(info.value)
    assert path in message and 'mask_decoder.*' in message
    assert 'prompt_encoder' not in message
    assert 'image_encoder' not in message  # renamed, not discarded


# -------------------------------------------------------------- detector ---
def test_detector_teacher_from_mmdet_checkpoint(detector):
    teacher, written, out = detector.teacher, detector.written, detector.out
    assert type(teacher.model).__name__ == 'BackboneNeck'
    assert teacher.summary_dim is None
    assert teacher.feature_dims == [256] * 5
    own = teacher.model.state_dict()
    assert not any(k.startswith(('rpn_head.', 'roi_head.')) for k in own)
    for key in ('backbone.conv1.weight', 'backbone.layer1.0.conv1.weight',
                'backbone.layer4.2.bn3.running_var',
                'neck.lateral_convs.3.conv.weight',
                'neck.fpn_convs.0.conv.bias'):
        equal(own[key], written[key], key)
    assert out.summary is None
    assert [f.shape[-1] for f in out.features] == [56, 28, 14, 7, 4]


# ------------------------------------------------------ latent space fit ---
def test_teacher_grids_match_the_recipe_latent_space(recipe, dinov2, clip,
                                                     sam, detector):
    """Every dense target is read at a student level of the same size."""
    student_grids = pyramid_sizes(STUDENT_SIZE, STUDENT_SIZE)
    latent = recipe.model.latent.teachers
    for name, built in dict(clip=clip, sam=sam, detector=detector).items():
        levels = latent[name].student_levels
        grids = [tuple(f.shape[-2:]) for f in built.out.features]
        assert len(levels) == len(grids), name
        for level, grid in zip(levels, grids):
            if name == 'detector' and grid == (4, 4):
                # P6 (max-pool of P5) is read from the stride-32 level
                assert student_grids[level] == (7, 7)
                continue
            assert student_grids[level] == grid, (name, level, grid)
    assert recipe.model.base_teacher == 'dinov2'
    assert tuple(dinov2.out.features[0].shape[-2:]) == (16, 16)
    assert dinov2.out.summary.shape[1] == dinov2.teacher.summary_dim == 768
    assert clip.out.summary.shape[1] == clip.teacher.summary_dim == 512


# ------------------------------------------------ loader building blocks ---
def test_discarded_entries_follow_renames_and_views():
    a, b, c = torch.randn(3, 4), torch.randn(2), torch.randn(5)
    before = {'visual.proj': a, 'keep': b, 'text.w': c}
    after = {'head.weight': a.t(), 'keep': b * 2}
    assert discarded_entries(before, after) == ['text.w']


def test_resample_position_tables_only_touches_position_tables():
    model = timm.create_model('samvit_base_patch16', pretrained=False,
                              num_classes=0, img_size=224, depth=1,
                              global_attn_indexes=[0], embed_dim=64,
                              num_heads=2, neck_chans=16)
    own = model.state_dict()
    sd = {k: torch.randn(v.shape) for k, v in own.items()}
    assert resample_position_tables(dict(sd), model).keys() == sd.keys()
    for key, value in resample_position_tables(dict(sd), model).items():
        assert value is sd[key]  # nothing to resample: untouched
    sd['pos_embed'] = torch.randn(1, 64, 64, 64)
    sd['blocks.0.attn.rel_pos_h'] = torch.randn(127, 32)
    sd['blocks.0.attn.qkv.weight'] = torch.randn(3, 64)  # not a table
    out = resample_position_tables(sd, model)
    assert own['pos_embed'].shape == (1, 14, 14, 64)
    assert out['pos_embed'].shape == own['pos_embed'].shape
    assert out['blocks.0.attn.rel_pos_h'].shape == (27, 32)
    assert out['blocks.0.attn.qkv.weight'].shape == (3, 64)
