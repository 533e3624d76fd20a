"""The zero-shot tools and tiny configs end to end: text embeddings written
by ``tools/misc/text_embeddings.py`` from a tiny CLIP file in open_clip's
layout, a tiny exported student with inherited CLIP heads, the models
written by ``tools/misc/init_checkpoint.py`` (no training) and evaluated by
mmpretrain's and mmseg's own installed ``tools/test.py`` on the tiny
ImageNet / ADE20K layouts."""
from __future__ import annotations

import os.path as osp
import re

import pytest
import torch

from kiv.testing.paths import REPO
from kiv.testing.tools import run_python, run_tool

CLS_CFG = osp.join(REPO, 'configs', 'mmpretrain',
                   'kiv-adapter-vit-t14_zero-shot_tiny-in1k.py')
SEG_CFG = osp.join(REPO, 'configs', 'mmseg',
                   'text-seg_kiv-adapter-vit-t14_zero-shot_tiny-ade20k-'
                   '48x48.py')


def _installed_test_tool(package: str) -> str:
    """The ``tools/test.py`` an mm toolbox installs (its ``.mim``)."""
    module = __import__(package)
    path = osp.join(osp.dirname(module.__file__), '.mim', 'tools',
                    'test.py')
    assert osp.isfile(path), f'{package} ships no tools/test.py: {path}'
    return path


def _ok(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope='module')
def zero_shot_files(tmp_path_factory):
    """Tiny data, a tiny CLIP file, a tiny student with inherited heads."""
    from kiv.testing import make_tiny_ade20k, make_tiny_imagenet
    from kiv.testing.tiny_clip import (write_tiny_clip,
                                       write_tiny_student_with_heads)
    root = tmp_path_factory.mktemp('zero_shot')
    make_tiny_imagenet(str(root / 'data' / 'imagenet'))
    make_tiny_ade20k(str(root / 'data' / 'ade'))
    clip = str(root / 'open_clip_model.safetensors')
    write_tiny_clip(clip)
    student = str(root / 'student.pth')
    write_tiny_student_with_heads(student)
    return dict(root=str(root), clip=clip, student=student)


def _options(head: str, embeddings: str, student: str) -> list[str]:
    return ['--cfg-options', f'model.{head}.embeddings={embeddings}',
            f'model.{head}.inherited={student}',
            f'model.backbone.init_cfg.checkpoint={student}']


@pytest.mark.slow
def test_zero_shot_classification_config(zero_shot_files):
    """Text tool -> init_checkpoint -> mmpretrain's tools/test.py."""
    from kiv.apis.init_checkpoint import write_init_checkpoint
    from kiv.fileio.text_embeddings import load_text_embeddings
    from kiv.utils.checkpoint import safe_torch_load
    files, root = zero_shot_files, zero_shot_files['root']
    names = osp.join(root, 'in1k_names.txt')
    with open(names, 'w', encoding='utf-8') as f:
        f.write('goldfish\ntabby cat\n')
    emb = osp.join(root, 'in1k_text.safetensors')
    out = _ok(run_tool(['misc/text_embeddings.py', '--tower', files['clip'],
                        '--classes', names, '--templates', 'simple',
                        '--width', '32', '--out', emb], root))
    assert 'wrote 2 classes x 1 templates, width 32' in out
    options = _options('head', emb, files['student'])
    ckpt = osp.join(root, 'zero_shot_cls.pth')
    write_init_checkpoint(CLS_CFG, ckpt, dict(
        o.split('=', 1) for o in options[1:]))
    state = safe_torch_load(ckpt)['state_dict']
    # the fixed parts came from their files, not from an initialiser
    assert torch.equal(state['head.text_embeddings'],
                       load_text_embeddings(emb).embeddings)
    heads = safe_torch_load(files['student'])['inherited_heads']
    for key in ('fc1.weight', 'fc2.weight'):
        assert torch.equal(state[f'head.path.head.{key}'],
                           heads[f'summary_heads.clip.{key}'])
    assert torch.equal(state['backbone.spm.conv2.conv.weight'],
                       safe_torch_load(files['student'])['state_dict']
                       ['spm.conv2.conv.weight'])
    out = _ok(run_python([_installed_test_tool('mmpretrain'), CLS_CFG, ckpt,
                          '--work-dir', osp.join(root, 'cls')] + options,
                         root))
    top = re.search(r'accuracy/top1: ([\d.]+)\s+accuracy/top2: ([\d.]+)',
                    out)
    assert top, out[-2000:]
    assert float(top.group(2)) == 100.0  # 2 classes: top-2 is everything


@pytest.mark.slow
def test_open_vocabulary_segmentation_config(zero_shot_files):
    """init_checkpoint tool -> mmseg's tools/test.py, ADE20K mIoU."""
    from kiv.apis.clip_text import write_text_embeddings
    files, root = zero_shot_files, zero_shot_files['root']
    emb = osp.join(root, 'ade_text.safetensors')
    write_text_embeddings(files['clip'], emb, ['wall', 'building'],
                          ['a photo of a {}.'], width=32)
    options = _options('decode_head', emb, files['student'])
    ckpt = osp.join(root, 'zero_shot_seg.pth')
    out = _ok(run_tool(['misc/init_checkpoint.py', SEG_CFG, ckpt] + options,
                       root))
    assert f'wrote {ckpt}' in out
    out = _ok(run_python([_installed_test_tool('mmseg'), SEG_CFG, ckpt,
                          '--work-dir', osp.join(root, 'seg')] + options,
                         root))
    miou = re.search(r'mIoU: ([\d.]+)', out)
    assert miou and 0.0 <= float(miou.group(1)) <= 100.0, out[-2000:]
    assert re.search(r'\|\s+wall\s+\|', out) and \
        re.search(r'\|\s+building\s+\|', out), out[-2000:]
