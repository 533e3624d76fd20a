"""The demo's tables (95 % bootstrap intervals), verdict and figures."""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ['PROBE_COLUMNS', 'AGREEMENT_COLUMNS', 'GT_COLUMNS',
           'probe_table', 'budget_table', 'agreement_table',
           'inherited_gt_table', 'mse_table', 'table_markdown', 'verdict',
           'probe_check', 'write_report', 'plot_results', 'plot_curves',
           'plot_pca', 'pca_rgb']

#: probe table columns: key -> header
PROBE_COLUMNS = {
    'top1_logreg': 'top-1 (%) logistic regression',
    'top1_knn': 'top-1 (%) k-NN',
    'box_ap': 'box AP [mmdet]',
    'mask_ap': 'mask AP [mmdet]',
    'miou': 'mIoU [mmseg]',
}
#: inherited-head table columns: key -> header
AGREEMENT_COLUMNS = {
    'top1_in_dist': 'classifier top-1 agreement (%), in distribution',
    'top5_in_dist': 'classifier top-5 agreement (%), in distribution',
    'top1_photos': 'classifier top-1 agreement (%), held-out photos',
    'seg_miou': 'segmenter mIoU vs teacher',
    'det_box_ap': 'detector box AP vs teacher',
}
#: inherited heads against the ground truth: key -> header
GT_COLUMNS = {
    'top1': 'top-1 (%)',
    'box_ap': 'box AP',
    'mask_ap': 'mask AP',
    'miou': 'mIoU',
}
#: the four metrics of the target
TARGET = ('top1_logreg', 'box_ap', 'mask_ap', 'miou')
#: the dense metrics where the teachers must add to the knowledge base
DENSE = ('box_ap', 'mask_ap', 'miou')
#: an inherited head must reach this fraction of its teacher's score
INHERITED_SHARE = 0.7


def probe_table(results: dict, rows: Sequence[str]) -> list[dict]:
    """Rows of the probe table: the majority answer, the teachers with
    their own heads (ceiling), then ``rows``; each cell ``(value, low,
    high)`` or None."""
    from .recipes import ROWS
    table = [dict(row='trivial', label='always the majority class '
                  f'({results["trivial"]["majority_class"]}; mIoU: '
                  f'{results["trivial"]["seg_class"]})',
                  **results['trivial']['table'])]
    table.append(dict(row='teachers', label='ceiling: the purpose-specific '
                      'teachers with their own heads (trained on the '
                      "teachers' split)",
                      top1_logreg=results['teacher_cls']['table']['top1'],
                      **results['teacher_det']['table'],
                      **results['teacher_seg']['table']))
    for row in rows:
        entry: dict[str, Any] = dict(row=row, label=ROWS[row])
        for task in ('cls', 'det', 'seg'):
            entry.update(results[f'probe_{task}_{row}']['table'])
        table.append(entry)
    for entry in table:
        for key in PROBE_COLUMNS:
            entry.setdefault(key, None)
    return table


def _seconds(results: dict, *stages: str) -> float:
    times = results.get('_stages', {})
    return float(sum(times[s]['seconds'] for s in stages
                     if isinstance(times.get(s), dict)))


def budget_table(results: dict, rows: Sequence[str], preset: dict
                 ) -> list[dict]:
    """What each row consumed: labelled scenes, training samples (optimizer
    steps x batch) and CPU seconds of this run, its own and with the
    models it needs (teachers, knowledge base, caches).

    Returns:
        list[dict]: ``row``, ``label``, ``labels``, ``samples``,
        ``seconds``, ``seconds_total``.
    """
    from .recipes import KB_CACHE, CACHE, ROWS
    w, p = preset['world'], preset['inherit']
    teachers = ('teacher_det', 'teacher_seg', 'teacher_cls')
    kb = (KB_CACHE, 'knowledge_base')
    teacher_samples = sum(preset[t]['iters'] * preset[t]['batch']
                          for t in ('teacher_det', 'teacher_seg'))
    kb_samples = preset['knowledge_base']['iters'] * \
        preset['knowledge_base']['batch']
    out = [dict(row='teachers', label='the teachers (det, seg, cls)',
                labels=f"{w['num_teachers']} scenes (teachers' split)",
                samples=teacher_samples,
                seconds=_seconds(results, *teachers),
                seconds_total=_seconds(results, *teachers))]
    out.append(dict(row='knowledge_base', label='the knowledge base',
                    labels='none (EfficientNet-Lite0: ImageNet-1k)',
                    samples=kb_samples, seconds=_seconds(results, *kb),
                    seconds_total=_seconds(results, *kb)))
    for row in rows:
        label = ROWS[row]
        if row.startswith('inherit'):
            own = _seconds(results, row)
            out.append(dict(
                row=row, label=label,
                labels=f"{w['num_train']} scenes (user's split) + the "
                "teachers' and the knowledge base's knowledge",
                samples=p['iters'] * p['batch'], seconds=own,
                seconds_total=own + _seconds(results, *teachers, *kb,
                                             CACHE)))
        elif row.startswith('rival'):
            n = w['num_train'] if row == 'rival_user' else w['num_teachers']
            split = "user's" if row == 'rival_user' else "teachers'"
            own = _seconds(results, row)
            out.append(dict(row=row, label=label,
                            labels=f'{n} scenes ({split} split)',
                            samples=p['iters'] * p['labelled'], seconds=own,
                            seconds_total=own))
        elif row == 'kb_alone':
            out.append(dict(row=row, label=label,
                            labels='none (EfficientNet-Lite0: ImageNet-1k)',
                            samples=0, seconds=0.0,
                            seconds_total=_seconds(results, *kb)))
    return out


