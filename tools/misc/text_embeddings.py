#!/usr/bin/env python
"""Write CLIP text embeddings of class names for the zero-shot heads.

    python tools/misc/text_embeddings.py --tower FILE_OR_HF_DIR \
        --classes {imagenet,coco,ade20k,names.txt} \
        [--templates {imagenet,simple,templates.txt}] [--width 512] \
        --out checkpoints/clip_vit-b16_in1k_text.safetensors

The tower is read from a local file in an official layout (open_clip/OpenAI
state dict, OpenAI's TorchScript ``ViT-B-16.pt``, or a Hugging Face
``CLIPModel`` directory; see :mod:`kiv.apis.clip_text`); nothing is
downloaded. Each class gets the normalised mean of the normalised
embeddings of its prompts (CLIP's prompt ensemble).
"""
import argparse
import os.path as osp
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from kiv.apis.clip_text import (ClipTextTowerError,  # noqa: E402
                                write_text_embeddings)
from kiv.apis.launch import die, require_file  # noqa: E402
from kiv.datasets.class_names import (CLASS_NAME_SETS,  # noqa: E402
                                      TEMPLATE_SETS, class_names, templates)


def _lines(value: str, known: tuple, builtin, option: str) -> list[str]:
    """A built-in list by name, or the non-empty lines of a text file."""
    if value in known:
        return builtin(value)
    path = require_file(value, f'{option} file (or one of {list(known)})')
    with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        die(f'{option} file {path} has no names')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--tower', required=True,
                        help='CLIP weights file or HF CLIPModel directory')
    parser.add_argument('--classes', required=True,
                        help=f'{"/".join(CLASS_NAME_SETS)} or a text file, '
                        'one class name per line (label order)')
    parser.add_argument('--templates', default='imagenet',
                        help=f'{"/".join(TEMPLATE_SETS)} or a text file, '
                        'one template per line with {} for the name '
                        '(default: CLIP\'s 80 ImageNet templates)')
    parser.add_argument('--width', type=int, default=None,
                        help='expected embedding width (512 for ViT-B/16): '
                        'a tower of another width stops')
    parser.add_argument('--act', choices=('quick_gelu', 'gelu'),
                        help='text-tower activation (default: QuickGELU, '
                        'as OpenAI\'s weights; HF: its config)')
    parser.add_argument('--heads', type=int,
                        help='attention heads (default: width // 64)')
    parser.add_argument('--out', required=True,
                        help='text-embedding file (.safetensors)')
    args = parser.parse_args()
    if not osp.exists(args.tower):
        die(f'--tower {args.tower}: no such file or directory (a CLIP file '
            'in an official layout, see README "Zero-shot and '
            'open-vocabulary")')
    names = _lines(args.classes, CLASS_NAME_SETS, class_names, '--classes')
    prompts = _lines(args.templates, TEMPLATE_SETS, templates, '--templates')
    bad = [t for t in prompts if '{}' not in t]
    if bad:
        die(f'--templates: {bad[0]!r} has no {{}} for the class name')
    try:
        info = write_text_embeddings(args.tower, args.out, names, prompts,
                                     width=args.width, act=args.act,
                                     heads=args.heads)
    except ClipTextTowerError as err:
        die(str(err))
    print(f'wrote {info["classes"]} classes x {len(prompts)} templates, '
          f'width {info["width"]}, to {args.out}\ntower: {info["tower"]}')


if __name__ == '__main__':
    main()
