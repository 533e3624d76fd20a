"""The demo's table, curves and PCA feature maps (matplotlib, Agg)."""
from __future__ import annotations

import glob
import json
import os.path as osp
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ['COLUMNS', 'collect_table', 'table_markdown', 'render_table_png',
           'plot_curves', 'plot_pca', 'pca_rgb']

#: table columns: key -> (header, source)
COLUMNS = {
    'top1': 'top-1 (%) [mmpretrain]',
    'box_ap': 'box AP [mmdet]',
    'mask_ap': 'mask AP [mmdet]',
    'miou': 'mIoU [mmseg]',
    'agreement': 'EffNet-Lite0 top-1 agreement (%)',
}
_AGREEMENT_KEY = 'agreement/effnet/top1_agreement'


def collect_table(results: dict, rows: Sequence[str]) -> list[dict]:
    """One dict per row: ``row``, ``label`` and the :data:`COLUMNS` values
    (``None`` where a row has no such number).

    Agreement: student + its s2t head + EfficientNet-Lite0's own ``_fc`` vs
    EfficientNet-Lite0 on held-out photo crops; the knowledge base's comes
    from its own distillation heads; the baseline has no inherited head.
    """
    from .pipeline import ROWS
    table = []
    for row in rows:
        entry: dict[str, Any] = dict(row=row, label=ROWS[row][0])
        for task in ('cls', 'det', 'seg'):
            entry.update(results[f'probe_{task}_{row}']['table'])
        source = {'kb_alone': 'knowledge_base'}.get(row, row)
        agreement = results.get(source, {}).get('metrics', {}).get(
            _AGREEMENT_KEY) if source != 'baseline' else None
        entry['agreement'] = agreement
        table.append(entry)
    return table


def _fmt(value: float | None) -> str:
    return '—' if value is None else f'{value:.1f}'


def table_markdown(table: list[dict]) -> str:
    """The table as GitHub markdown."""
    head = '| model | ' + ' | '.join(COLUMNS.values()) + ' |'
    sep = '|---|' + '---:|' * len(COLUMNS)
    lines = [head, sep]
    for entry in table:
        lines.append(f"| {entry['label']} | " + ' | '.join(
            _fmt(entry[k]) for k in COLUMNS) + ' |')
    return '\n'.join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def render_table_png(table: list[dict], out: str) -> None:
    """The table as a PNG; the best value of each column in bold."""
    plt = _pyplot()
    cells = [[e['label']] + [_fmt(e[k]) for k in COLUMNS] for e in table]
    fig, ax = plt.subplots(figsize=(14, 0.6 + 0.45 * len(table)))
    ax.axis('off')
    tab = ax.table(cellText=cells,
                   colLabels=['model'] + [c.replace(' [', '\n[')
                                          for c in COLUMNS.values()],
                   loc='center', cellLoc='center')
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.scale(1, 1.9)
    for j, key in enumerate(COLUMNS, 1):
        values = [e[key] for e in table]
        known = [v for v in values if v is not None]
        if known:
            best = values.index(max(known))
            tab[best + 1, j].set_text_props(weight='bold')
    for (r, c), cell in tab.get_celld().items():
        if c == 0:
            cell.set_width(0.36)
        else:
            cell.set_width(0.128)
    fig.savefig(out, dpi=110, bbox_inches='tight')
    plt.close(fig)


def _read_scalars(path: str) -> list[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: Sequence[str], out: str) -> None:
    """Per-teacher loss and gradient share over training, per run.

    Reads ``<run>/scalars.json`` (mmengine LocalVisBackend records).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)),
                             squeeze=False)
    for (ax_loss, ax_share), run in zip(axes, runs):
        path = osp.join(run, 'scalars.json')
        records = _read_scalars(path) if osp.isfile(path) else []
        teachers = sorted({k[len('loss_'):].rsplit('_', 1)[0]
                           for r in records for k in r
                           if k.startswith('loss_') and (
                               k.endswith('_summary')
                               or k.endswith('_features'))})
        for t in teachers:
            pts = [(r['step'], r.get(f'loss_{t}_summary', 0.0) +
                    r.get(f'loss_{t}_features', 0.0)) for r in records
                   if f'loss_{t}_features' in r]
            if pts:
                ax_loss.plot(*zip(*pts), label=t)
            shares = [(r['step'], r[f'grad_share/{t}']) for r in records
                      if f'grad_share/{t}' in r]
            if shares:
                ax_share.plot(*zip(*shares), marker='o', label=t)
        ax_loss.set_title(f'{run}: per-teacher loss (summary + dense)')
        ax_loss.set_xlabel('iteration')
        ax_share.set_title(f'{run}: gradient share (shared student params)')
        ax_share.set_xlabel('iteration')
        ax_share.set_ylim(0, 1)
        for ax in (ax_loss, ax_share):
            if ax.lines:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def pca_rgb(maps: torch.Tensor) -> np.ndarray:
    """First three principal components of feature maps as RGB.

    Args:
        maps (Tensor): ``(N, C, H, W)``; one PCA is fitted over all ``N``
            images so colours are comparable across them.

    Returns:
        np.ndarray: ``(N, H, W, 3)`` float in [0, 1].
    """
    n, c, h, w = maps.shape
    x = maps.permute(0, 2, 3, 1).reshape(-1, c).double()
    x = x - x.mean(0)
    k = min(3, c)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(len(proj), 3 - k)], 1)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return proj.reshape(n, h, w, 3).float().numpy()


@torch.no_grad()
def plot_pca(cfg, run: str, out: str, num_images: int) -> None:
    """PCA maps of the student beside every teacher for a few images.

    Args:
        cfg (Config): the inheritance config of ``run`` (teachers are
            rebuilt from their weight files).
        run (str): the run's stage folder holding ``iter_<N>.pth``.
        out (str): PNG path.
        num_images (int): held-out photo crops and world val images each.
    """
    import cv2

    from kiv.utils.checkpoint import safe_torch_load
    from kiv.registry import MODELS
    plt = _pyplot()
    model = MODELS.build(cfg.model)
    ckpt = sorted(glob.glob(osp.join(run, 'iter_*.pth')))[-1]
    model.load_state_dict(safe_torch_load(ckpt)['state_dict'])
    model.eval()
    paths = sorted(glob.glob('world/photos/heldout/*.jpg'))[:num_images]
    paths += sorted(glob.glob('world/coco/val2017/*.jpg'))[:num_images]
    imgs = [cv2.cvtColor(cv2.resize(cv2.imread(p), (64, 64)),
                         cv2.COLOR_BGR2RGB) for p in paths]
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    columns = {'student (level 0)': model.extract_student(batch).features[0]}
    for name, teacher in model.teachers.items():
        columns[f'teacher {name}'] = teacher(batch).features[0]
    rgb = {k: pca_rgb(v) for k, v in columns.items()}
    ncol = 1 + len(rgb)
    fig, axes = plt.subplots(len(imgs), ncol,
                             figsize=(1.9 * ncol, 1.9 * len(imgs)),
                             squeeze=False)
    for i, img in enumerate(imgs):
        axes[i, 0].imshow(img)
        for j, (name, maps) in enumerate(rgb.items(), 1):
            axes[i, j].imshow(maps[i], interpolation='nearest')
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        if i == 0:
            axes[i, 0].set_title('image', fontsize=8)
        for ax in axes[i]:
            ax.axis('off')
    fig.suptitle('PCA of dense features (first 3 components as RGB)',
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