def agreement_table(results: dict, distilled: Sequence[str]) -> list[dict]:
    """Rows of the inherited-head table: the two image-blind baselines,
    then each distilled model."""
    from .recipes import ROWS
    first = results[f'agreement_{distilled[0]}']['trivial']
    table = []
    for kind, label in (('majority', "always the teacher's most frequent "
                         'class(es) on the set'),
                        ('mean', 'the head on the mean summary (collapsed '
                         'student)')):
        table.append(dict(
            row=kind, label=label,
            top1_in_dist=first['in_dist'][kind]['top1'],
            top5_in_dist=first['in_dist'][kind]['top5'],
            top1_photos=first['photos'][kind]['top1']))
    for row in distilled:
        res = results[f'agreement_{row}']
        label = 'knowledge base (its distillation heads)' \
            if row == 'knowledge_base' else ROWS[row]
        entry = dict(row=row, label=label,
                     top1_in_dist=res['cls']['in_dist']['top1'],
                     top5_in_dist=res['cls']['in_dist']['top5'],
                     top1_photos=res['cls']['photos']['top1'])
        if 'seg' in res:
            entry['seg_miou'] = res['seg']['miou']
        if 'det' in res:
            entry['det_box_ap'] = res['det']['box_ap']
        table.append(entry)
    for entry in table:
        for key in AGREEMENT_COLUMNS:
            entry.setdefault(key, None)
    return table


def inherited_gt_table(results: dict, distilled: Sequence[str]
                       ) -> list[dict]:
    """The inherited heads (student -> s2t head -> inverse standardisation
    -> the teacher's own head, no downstream labels) against the ground
    truth of the validation scenes, under the teachers' own scores.

    The teachers' row: the classifier's and the segmenter's own outputs
    scored by the same code as the inherited ones (``agreement_*``), the
    detector's by mmdet's test loop (``teacher_det``).
    """
    from .recipes import ROWS
    first = next((results[f'agreement_{r}']['gt'] for r in distilled
                  if 'teacher_miou' in results[f'agreement_{r}']['gt']),
                 results[f'agreement_{distilled[0]}']['gt'])
    det = results['teacher_det']['table']
    table = [dict(row='teachers', label='the teachers, own backbones and '
                  'heads', top1=first['teacher_top1'],
                  box_ap=det['box_ap'], mask_ap=det['mask_ap'],
                  miou=first.get('teacher_miou'))]
    for row in distilled:
        gt = results[f'agreement_{row}']['gt']
        label = 'knowledge base (its distillation heads; classifier only)' \
            if row == 'knowledge_base' else ROWS[row]
        table.append(dict(row=row, label=label, top1=gt['inherited_top1'],
                          box_ap=gt.get('inherited_box_ap'),
                          mask_ap=gt.get('inherited_mask_ap'),
                          miou=gt.get('inherited_miou')))
        if row != 'knowledge_base' and 'inherited_calibrated_top1' in gt:
            table.append(dict(
                row=f'{row}_calibrated', label=f'{ROWS[row]}, label-free '
                "calibration (per channel, the teacher's mean and spread; "
                "kiv.InheritedCalibrationHook on 256 views of the user's "
                'images)',
                top1=gt['inherited_calibrated_top1'],
                box_ap=gt.get('inherited_calibrated_box_ap'),
                mask_ap=gt.get('inherited_calibrated_mask_ap'),
                miou=gt.get('inherited_calibrated_miou')))
    for entry in table:
        for key in GT_COLUMNS:
            entry.setdefault(key, None)
    return table


