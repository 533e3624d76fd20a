"""The summary table ``tools/test.py`` prints at the end of a run."""
from __future__ import annotations

import numbers
from typing import Any

#: toolbox scope -> task name shown in the table
TASKS = {
    'mmpretrain': 'classification',
    'mmdet': 'detection',
    'mmseg': 'segmentation',
    'kiv': 'inheritance',
}


def format_summary_table(scope: str, dataset: str, metrics: dict,
                         checkpoint: str) -> str:
    """Render metrics as a markdown table, one row per scalar metric.

    Args:
        scope (str): the config's ``default_scope``.
        dataset (str): test dataset type, e.g. ``'CocoDataset'``.
        metrics (dict): what ``Runner.test()`` returned.
        checkpoint (str): evaluated checkpoint path.

    Returns:
        str: a markdown table (header + one row per metric), e.g. mmdet
        ``coco/bbox_mAP``, mmseg ``mIoU`` (percent), mmpretrain
        ``accuracy/top1`` (percent).
    """
    task = TASKS.get(scope, scope)
    rows = ['| task | dataset | metric | value | checkpoint |',
            '|---|---|---|---|---|']
    for key, value in metrics.items():
        value = _scalar(value)
        if value is not None:
            rows.append(f'| {task} | {dataset} | {key} | {value:.4f} '
                        f'| {checkpoint} |')
    return '\n'.join(rows)


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is one number (Python, NumPy or a
    one-element tensor / array), else None (per-class lists, strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Number):
        return float(value)
    if getattr(value, 'size', None) == 1 or (
            callable(getattr(value, 'numel', None)) and value.numel() == 1):
        return float(value.item())
    return None
