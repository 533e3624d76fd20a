"""Class names and CLIP prompt templates for zero-shot heads.

The lists are the toolboxes' own, imported on demand (importing this module
imports no toolbox): ImageNet-1k's cleaned names from mmpretrain
(``IMAGENET_SIMPLE_CATEGORIES``, the names OpenAI's CLIP notebook uses),
COCO's 80 from mmdet's ``CocoDataset.METAINFO``, ADE20K's 150 from mmseg's
``ADE20KDataset.METAINFO``; CLIP's 80 ImageNet prompt templates from
mmpretrain's ``OPENAI_IMAGENET_PROMPT``. Row ``i`` of a text-embedding
file is class ``i`` of the dataset's labels.
"""
from __future__ import annotations

__all__ = ['CLASS_NAME_SETS', 'TEMPLATE_SETS', 'class_names', 'templates']

#: class-name sets, by name
CLASS_NAME_SETS = ('imagenet', 'coco', 'ade20k')
#: prompt-template sets, by name
TEMPLATE_SETS = ('imagenet', 'simple')


def class_names(name: str) -> list[str]:
    """The class names of a dataset, in label order.

    Args:
        name (str): one of :data:`CLASS_NAME_SETS`.

    Returns:
        list[str]: 1000 (ImageNet-1k), 80 (COCO) or 150 (ADE20K) names.

    Raises:
        ValueError: unknown name.
    """
    if name == 'imagenet':
        from mmpretrain.datasets.categories import IMAGENET_SIMPLE_CATEGORIES
        return list(IMAGENET_SIMPLE_CATEGORIES)
    if name == 'coco':
        from mmdet.datasets import CocoDataset
        return list(CocoDataset.METAINFO['classes'])
    if name == 'ade20k':
        from mmseg.datasets import ADE20KDataset
        return list(ADE20KDataset.METAINFO['classes'])
    raise ValueError(f'unknown class-name set {name!r}; known: '
                     f'{list(CLASS_NAME_SETS)} (or give a text file with '
                     'one name per line)')


def _openai_imagenet_prompts() -> list:
    """mmpretrain's ``OPENAI_IMAGENET_PROMPT`` (80 lambdas), read from its
    file: importing its package ``mmpretrain.models.multimodal`` registers
    mmpretrain's stand-ins for its transformers-based models, which clash
    in the registry when transformers is not installed."""
    import importlib.util
    import os.path as osp
    package = importlib.util.find_spec('mmpretrain')
    path = osp.join(osp.dirname(package.origin), 'models', 'multimodal',
                    'clip', 'utils.py')
    spec = importlib.util.spec_from_file_location('_mmpretrain_clip_prompts',
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.OPENAI_IMAGENET_PROMPT)


def templates(name: str) -> list[str]:
    """Prompt templates, ``'{}'`` standing for the class name.

    Args:
        name (str): ``'imagenet'`` (CLIP's 80 ImageNet templates) or
            ``'simple'`` (``'a photo of a {}.'``).

    Returns:
        list[str]: the templates.

    Raises:
        ValueError: unknown name.
    """
    if name == 'imagenet':
        return [prompt('{}') for prompt in _openai_imagenet_prompts()]
    if name == 'simple':
        return ['a photo of a {}.']
    raise ValueError(f'unknown template set {name!r}; known: '
                     f'{list(TEMPLATE_SETS)} (or give a text file with one '
                     'template per line, {} for the class name)')
