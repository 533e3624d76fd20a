"""Probes of frozen backbones and bootstrap confidence intervals.

The backbones in the demo's table are frozen, so their features are
computed once per row (:func:`extract_features`) and every probe reads
them:

* classification: multinomial logistic regression (full-batch L-BFGS) and
  cosine k-NN on the summary (:func:`fit_logistic`, :func:`knn_predict`),
  their regularisation / ``k`` chosen by a split of the *training* images;
* detection / instance and semantic segmentation: mmdet's Mask R-CNN and
  mmseg's Semantic FPN trained by the mmengine Runner on the cached pyramid
  (``kiv_demo.AttachFeatures`` puts the features of the right image and flip
  where the image would be; the model's backbone is
  ``kiv_demo.FeaturePassthrough``), evaluated by mmdet's ``CocoMetric`` and
  mmseg's ``IoUMetric`` (:class:`IoUMetricWithSamples` also keeps the
  per-image areas).

Every number gets a 95 % percentile bootstrap interval over the validation
images: :func:`bootstrap_ci` (per-image scores), :func:`coco_bootstrap`
(COCO AP re-accumulated from pycocotools' per-image matches) and
:func:`miou_bootstrap` (per-image intersections and unions).
"""
from __future__ import annotations

import json
import os.path as osp
import re
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import BaseTransform
from mmseg.evaluation import IoUMetric
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kiv.utils.atomic import atomic_path

from .registry import METRICS, TRANSFORMS

__all__ = [
    'extract_features', 'save_features', 'AttachFeatures',
    'IoUMetricWithSamples', 'fit_logistic', 'fit_linear_classifier',
    'logistic_path', 'knn_predict', 'cls_probe',
    'bootstrap_ci', 'coco_bootstrap', 'miou_bootstrap', 'image_index'
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# ------------------------------------------------------------- features ---
def load_rgb(paths: Sequence[str], size: Optional[int] = None) -> Tensor:
    """Images as a contiguous ``(N, 3, H, W)`` float RGB tensor in
    [0, 255] (contiguous: a channels-last batch keeps that layout through
    the convolutions, and mmcv's RoIAlign misreads it)."""
    imgs = []
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f'cannot read image {p}')
        if size is not None and img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        imgs.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float(
    ).contiguous()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, paths: Sequence[str],
                     flip: bool = False, batch_size: int = 64,
                     levels: int = 4,
                     progress: Optional[Callable[[int, int], None]] = None
                     ) -> dict[str, Tensor]:
    """Frozen-backbone features of images.

    Args:
        backbone (nn.Module): with ``forward_features`` (summary + pyramid)
            taking ImageNet-normalised RGB images.
        paths (Sequence[str]): image files.
        flip (bool): horizontally flip the images first.
        batch_size (int): images per forward.
        levels (int): pyramid levels kept (strides 4..32).
        progress (callable, optional): ``progress(done, total)``.

    Returns:
        dict[str, Tensor]: ``summary`` ``(N, C)`` float32 and ``level<l>``
        ``(N, C, h_l, w_l)`` float16.
    """
    backbone.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(paths), batch_size):
        x = load_rgb(paths[start:start + batch_size])
        if flip:
            x = x.flip(-1)
        out = backbone.forward_features((x - mean) / std)
        parts.setdefault('summary', []).append(out.summary.float())
        for lv in range(levels):
            parts.setdefault(f'level{lv}', []).append(
                out.features[lv].half())
        if progress is not None:
            progress(min(start + batch_size, len(paths)), len(paths))
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def save_features(path: str, tensors: dict[str, Tensor]) -> None:
    """Write features as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)


def load_tensor(path: str, key: str) -> Tensor:
    """One tensor of a safetensors file."""
    with safe_open(path, framework='pt') as f:
        return f.get_tensor(key)


def image_index(path: str) -> int:
    """The scene index encoded in a world file name (COCO
    ``000000000012.jpg``, ADE ``ADE_train_00000012.jpg``, ImageNet
    ``train_00012.JPEG``)."""
    found = re.search(r'(\d+)$', osp.splitext(osp.basename(path))[0])
    if found is None:
        raise ValueError(f'no image index in {path!r}')
    return int(found.group(1))


@TRANSFORMS.register_module()
class AttachFeatures(BaseTransform):
    """Replace a packed image by its cached frozen-backbone features.

    Put after the toolbox's packing transform (``PackDetInputs``,
    ``PackSegInputs``): the ground truth stays as the toolbox made it
    (flipped with the image), ``inputs`` becomes the tuple of pyramid maps
    of the same image, flipped or not (``metainfo['flip']``).

    With ``standardize``, every channel of every level is shifted and
    scaled by its mean and standard deviation over the file's ``train``
    split (images and positions; the user's labelled scenes, never the
    validation ones), as the logistic-regression probe does with summaries:
    a probe then reads any backbone's maps at one scale. Backbones differ by
    orders of magnitude there (a BN-normalised adapter pyramid, a teacher's
    raw FPN with a standard deviation of 10-16), and the probes' fixed
    learning rate and budget would otherwise favour some scales.

    Args:
        file (str): safetensors file of :func:`extract_features` outputs
            under ``<split>.level<l>`` / ``<split>_flip.level<l>``.
        split (str): ``'train'`` or ``'val'``.
        levels (int): pyramid levels. Defaults to 4.
        standardize (bool): per-channel standardisation with the train
            split's statistics. Defaults to False.
    """

    def __init__(self, file: str, split: str, levels: int = 4,
                 standardize: bool = False) -> None:
        self.file = file
        self.split = split
        self.levels = levels
        self.standardize = standardize
        self._cache: dict[str, Tensor] = {}

    def _get(self, key: str) -> Tensor:
        """The file's tensor ``key``, standardised once if asked (with the
        train split's statistics of its level)."""
        if key not in self._cache:
            x = load_tensor(self.file, key)
            if self.standardize:
                lv = key.rsplit('.level', 1)[1]
                train = x if key == f'train.level{lv}' else load_tensor(
                    self.file, f'train.level{lv}')
                train = train.float()
                x = (x.float() - train.mean((0, 2, 3), keepdim=True)) / \
                    train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
            self._cache[key] = x
        return self._cache[key]

    def transform(self, results: dict) -> dict:
        """Swap ``inputs`` for the features of the sample's image."""
        sample = results['data_samples']
        idx = image_index(sample.metainfo['img_path'])
        prefix = f'{self.split}_flip' if sample.metainfo.get('flip') \
            else self.split
        results['inputs'] = tuple(self._get(f'{prefix}.level{lv}')[idx]
                                  for lv in range(self.levels))
        return results