def mse_table(runs: Sequence[str], window: int = 3) -> list[dict]:
    """Per-teacher standardised MSE at the end of each distillation run
    (mean of the last ``window`` logged values; 1.0 = predicting the mean
    target), from ``<run>/scalars.json``.

    Returns:
        list[dict]: ``run``, ``key`` (``<teacher>_<summary|features>``),
        ``first`` (the first logged value) and ``last``.
    """
    out = []
    for run in runs:
        path = osp.join(run, 'scalars.json')
        if not osp.isfile(path):
            continue
        records = _read_scalars(path)
        keys = sorted({k for r in records for k in r
                       if k.startswith('loss_') and k.rsplit('_', 1)[-1]
                       in ('summary', 'features')})
        for key in keys:
            values = [r[key] for r in records if key in r]
            if values:
                out.append(dict(run=run, key=key[len('loss_'):],
                                first=float(values[0]),
                                last=float(np.mean(values[-window:]))))
    return out


def _cell(value: Sequence[float] | None) -> str:
    if value is None or not np.isfinite(value[0]):
        return '—'
    v, lo, hi = value
    return f'{v:.1f} [{lo:.1f}, {hi:.1f}]'


def table_markdown(table: list[dict], columns: dict[str, str]) -> str:
    """A table as GitHub markdown, ``value [95 % interval]`` per cell."""
    lines = ['| model | ' + ' | '.join(columns.values()) + ' |',
             '|---|' + '---:|' * len(columns)]
    for entry in table:
        lines.append(f"| {entry['label']} | " + ' | '.join(
            _cell(entry[k]) for k in columns) + ' |')
    return '\n'.join(lines)


def _compare(a: Sequence[float], b: Sequence[float]) -> str:
    if a[1] > b[2]:
        return 'wins (intervals do not overlap)'
    if a[2] < b[1]:
        return 'loses (intervals do not overlap)'
    return 'intervals overlap: not resolved'


def verdict(probes: list[dict], agreement: list[dict],
            gt: list[dict]) -> list[str]:
    """Plain-language verdict on the three targets, from the intervals:
    the inherited student against the data-centric rival on the user's
    data (four metrics) and against the knowledge base alone (dense
    metrics), and each inherited head against its teacher's own score."""
    by_row = {e['row']: e for e in probes}
    lines = []
    inh = by_row.get('inherit')
    for other, keys, name in (('rival_user', TARGET, "data-centric rival "
                               "on the user's data"),
                              ('kb_alone', DENSE, 'knowledge base alone'),
                              ('rival_teachers', TARGET, "data-centric on "
                               "the teachers' labels (for reference)")):
        if inh is None or other not in by_row:
            continue
        lines.append(f'- inherited student vs {name}:')
        for key in keys:
            a, b = inh[key], by_row[other][key]
            lines.append(f'  - {PROBE_COLUMNS[key]}: {a[0]:.1f} vs '
                         f'{b[0]:.1f} ({a[0] - b[0]:+.1f}): {_compare(a, b)}')
    gt_rows = {e['row']: e for e in gt}
    if 'inherit' in gt_rows and 'teachers' in gt_rows:
        lines.append(f'- inherited heads against the ground truth, no '
                     f'downstream labels (target: >= '
                     f'{INHERITED_SHARE:.0%} of the teacher\'s score):')
        for key, title in GT_COLUMNS.items():
            t = gt_rows['teachers'][key]
            for row, how in (('inherit', ''),
                             ('inherit_calibrated', ', calibrated')):
                a = gt_rows.get(row, {}).get(key)
                if a is None or t is None:
                    continue
                share = a[0] / t[0] if t[0] > 0 else float('nan')
                state = 'reached' if share >= INHERITED_SHARE else 'missed'
                lines.append(f'  - {title}{how}: {a[0]:.1f} vs the '
                             f'teacher\'s {t[0]:.1f} ({share:.0%}): {state}')
    agr = {e['row']: e for e in agreement}
    if 'inherit' in agr and 'majority' in agr:
        a = agr['inherit']['top1_in_dist']
        m = agr['majority']['top1_in_dist']
        mean = agr['mean']['top1_in_dist']
        lines.append(
            f'- inherited classifier, in distribution: top-1 agreement with '
            f'its teacher {a[0]:.1f} % [{a[1]:.1f}, {a[2]:.1f}] vs '
            f'{m[0]:.1f} % always the most frequent class and {mean[0]:.1f}'
            f' % for the head on the mean summary')
    return lines


