"""Zero-shot classification and open-vocabulary segmentation through the
inherited CLIP path, on a tiny random CLIP written in open_clip's official
layout (``kiv.testing.tiny_clip``): the text-embedding file, MaskCLIP's
text-space teacher level, and the heads on an exact inherited path (a
student that reproduces CLIP's outputs, PHI-S standardisers with real
statistics, s2t heads that are their standardiser's affine map)."""
from __future__ import annotations

import json
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from kiv.apis.clip_text import ClipTextTowerError, write_text_embeddings
from kiv.fileio.text_embeddings import (TextEmbeddingsError,
                                        load_text_embeddings,
                                        save_text_embeddings)
from kiv.models.connectors import SharedLatentSpace
from kiv.models.teachers import Teacher
from kiv.testing.tiny_clip import TINY_CLIP, TINY_CLIP_TIMM, write_tiny_clip
from kiv.utils.atomic import atomic_torch_save

CLASSES = ['red star', 'green circle', 'blue square', 'dog']
TEMPLATES = ['a photo of a {}.', 'art of the {}.', 'a {} in a video game.']
CLIP_NORM = dict(mean=[122.771, 116.746, 104.094],
                 std=[68.501, 66.632, 70.323])
EMBED = TINY_CLIP['embed_dim']
VISION = TINY_CLIP['vision_width']


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
    """The tiny CLIP file, its open_clip model, its text embeddings and
    the kiv teacher reading its image tower as the real recipe does."""
    root = tmp_path_factory.mktemp('clip')
    path = str(root / 'open_clip_model.safetensors')
    model = write_tiny_clip(path)
    emb = str(root / 'text.safetensors')
    write_text_embeddings(path, emb, CLASSES, TEMPLATES, width=EMBED)
    teacher = Teacher(
        source=dict(TINY_CLIP_TIMM, checkpoint=path),
        input_size=TINY_CLIP['image_size'], pad_to_multiple=16,
        features=dict(from_output=False, layers=['norm'],
                      text_space=dict(block='blocks', norm='norm',
                                      proj='head')),
        summary=dict(type='layer', name='head'), **CLIP_NORM)
    torch.manual_seed(1)
    images = torch.rand(6, 3, 64, 64) * 255
    return dict(root=root, path=path, model=model, emb=emb, teacher=teacher,
                images=images, out=teacher(images))


def _open_clip_text(model, classes, templates) -> torch.Tensor:
    """CLIP's prompt ensemble with open_clip's own model and tokenizer."""
    import open_clip
    tok = open_clip.SimpleTokenizer()
    rows = []
    with torch.no_grad():
        for name in classes:
            feats = model.encode_text(tok([t.format(name)
                                           for t in templates]))
            rows.append(F.normalize(F.normalize(feats, dim=-1).mean(0),
                                    dim=-1))
    return torch.stack(rows)


