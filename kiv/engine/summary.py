"""The summary table ``tools/test.py`` prints at the end of a run."""
from __future__ import annotations

import numbers

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
        str: a markdown table (header + one row per metric).
    """
    task = TASKS.get(scope, scope)
    rows = ['| task | dataset | metric | value | checkpoint |',
            '|---|---|---|---|---|']
    for key, value in metrics.items():
        if isinstance(value, numbers.Number):
            rows.append(f'| {task} | {dataset} | {key} | {value:.4f} '
                        f'| {checkpoint} |')
    return '\n'.join(rows)