def probe_check(results: dict, rows: Sequence[str]) -> list[str]:
    """Can the det / seg probes be trusted? Whether they separate a strong
    backbone (the detection teacher's own pyramid) from a weak one (random
    weights) by more than their intervals, and whether at twice the steps
    they order the rows the same way (``probe_<task>_x2_<row>`` stages):
    the pairs of rows whose order flips, if any."""
    lines = []
    for task, keys in (('det', ('box_ap', 'mask_ap')), ('seg', ('miou', ))):
        for key in keys:
            strong = results[f'probe_{task}_check_strong']['table'][key]
            weak = results[f'probe_{task}_check_weak']['table'][key]
            state = 'separates them' if strong[1] > weak[2] else \
                'does NOT separate them'
            lines.append(f'- probe check, {PROBE_COLUMNS[key]}: strong '
                         f'backbone {_cell(strong)} vs weak {_cell(weak)}: '
                         f'the probe {state}')
    for task, keys in (('det', ('box_ap', 'mask_ap')), ('seg', ('miou', ))):
        for key in keys:
            once = {r: results[f'probe_{task}_{r}']['table'][key][0]
                    for r in rows}
            twice = {r: results[f'probe_{task}_x2_{r}']['table'][key][0]
                     for r in rows}
            flips = [f'{a} / {b}' for i, a in enumerate(rows)
                     for b in rows[i + 1:]
                     if (once[a] - once[b]) * (twice[a] - twice[b]) < 0]
            values = ', '.join(f'{r} {once[r]:.1f} -> {twice[r]:.1f}'
                               for r in rows)
            state = 'no pair of rows changes order' if not flips else \
                'order flips for ' + '; '.join(flips)
            lines.append(f'- {PROBE_COLUMNS[key]} with twice the probe steps:'
                         f' {state} ({values})')
    return lines


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_results(table: list[dict], out: str) -> None:
    """One panel per probe metric: every row's value with its 95 %
    interval, the majority-class baseline as a dashed line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PROBE_COLUMNS),
                             figsize=(4.2 * len(PROBE_COLUMNS),
                                      0.5 + 0.42 * len(table)),
                             sharey=True)
    labels = [e['label'] if len(e['label']) < 48 else e['label'][:46] + '…'
              for e in table]
    ys = np.arange(len(table))[::-1]
    for ax, (key, title) in zip(axes, PROBE_COLUMNS.items()):
        for y, entry in zip(ys, table):
            cell = entry[key]
            if cell is None or entry['row'] == 'trivial':
                continue
            v, lo, hi = cell
            colour = 'C3' if entry['row'] == 'inherit' else \
                'C0' if entry['row'] == 'rival_user' else \
                'C2' if entry['row'] == 'teachers' else 'C7'
            ax.errorbar(v, y, xerr=[[v - lo], [hi - v]], fmt='o',
                        color=colour, capsize=3)
        trivial = table[0][key]
        if trivial is not None:
            ax.axvline(trivial[0], color='k', ls='--', lw=1,
                       label='majority class')
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis='x')
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].legend(fontsize=7, loc='lower right')
    fig.suptitle('frozen-backbone probes on the world\'s validation scenes '
                 '(95 % bootstrap intervals)', fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _read_scalars(path: str) -> list[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def _grad_share_points(records: list[dict], teacher: str) -> list[tuple]:
    """``(step, share)`` of each gradient-share measurement of ``teacher``:
    mmengine's logger writes the latest value of a scalar at every logging
    step, so ``grad_share/<teacher>``, measured every ``n`` steps, repeats
    until the next measurement; each is kept once, at the first step that
    logged it (a new ``grad_share_iter``, the iteration the distiller
    measured it at)."""
    key = f'grad_share/{teacher}'
    points: list[tuple] = []
    last = None
    for r in records:
        if key in r and r.get('grad_share_iter') != last:
            last = r.get('grad_share_iter')
            points.append((r['step'], r[key]))
    return points


def plot_curves(runs: Sequence[str], out: str) -> None:
    """Per-teacher distillation loss and gradient share, task losses.

    Reads ``<run>/scalars.json`` (mmengine LocalVisBackend records).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.4 * len(runs)),
                             squeeze=False)
    for (ax_loss, ax_share), run in zip(axes, runs):
        path = osp.join(run, 'scalars.json')
        records = _read_scalars(path) if osp.isfile(path) else []
        keys = sorted({k for r in records for k in r})
        teachers = sorted({k[len('loss_'):].rsplit('_', 1)[0] for k in keys
                           if k.startswith('loss_') and k.rsplit('_', 1)[-1]
                           in ('summary', 'features', 'logits')})
        for t in teachers:
            parts = [k for k in keys if k.startswith(f'loss_{t}_')]
            pts = [(r['step'], sum(r.get(k, 0.0) for k in parts))
                   for r in records if any(k in r for k in parts)]
            if pts:
                ax_loss.plot(*zip(*pts), label=f'teacher {t}')
            shares = _grad_share_points(records, t)
            if shares:
                ax_share.plot(*zip(*shares), marker='o', label=t)
        for task in ('cls', 'det', 'seg'):
            parts = [k for k in keys if k.startswith(f'{task}.')
                     and 'loss' in k]
            pts = [(r['step'], sum(r.get(k, 0.0) for k in parts))
                   for r in records if any(k in r for k in parts)]
            if pts:
                ax_loss.plot(*zip(*pts), ls='--', label=f'task {task}')
        ax_loss.set_title(f'{run}: losses (per teacher: summary + dense)',
                          fontsize=9)
        ax_loss.set_xlabel('iteration')
        ax_loss.set_yscale('log')
        ax_share.set_title(f'{run}: share of the adapter\'s gradient norm',
                           fontsize=9)
        ax_share.set_xlabel('iteration')
        ax_share.set_ylim(0, 1)
        if len(teachers) < 2:
            ax_share.text(0.5, 0.5, 'one teacher: no share to measure',
                          ha='center', va='center', fontsize=9)
        for ax in (ax_loss, ax_share):
            if ax.lines:
                ax.legend(fontsize=7)
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
def plot_pca(preset: dict, out: str, size: int = 128) -> None:
    """PCA maps of EfficientNet-Lite0, the knowledge base, the inherited
    student and the data-centric rival on the user's data on the same real
    photos (never trained on)
    and world scenes, side by side.

    Args:
        preset (dict): the run's sizes.
        out (str): PNG path.
        size (int): side the photos are shown to the models at.
    """
    import cv2

    from kiv.registry import MODELS
    from .recipes import dense_space, effnet_teacher, probe_backbone_cfg
    from .probes import IMAGENET_MEAN, IMAGENET_STD
    from .world import HELDOUT_PHOTOS, load_photo, world_images
    plt = _pyplot()
    imgs = []
    for name in HELDOUT_PHOTOS + ('astronaut', ):
        img = load_photo(name)
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
        imgs.append(cv2.resize(img, (size, size),
                               interpolation=cv2.INTER_AREA))
    for path in world_images('world', 'val')[:max(0, preset['pca_images'] -
                                                  2)]:
        imgs.append(cv2.resize(cv2.imread(path), (size, size),
                               interpolation=cv2.INTER_LINEAR))
    rgb = np.stack([cv2.cvtColor(i, cv2.COLOR_BGR2RGB) for i in imgs])
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    effnet = effnet_teacher(preset)
    stride8 = effnet.feature_strides.index(8)
    columns = {'EfficientNet-Lite0\n(teacher, stride 8)':
               effnet(x).features[stride8]}
    norm = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for row, title in (('kb_alone', 'knowledge base'),
                       ('inherit', 'inherited student'),
                       ('rival_user', 'rival (scratch, user data)')):
        backbone = MODELS.build(probe_backbone_cfg(row))
        backbone.init_weights()
        backbone.eval()
        space = dense_space(row)
        where = 'stride 8' if space == 'student' else \
            f'{space} teacher\'s space, stride 8'
        columns[f'{title}\n({where})'] = \
            backbone.forward_features(norm).features[1]
    maps = {k: pca_rgb(v) for k, v in columns.items()}
    ncol = 1 + len(maps)
    fig, axes = plt.subplots(len(imgs), ncol,
                             figsize=(2.0 * ncol, 2.0 * len(imgs)),
                             squeeze=False)
    for i in range(len(imgs)):
        axes[i, 0].imshow(rgb[i])
        for j, (name, m) in enumerate(maps.items(), 1):
            axes[i, j].imshow(m[i], interpolation='nearest')
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        if i == 0:
            axes[i, 0].set_title('image', fontsize=8)
        for ax in axes[i]:
            ax.axis('off')
    fig.suptitle('PCA of dense features (first 3 components as RGB; one PCA '
                 'per model over all images)', fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _stage_times(results: dict) -> str:
    lines = ['| stage | seconds | |', '|---|---:|---|']
    for name, info in results.get('_stages', {}).items():
        if isinstance(info, dict):
            lines.append(f"| {name} | {info['seconds']:.0f} | "
                         f"{'cached' if info['cached'] else 'ran'} |")
    return '\n'.join(lines)


def _budget_markdown(budget: list[dict]) -> str:
    lines = ['| what | labels | training samples (steps x batch) | '
             'seconds (own) | seconds (with what it needs) |',
             '|---|---|---:|---:|---:|']
    for b in budget:
        lines.append(f"| {b['label']} | {b['labels']} | {b['samples']} | "
                     f"{b['seconds']:.0f} | {b['seconds_total']:.0f} |")
    return '\n'.join(lines)


def _mse_markdown(mse: list[dict]) -> str:
    lines = ['| run | teacher output | first logged | end of run |',
             '|---|---|---:|---:|']
    for m in mse:
        lines.append(f"| {m['run']} | {m['key']} | {m['first']:.3f} | "
                     f"{m['last']:.3f} |")
    return '\n'.join(lines)


def write_report(results: dict, rows: Sequence[str],
                 distilled: Sequence[str], preset: dict, ctx) -> dict:
    """Write ``report/``: ``tables.md`` (+ ``tables.json``), ``verdict.md``,
    ``stage_times.md``, ``results.png``, ``curves.png``, ``pca.png``.

    Returns:
        dict: the tables, the markdown and the verdict.
    """
    from .recipes import DENSE_TEACHER
    probes = probe_table(results, rows)
    budget = budget_table(results, rows, preset)
    agreement = agreement_table(results, distilled)
    gt = inherited_gt_table(results, distilled)
    mse = mse_table(distilled)
    w = results['world']['splits']
    n_cls = w['val']['cls_images']
    md = ('Frozen-backbone probes trained on the user\'s labelled split '
          f'({w["train"]["images"]} scenes), scored on the validation '
          f'scenes ({w["val"]["images"]} images; top-1 on {n_cls}: these '
          'and the classification-only ones; value [95 % bootstrap '
          'interval]). The det / seg probes of an inheritance run read its '
          f'maps in the {DENSE_TEACHER!r} teacher\'s space '
          '(`kiv.InheritedBackbone`), every other row its own pyramid; '
          'top-1 reads each row\'s summary:\n\n' +
          table_markdown(probes, PROBE_COLUMNS) +
          '\n\nLabels and compute per row (seconds of this run on this '
          'machine):\n\n' + _budget_markdown(budget) +
          '\n\nInherited heads against the ground truth of the validation '
          f'scenes (top-1 on {n_cls}; student -> s2t head -> inverse '
          'standardisation -> the teacher\'s own head; no downstream '
          'labels):\n\n' +
          table_markdown(gt, GT_COLUMNS) +
          '\n\nInherited heads against their teachers (in distribution = '
          'new views of the user\'s images + classification validation '
          'scenes):\n\n' +
          table_markdown(agreement, AGREEMENT_COLUMNS) +
          '\n\nStandardised MSE per teacher output (1.0 = predicting the '
          'mean target):\n\n' + _mse_markdown(mse))
    lines = verdict(probes, agreement, gt)
    if preset.get('probe_check'):
        lines += probe_check(results, rows[:3])  # the main rows
    d = ctx.dir
    with open(osp.join(d, 'tables.md'), 'w', encoding='utf-8') as f:
        f.write(md + '\n')
    with open(osp.join(d, 'verdict.md'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    with open(osp.join(d, 'stage_times.md'), 'w', encoding='utf-8') as f:
        f.write(_stage_times(results) + '\n')
    with open(osp.join(d, 'tables.json'), 'w', encoding='utf-8') as f:
        json.dump(dict(probes=probes, budget=budget, agreement=agreement,
                       inherited_gt=gt, mse=mse), f, indent=1)
    ctx.progress.update(0.1, 'results figure')
    plot_results(probes, osp.join(d, 'results.png'))
    plot_curves([r for r in ('knowledge_base', *distilled[1:])],
                osp.join(d, 'curves.png'))
    ctx.progress.update(0.4, 'PCA maps')
    plot_pca(preset, osp.join(d, 'pca.png'))
    return dict(probes=probes, budget=budget, agreement=agreement,
                inherited_gt=gt, mse=mse, markdown=md, verdict=lines)
