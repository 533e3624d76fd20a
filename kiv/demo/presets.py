"""Sizes of the demo runs: ``toy`` (tests), ``quick``, ``default``, ``full``.

Iterations are optimizer steps; batch sizes are per step. Costs are the
expected seconds per stage kind on 2 CPU cores, for the ETA only.
"""
from __future__ import annotations

import copy

__all__ = ['PRESETS', 'get_preset']

_DEFAULT = dict(
    world=dict(size=64, num_train=400, num_val=80, photo_crops=16,
               heldout_crops=32),
    # supervised teachers trained by the demo (mmdet / mmseg)
    teacher_det=dict(iters=100, batch=4),
    teacher_seg=dict(iters=100, batch=8),
    # the knowledge base ViT distilled from EfficientNet-Lite0
    knowledge_base=dict(iters=160, batch=16),
    # knowledge inheritance; the baseline gets the same iters x batch
    inherit=dict(iters=120, batch=16),
    # downstream heads on the frozen students (same budget for every row)
    probe_cls=dict(iters=100, batch=16),
    probe_det=dict(iters=80, batch=4),
    probe_seg=dict(iters=80, batch=8),
    effnet_size=160,
    ablations=False,
    pca_images=4,
)

PRESETS: dict[str, dict] = {'default': _DEFAULT}

PRESETS['full'] = copy.deepcopy(_DEFAULT)
PRESETS['full']['ablations'] = True

PRESETS['quick'] = copy.deepcopy(_DEFAULT)
PRESETS['quick'].update(
    world=dict(size=64, num_train=160, num_val=40, photo_crops=8,
               heldout_crops=16),
    teacher_det=dict(iters=30, batch=4),
    teacher_seg=dict(iters=30, batch=8),
    knowledge_base=dict(iters=50, batch=16),
    inherit=dict(iters=40, batch=16),
    probe_cls=dict(iters=40, batch=16),
    probe_det=dict(iters=30, batch=4),
    probe_seg=dict(iters=30, batch=8),
    effnet_size=128,
)

PRESETS['toy'] = copy.deepcopy(_DEFAULT)
PRESETS['toy'].update(
    world=dict(size=64, num_train=8, num_val=4, photo_crops=1,
               heldout_crops=2),
    teacher_det=dict(iters=2, batch=2),
    teacher_seg=dict(iters=2, batch=2),
    knowledge_base=dict(iters=2, batch=2),
    inherit=dict(iters=2, batch=2),
    probe_cls=dict(iters=2, batch=2),
    probe_det=dict(iters=2, batch=2),
    probe_seg=dict(iters=2, batch=2),
    effnet_size=64,
    ablations=False,
    pca_images=2,
)


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name``.

    Raises:
        KeyError: unknown preset, naming the known ones.
    """
    if name not in PRESETS:
        raise KeyError(f'unknown demo preset {name!r}; choose from '
                       f'{sorted(PRESETS)}')
    return copy.deepcopy(PRESETS[name])