# ------------------------------------------------------- text embeddings
def test_embedding_file_round_trips(clip):
    texts = load_text_embeddings(clip['emb'])
    assert texts.classes == CLASSES and texts.templates == TEMPLATES
    assert texts.width == EMBED and 'open_clip/OpenAI' in texts.tower
    ref = _open_clip_text(clip['model'], CLASSES, TEMPLATES)
    torch.testing.assert_close(texts.embeddings, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(texts.visual_projection,
                               clip['model'].visual.proj.detach())
    # written again, read again: bit for bit
    again = str(clip['root'] / 'again.safetensors')
    save_text_embeddings(again, texts.embeddings, texts.classes,
                         texts.templates, texts.tower,
                         texts.visual_projection)
    assert torch.equal(load_text_embeddings(again).embeddings,
                       texts.embeddings)


def _hf_layout(model) -> dict:
    """The tiny text tower renamed to Hugging Face CLIPModel keys."""
    sd = model.state_dict()
    out = {
        'text_model.embeddings.token_embedding.weight':
        sd['token_embedding.weight'],
        'text_model.embeddings.position_embedding.weight':
        sd['positional_embedding'],
        'text_model.final_layer_norm.weight': sd['ln_final.weight'],
        'text_model.final_layer_norm.bias': sd['ln_final.bias'],
        'text_projection.weight': sd['text_projection'].t().contiguous(),
        'visual_projection.weight': sd['visual.proj'].t().contiguous(),
    }
    width = TINY_CLIP['text_width']
    for i in range(TINY_CLIP['text_layers']):
        src, dst = f'transformer.resblocks.{i}.', \
            f'text_model.encoder.layers.{i}.'
        for oc, hf in (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'),
                       ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2'),
                       ('attn.out_proj', 'self_attn.out_proj')):
            for kind in ('weight', 'bias'):
                out[f'{dst}{hf}.{kind}'] = sd[f'{src}{oc}.{kind}']
        for kind in ('weight', 'bias'):
            q, k, v = sd[f'{src}attn.in_proj_{kind}'].split(width)
            for name, part in zip('qkv', (q, k, v)):
                out[f'{dst}self_attn.{name}_proj.{kind}'] = \
                    part.contiguous()
    return out


def test_hugging_face_directory_gives_the_same_embeddings(clip):
    """A HF CLIPModel directory (config.json + model.safetensors) is read
    through the key renaming, with its config's heads and activation."""
    from safetensors.torch import save_file
    hf = clip['root'] / 'clip-hf'
    hf.mkdir()
    save_file(_hf_layout(clip['model']), str(hf / 'model.safetensors'))
    (hf / 'config.json').write_text(json.dumps(dict(text_config=dict(
        num_attention_heads=1, hidden_act='quick_gelu'))))
    out = str(clip['root'] / 'hf.safetensors')
    write_text_embeddings(str(hf), out, CLASSES, TEMPLATES, width=EMBED)
    texts = load_text_embeddings(out)
    torch.testing.assert_close(texts.embeddings,
                               load_text_embeddings(clip['emb']).embeddings,
                               atol=1e-6, rtol=0)
    assert 'Hugging Face' in texts.tower


def test_openai_torchscript_archive_gives_the_same_embeddings(clip):
    """OpenAI's ``ViT-B-16.pt`` layout: a traced CLIP (TorchScript
    archive), read with ``torch.jit.load``, state dict only."""
    import warnings
    model = clip['model']
    model.output_dict = False
    path = str(clip['root'] / 'ViT-tiny.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings
        traced = torch.jit.trace(
            model, (torch.rand(1, 3, 64, 64),
                    torch.zeros(1, TINY_CLIP['context_length'],
                                dtype=torch.long)), check_trace=False)
    traced.save(path)
    out = str(clip['root'] / 'ts.safetensors')
    write_text_embeddings(path, out, CLASSES, TEMPLATES, width=EMBED)
    texts = load_text_embeddings(out)
    assert 'TorchScript' in texts.tower
    assert torch.equal(texts.embeddings,
                       load_text_embeddings(clip['emb']).embeddings)


def test_text_tool_stops_on_bad_input(clip, tmp_path):
    out = str(tmp_path / 'x.safetensors')
    with pytest.raises(ClipTextTowerError, match='not found.*nothere'):
        write_text_embeddings(str(tmp_path / 'nothere.pt'), out, CLASSES,
                              TEMPLATES)
    with pytest.raises(ClipTextTowerError, match='width 32, not --width 512'):
        write_text_embeddings(clip['path'], out, CLASSES, TEMPLATES,
                              width=512)
    other = str(tmp_path / 'other.pth')
    atomic_torch_save({'fc.weight': torch.zeros(2, 2)}, other)
    with pytest.raises(ClipTextTowerError, match="no CLIP text tower.*fc"):
        write_text_embeddings(other, out, CLASSES, TEMPLATES)
    assert not osp.exists(out)
    with pytest.raises(TextEmbeddingsError, match='not found.*x.safetensors'):
        load_text_embeddings(out)
    with pytest.raises(TextEmbeddingsError, match='not a kiv text-embedding'):
        load_text_embeddings(clip['path'])  # a safetensors file, not ours


# ------------------------------------------------------ the CLIP teacher
def test_teacher_summary_and_text_space_are_clips(clip):
    """The summary is open_clip's ``encode_image``; the text-space level
    is MaskCLIP's value path, computed here from the file's raw tensors."""
    model, teacher = clip['model'], clip['teacher']
    assert teacher.feature_dims == [VISION, EMBED]
    x = teacher.preprocess(clip['images'])
    seen = {}
    block = model.visual.transformer.resblocks[-1]
    hook = block.register_forward_pre_hook(
        lambda m, args: seen.setdefault('x', args[0]))
    with torch.no_grad():
        image = model.encode_image(x)
    hook.remove()
    sd = model.state_dict()
    p = f'visual.transformer.resblocks.{TINY_CLIP["vision_layers"] - 1}.'
    h = F.layer_norm(seen['x'], (VISION, ), sd[p + 'ln_1.weight'],
                     sd[p + 'ln_1.bias'])
    v = F.linear(h, sd[p + 'attn.in_proj_weight'][2 * VISION:],
                 sd[p + 'attn.in_proj_bias'][2 * VISION:])
    o = F.linear(v, sd[p + 'attn.out_proj.weight'],
                 sd[p + 'attn.out_proj.bias'])
    o = F.layer_norm(o, (VISION, ), sd['visual.ln_post.weight'],
                     sd['visual.ln_post.bias']) @ sd['visual.proj']
    grid = TINY_CLIP['image_size'] // TINY_CLIP['patch_size']
    ref = o[:, 1:].transpose(1, 2).reshape(-1, EMBED, grid, grid)
    out = clip['out']
    torch.testing.assert_close(out.summary, image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features[-1], ref, atol=1e-5, rtol=1e-5)
    # not the attention output: the value path differs from the full block
    assert (out.features[-1] - image[:, :, None, None]).abs().mean() > 0.1


# ------------------------------------------- an exact inherited path ---
@pytest.fixture(scope='module')
def exact_student(clip):
    """An exported student whose CLIP path is exact: PHI-S standardisers
    with the statistics of the teacher's outputs, s2t heads equal to the
    standardiser (skip path, zero MLP output) -> inverse is the identity
    on CLIP's own outputs."""
    teacher = clip['teacher']
    latent = SharedLatentSpace(
        EMBED, teacher.feature_dims, hidden_dim=8,
        teachers=dict(clip=dict(summary_dim=EMBED,
                                feature_dims=teacher.feature_dims,
                                student_levels=[0, 1], preserve=True)))
    torch.manual_seed(2)
    stats = teacher(torch.rand(48, 3, 64, 64) * 255)
    latent.load_statistics(latent.statistic_sums(dict(clip=stats)))
    path = str(clip['root'] / 'student.pth')
    atomic_torch_save(dict(state_dict={}, inherited_heads=latent.state_dict()),
                      path)
    return dict(path=path, latent=latent)


def test_zero_shot_head_on_a_student_that_is_clip(clip, exact_student):
    """Same predictions as CLIP itself (open_clip: image x text, x 100)."""
    from kiv.models.heads import ZeroShotClsHead
    head = ZeroShotClsHead(embeddings=clip['emb'],
                           inherited=exact_student['path'],
                           num_classes=len(CLASSES))
    head.init_weights()  # the inherited path is kept, not re-initialised
    summary = clip['out'].summary
    logits = head((summary, ))
    model = clip['model']
    with torch.no_grad():
        image = F.normalize(model.encode_image(
            clip['teacher'].preprocess(clip['images'])), dim=-1)
    ref = 100 * image @ _open_clip_text(model, CLASSES, TEMPLATES).t()
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-4)
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    # the path really de-standardises (the test could see a missing
    # inverse): the standardised summary scores otherwise
    std = exact_student['latent'].summary_standardizers['clip']
    wrong = head.text_embeddings @ F.normalize(std(summary), dim=-1).t()
    assert (100 * wrong.t() - ref).abs().max() > 1


def test_text_seg_head_scores_the_text_space_teacher(clip, exact_student):
    """When the student reproduces the teacher's text-space map, every
    pixel's scores are CLIP's: 100 x cos(map, class text embedding)."""
    from kiv.models.heads import TextSegHead
    head = TextSegHead(embeddings=clip['emb'],
                       inherited=exact_student['path'], in_channels=EMBED,
                       in_index=1, level=-1)
    head.init_weights()
    feats = clip['out'].features
    scores = head(list(feats))
    texts = _open_clip_text(clip['model'], CLASSES, TEMPLATES)
    ref = 100 * torch.einsum('bchw,kc->bkhw', F.normalize(feats[-1], dim=1),
                             texts)
    assert scores.shape == (len(feats[-1]), len(CLASSES), 4, 4)
    torch.testing.assert_close(scores, ref, atol=2e-3, rtol=1e-4)
    assert torch.equal(scores.argmax(1), ref.argmax(1))


def test_heads_name_the_file_on_bad_input(clip, exact_student, tmp_path):
    from kiv.models.heads import (InheritedPathError, TextSegHead,
                                  ZeroShotClsHead)
    with pytest.raises(ValueError, match='num_classes=1000 but .*text'):
        ZeroShotClsHead(embeddings=clip['emb'], num_classes=1000)
    bare = str(tmp_path / 'student.pth')
    atomic_torch_save(dict(state_dict={'a': torch.zeros(1)}), bare)
    with pytest.raises(InheritedPathError, match='--keep-heads'):
        ZeroShotClsHead(embeddings=clip['emb'], inherited=bare)
    with pytest.raises(InheritedPathError, match="teacher 'sam'.*\\['clip'"):
        ZeroShotClsHead(embeddings=clip['emb'],
                        inherited=exact_student['path'], teacher='sam')
    with pytest.raises(ValueError, match='48-d but the text embeddings'):
        TextSegHead(embeddings=clip['emb'], inherited=exact_student['path'],
                    in_channels=VISION, in_index=0, level=0)
    with pytest.raises(ValueError, match='no level 2'):
        TextSegHead(embeddings=clip['emb'], inherited=exact_student['path'],
                    in_channels=EMBED, in_index=1, level=2)


@pytest.mark.parametrize('scope', ['kiv', 'mmdet'])
def test_heads_build_under_any_default_scope(clip, exact_student, scope):
    """A kiv or mmdet default scope (set by an earlier kiv run or another
    toolbox) does not hide the heads' own losses."""
    from mmengine.registry import DefaultScope

    from kiv.models.heads import TextSegHead, ZeroShotClsHead
    with DefaultScope.overwrite_default_scope(scope):
        cls_head = ZeroShotClsHead(embeddings=clip['emb'],
                                   inherited=exact_student['path'],
                                   num_classes=len(CLASSES))
        seg_head = TextSegHead(embeddings=clip['emb'],
                               inherited=exact_student['path'],
                               in_channels=EMBED, in_index=1, level=-1)
    assert type(cls_head.loss_module).__module__.startswith('mmpretrain.')
    assert type(seg_head.loss_decode).__module__.startswith('mmseg.')