@METRICS.register_module()
class IoUMetricWithSamples(IoUMetric):
    """mmseg's ``IoUMetric`` that also saves the per-image areas.

    Args:
        samples_file (str): ``.npz`` written with ``intersect``, ``union``,
            ``pred`` and ``label`` ``(N, K)`` arrays (for
            :func:`miou_bootstrap`).
        **kwargs: ``IoUMetric`` arguments.
    """

    def __init__(self, samples_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.samples_file = samples_file

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Save the per-image areas, then mmseg's metrics."""
        arrays = [np.stack([r[i].cpu().numpy() for r in results])
                  for i in range(4)]
        np.savez(self.samples_file, intersect=arrays[0], union=arrays[1],
                 pred=arrays[2], label=arrays[3])
        return super().compute_metrics(results)


# ------------------------------------------------------ classification ---
#: L2 penalties the logistic regressions choose from
DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: folds of the cross-validation that chooses a probe's L2 penalty / k: a
#: single 20 % hold-out of the user's 160 labelled scenes is 32 scenes (one
#: scene = 3 points of accuracy), and its choices cost the probes up to 4
#: points on the teachers' split (docs/demo.md, "Probes")
CV_FOLDS = 5
#: the logistic regressions stop once no entry of the penalised loss's
#: gradient exceeds this (float64), or the loss changes by less than 1e-12:
#: the demo's fits get there in a few hundred L-BFGS iterations; a 1e-9
#: tolerance was never reached, and the weakest penalties stopped at an
#: iteration cap instead (docs/demo.md, "Runs 12 and 13")
GRAD_TOL = 1e-6


def _statistics(train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and standard deviation (at least 1e-6) of the
    training features ``(N, D)``."""
    return train.mean(0), train.std(0).clamp_min(1e-6)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """``train`` and ``others`` standardised with ``train``'s
    :func:`_statistics`."""
    mean, std = _statistics(train)
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(x: Tensor, y: Tensor, num_classes: int,
                 weight_decay: float, init: Optional[Tensor] = None,
                 max_iter: int = 1000) -> Tensor:
    """Multinomial logistic regression, full-batch L-BFGS (float64), run
    until no gradient entry exceeds :data:`GRAD_TOL` (or the loss changes
    by less than 1e-12).

    Args:
        x (Tensor): ``(N, D)`` standardised features.
        y (Tensor): ``(N,)`` labels.
        num_classes (int): classes.
        weight_decay (float): L2 penalty on the weights (not the bias).
        init (Tensor, optional): ``(D + 1, K)`` starting weights (a warm
            start, see :func:`logistic_path`); zeros by default.
        max_iter (int): L-BFGS iterations at most (a safety cap: the fits
            of the demo converge in a few hundred).

    Returns:
        Tensor: ``(D + 1, K)`` weights (last row: bias).
    """
    x = torch.cat([x.double(), x.new_ones(len(x), 1).double()], 1)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64) \
        if init is None else init.detach().double().clone()
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter,
                            max_eval=2 * max_iter, tolerance_grad=GRAD_TOL,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w, y) + 0.5 * weight_decay * \
            w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def logistic_path(x: Tensor, y: Tensor, num_classes: int,
                  decays: Sequence[float]) -> dict[float, Tensor]:
    """:func:`fit_logistic` for every L2 penalty, from the strongest to the
    weakest, each fit started from the previous one's solution (a
    regularisation path, as scikit-learn's ``LogisticRegressionCV``): the
    problems are strictly convex, so warm and cold starts reach the same
    optimum (to :data:`GRAD_TOL`), the warm ones in fewer L-BFGS iterations
    (0.85 of them on the classification teacher's features).

    Args:
        x (Tensor): ``(N, D)`` standardised features.
        y (Tensor): ``(N,)`` labels.
        num_classes (int): classes.
        decays (Sequence[float]): L2 penalties.

    Returns:
        dict[float, Tensor]: penalty -> ``(D + 1, K)`` weights, in the
        order of ``decays``.
    """
    path: dict[float, Tensor] = {}
    w = None
    for decay in sorted(decays, reverse=True):
        w = path[decay] = fit_logistic(x, y, num_classes, decay, init=w)
    return {decay: path[decay] for decay in decays}


def logistic_predict(w: Tensor, x: Tensor) -> Tensor:
    """Class scores of :func:`fit_logistic` weights."""
    x = torch.cat([x.double(), x.new_ones(len(x), 1).double()], 1)
    return x @ w


def knn_predict(train: Tensor, labels: Tensor, query: Tensor,
                num_classes: int, k: int, temperature: float = 0.07,
                exclude_self: bool = False) -> Tensor:
    """Weighted cosine k-NN (DINO's evaluation): class scores.

    Args:
        train (Tensor): ``(N, D)`` features.
        labels (Tensor): ``(N,)``.
        query (Tensor): ``(M, D)``.
        num_classes (int): classes.
        k (int): neighbours.
        temperature (float): votes weighted by ``exp(cos / T)``.
        exclude_self (bool): ``query`` is ``train`` (leave-one-out).

    Returns:
        Tensor: ``(M, K)`` scores.
    """
    a = F.normalize(train.float(), dim=1)
    b = F.normalize(query.float(), dim=1)
    sim = b @ a.T
    if exclude_self:
        sim.fill_diagonal_(-2.0)
    k = min(k, a.shape[0] - int(exclude_self))
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(b), num_classes)
    votes.scatter_add_(1, labels[idx], (top / temperature).exp())
    return votes


def _folds(n: int, folds: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``(fit, held-out)`` indices of each of ``folds`` random folds of
    ``n`` items (every item held out once)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = [perm[i::folds] for i in range(folds)]
    return [(torch.cat(held[:i] + held[i + 1:]), held[i])
            for i in range(folds)]


def _cross_validated(labels: Tensor, seed: int,
                     fold_predictions: Callable[[Tensor, Tensor],
                                                dict[Any, Tensor]]
                     ) -> dict[Any, float]:
    """Accuracy of every choice of a hyper-parameter, :data:`CV_FOLDS`-fold
    cross-validated on the training images.

    Args:
        labels (Tensor): ``(N,)`` training labels.
        seed (int): seed of the folds.
        fold_predictions (callable): ``(fit_idx, hold_idx)`` -> ``{choice:
            predicted labels of hold_idx}``, fitted on ``fit_idx`` only.

    Returns:
        dict: choice -> fraction of the ``N`` images predicted right when
        held out.
    """
    correct: dict[Any, int] = {}
    for fit_idx, hold_idx in _folds(len(labels), CV_FOLDS, seed):
        for choice, pred in fold_predictions(fit_idx, hold_idx).items():
            correct[choice] = correct.get(choice, 0) + int(
                (pred == labels[hold_idx]).sum())
    return {choice: c / len(labels) for choice, c in correct.items()}


def _choose_decay(train_x: Tensor, train_y: Tensor, num_classes: int,
                  seed: int, decays: Sequence[float]
                  ) -> tuple[float, dict[str, float]]:
    """The L2 penalty of the best cross-validated accuracy (ties: the
    stronger penalty)."""

    def fold_predictions(fit_idx: Tensor, hold_idx: Tensor) -> dict:
        fit_x, hold_x = _standardise(train_x[fit_idx], train_x[hold_idx])
        path = logistic_path(fit_x, train_y[fit_idx], num_classes, decays)
        return {wd: logistic_predict(w, hold_x).argmax(1)
                for wd, w in path.items()}

    accuracy = _cross_validated(train_y, seed, fold_predictions)
    best = max(decays, key=lambda d: (accuracy[d], d))
    return best, {str(k): v for k, v in accuracy.items()}


def fit_linear_classifier(train_x: Tensor, train_y: Tensor,
                          num_classes: int, seed: int = 0,
                          decays: Sequence[float] = DECAYS) -> dict:
    """A linear classifier on raw features: logistic regression on
    standardised features (L2 penalty chosen by cross-validation on the
    training images), folded back into one ``nn.Linear``.

    Args:
        train_x (Tensor): ``(N, D)`` features.
        train_y (Tensor): ``(N,)`` labels.
        num_classes (int): classes ``K``.
        seed (int): seed of the cross-validation folds.
        decays (Sequence[float]): L2 penalties tried.

    Returns:
        dict: ``weight`` ``(K, D)`` and ``bias`` ``(K,)`` float32 (logits =
        ``x @ weight.T + bias`` on raw features), ``weight_decay`` and the
        cross-validated accuracy of every penalty (``cv``).
    """
    train_x = train_x.float()
    best, cv = _choose_decay(train_x, train_y, num_classes, seed, decays)
    mean, std = _statistics(train_x)
    w = fit_logistic((train_x - mean) / std, train_y, num_classes, best)
    weight = (w[:-1] / std.double()[:, None]).T
    bias = w[-1] - (mean.double() / std.double()) @ w[:-1]
    return dict(weight=weight.float().contiguous(), bias=bias.float(),
                weight_decay=best, cv=cv)


def cls_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor,
              num_classes: int, seed: int = 0,
              decays: Sequence[float] = DECAYS,
              ks: Sequence[int] = (1, 5, 10, 20, 50)) -> dict:
    """Logistic-regression and k-NN probes, hyper-parameters chosen by
    :data:`CV_FOLDS`-fold cross-validation on the training images (never
    on ``val_x``).

    Returns:
        dict: ``logreg_pred`` / ``knn_pred`` (val predictions, lists),
        ``weight_decay``, ``k`` and the cross-validated accuracies of each
        choice (``cv_logreg``, ``cv_knn``).
    """
    train_x, val_x = train_x.float(), val_x.float()
    linear = fit_linear_classifier(train_x, train_y, num_classes, seed,
                                   decays)
    lr_pred = (val_x @ linear['weight'].T + linear['bias']).argmax(1)

    cv_knn = _cross_validated(train_y, seed, lambda fit_idx, hold_idx: {
        k: knn_predict(train_x[fit_idx], train_y[fit_idx], train_x[hold_idx],
                       num_classes, k).argmax(1) for k in ks})
    best_k = max(ks, key=lambda k: (cv_knn[k], -k))
    knn_pred = knn_predict(train_x, train_y, val_x, num_classes,
                           best_k).argmax(1)
    return dict(logreg_pred=lr_pred.tolist(), knn_pred=knn_pred.tolist(),
                weight_decay=linear['weight_decay'], k=best_k,
                cv_logreg=linear['cv'],
                cv_knn={str(k): v for k, v in cv_knn.items()})


# ------------------------------------------------------------ bootstrap ---
def _resamples(n: int, num: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(num, n))


def bootstrap_ci(scores: Sequence[float], num: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-image scores and its percentile bootstrap interval.

    Args:
        scores (Sequence[float]): one score per image (e.g. 0/100 correct).
        num (int): bootstrap resamples.
        seed (int): resampling seed.
        level (float): interval coverage.

    Returns:
        tuple[float, float, float]: ``(mean, low, high)``.
    """
    s = np.asarray(scores, np.float64)
    means = s[_resamples(len(s), num, seed)].mean(1)
    a = (1 - level) / 2
    return (float(s.mean()), float(np.quantile(means, a)),
            float(np.quantile(means, 1 - a)))


def miou_bootstrap(samples_file: str, num: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """mIoU (%) over images and its bootstrap interval from the per-image
    areas of :class:`IoUMetricWithSamples` (classes absent from a resample
    are left out of its mean, as mmseg does with NaN)."""
    data = np.load(samples_file)
    inter, union = data['intersect'], data['union']

    def miou(idx: np.ndarray) -> float:
        with np.errstate(invalid='ignore', divide='ignore'):
            iou = inter[idx].sum(0) / union[idx].sum(0)
        return float(np.nanmean(iou) * 100)

    n = len(inter)
    values = np.array([miou(i) for i in _resamples(n, num, seed)])
    a = (1 - level) / 2
    return (miou(np.arange(n)), float(np.quantile(values, a)),
            float(np.quantile(values, 1 - a)))


def _coco_ap(evals: list, cat_count: int, img_count: int, area_count: int,
             counts: np.ndarray, iou_thrs: np.ndarray, rec_thrs: np.ndarray,
             max_det: int, chunk: int = 50) -> np.ndarray:
    """pycocotools' ``accumulate`` (area 'all', ``max_det``) over multisets
    of images, all at once.

    A multiset is given by how many times it holds each image. An image
    drawn ``c`` times contributes its detections and its ground truth ``c``
    times, so every detection enters the cumulative true / false positive
    counts with weight ``c`` (0: not drawn); detections are ranked once
    per category (score, then image). This is ``accumulate`` on the
    concatenated multiset: copies of one detection are adjacent in its
    ranking and add no precision / recall point a recall threshold can
    land on that their last copy does not give.

    Args:
        evals (list): ``COCOeval.evalImgs`` (category-major, then area
            range, then image).
        cat_count (int): categories.
        img_count (int): images.
        area_count (int): area ranges (index 0 = 'all').
        counts (np.ndarray): ``(num, img_count)`` multiplicities.
        iou_thrs (np.ndarray): ``(T,)`` IoU thresholds.
        rec_thrs (np.ndarray): ``(R,)`` recall thresholds.
        max_det (int): detections per image kept.
        chunk (int): multisets per vectorised block (memory bound).

    Returns:
        np.ndarray: ``(num,)`` AP (mean precision over IoUs, recalls and
        the categories with ground truth in the multiset; NaN if none).
    """
    counts = np.asarray(counts, np.float64)
    total = np.zeros(len(counts))
    cats = np.zeros(len(counts))
    for k in range(cat_count):
        base = k * area_count * img_count
        present = [i for i in range(img_count) if evals[base + i] is not None]
        if not present:
            continue
        entries = [evals[base + i] for i in present]
        scores = np.concatenate([e['dtScores'][:max_det] for e in entries])
        image = np.concatenate([np.full(len(e['dtScores'][:max_det]), i)
                                for i, e in zip(present, entries)])
        order = np.argsort(-scores, kind='mergesort')
        dtm = np.concatenate([e['dtMatches'][:, :max_det] for e in entries],
                             axis=1)[:, order]
        dt_ig = np.concatenate([e['dtIgnore'][:, :max_det] for e in entries],
                               axis=1)[:, order]
        tps = np.logical_and(dtm, np.logical_not(dt_ig)).astype(np.float64)
        fps = np.logical_and(np.logical_not(dtm),
                             np.logical_not(dt_ig)).astype(np.float64)
        gt = np.array([np.count_nonzero(e['gtIgnore'] == 0) for e in entries],
                      np.float64)
        npig = counts[:, present] @ gt
        used = npig > 0
        image = image[order]
        for s in range(0, len(counts), chunk):
            rows = np.flatnonzero(used[s:s + chunk]) + s
            if not len(rows):
                continue
            w = counts[rows][:, image][:, None, :]
            tp = np.cumsum(w * tps, axis=2)
            fp = np.cumsum(w * fps, axis=2)
            rc = tp / npig[rows, None, None]
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.flip(np.maximum.accumulate(np.flip(pr, 2), axis=2), 2)
            prec = np.zeros(pr.shape[:2] + (len(rec_thrs), ))
            for j in range(pr.shape[0]):
                for t in range(pr.shape[1]):
                    inds = np.searchsorted(rc[j, t], rec_thrs, side='left')
                    valid = inds < pr.shape[2]
                    prec[j, t, valid] = pr[j, t, inds[valid]]
            total[rows] += prec.mean(axis=(1, 2))
            cats[rows] += 1
    with np.errstate(invalid='ignore'):
        return total / cats


def coco_bootstrap(gt_file: str, results_file: str, iou_type: str,
                   num: int = 500, seed: int = 0, level: float = 0.95
                   ) -> tuple[float, float, float]:
    """COCO AP (x100) and its bootstrap interval over images.

    pycocotools matches detections to ground truth per image once
    (``COCOeval.evaluate``); each resample re-accumulates AP from those
    per-image matches (images drawn with replacement), exactly as
    ``COCOeval.accumulate`` would on that multiset of images.

    Args:
        gt_file (str): COCO ground-truth json.
        results_file (str): COCO results json (e.g. mmdet ``CocoMetric``'s
            ``<outfile_prefix>.bbox.json``).
        iou_type (str): ``'bbox'`` or ``'segm'``.
        num (int): bootstrap resamples.
        seed (int): resampling seed.
        level (float): interval coverage.

    Returns:
        tuple[float, float, float]: ``(AP, low, high)`` in percent.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        with open(results_file, encoding='utf-8') as f:
            results = json.load(f)
        dt = gt.loadRes(results) if results else COCO()
        ev = COCOeval(gt, dt, iou_type)
        if results:
            ev.evaluate()
    p = ev.params
    n_img = len(p.imgIds)
    if not results:
        return 0.0, 0.0, 0.0
    args = (ev.evalImgs, len(p.catIds), n_img, len(p.areaRng))
    rest = (p.iouThrs, p.recThrs, p.maxDets[-1])
    draws = _resamples(n_img, num, seed)
    counts = np.zeros((num + 1, n_img))
    counts[0] = 1
    np.add.at(counts, (np.arange(1, num + 1)[:, None], draws), 1)
    values = _coco_ap(*args, counts, *rest) * 100
    point, values = float(values[0]), values[1:]
    a = (1 - level) / 2
    return (point, float(np.nanquantile(values, a)),
            float(np.nanquantile(values, 1 - a)))
