"""Inherited heads against their teachers (no downstream training).

Student -> student-to-teacher head -> inverse standardisation gives
features in a teacher's own space; the teacher's own head then does the
teacher's task (:meth:`kiv.Teacher.forward_head`). Measured here per
distilled model:

Each inherited head is also scored against the ground truth of the
validation scenes (top-1, box / mask AP, mIoU), next to its teacher.

* classification (the classification teacher's world classifier ``_fc``
  on EfficientNet-Lite0): top-1
  and top-5 agreement with the teacher on in-distribution held-out images
  (new views of the distillation images, the world's validation scenes)
  and, separately, on crops of real photos never used in training; next to
  two baselines that know nothing about the image: always the teacher's
  most frequent class (its top-5 most frequent classes for top-5) and the
  teacher's head applied to the mean summary ``mu`` (what a collapsed
  student answers);
* segmentation (the segmenter's per-pixel logits are its dense target):
  mIoU of the inherited logits' arg-max against the teacher's arg-max on
  the world's validation scenes;
* detection (the detector's FPN maps are its targets): the teacher's own
  RPN + RoI heads on the inherited FPN maps, box AP against the teacher's
  own detections (score >= 0.5) on the validation scenes.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os.path as osp
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch import Tensor

from kiv.structures import FeatureOutput
from .probes import bootstrap_ci, coco_bootstrap

__all__ = ['load_distiller', 'teacher_sizes', 'inherited_outputs',
           'cls_agreement', 'trivial_cls_agreement',
           'seg_agreement', 'seg_vs_ground_truth', 'det_agreement']


def load_distiller(cfg: Config, checkpoint: str) -> torch.nn.Module:
    """Build a ``kiv.KnowledgeInheritance`` with its online teachers and
    load a training checkpoint (student and latent space; the multi-task
    heads are not needed here and not built).

    Args:
        cfg (Config): the run's config (real teachers, not cached ones).
        checkpoint (str): the run's checkpoint (``state_dict`` inside).

    Returns:
        nn.Module: the model in eval mode.
    """
    from kiv.registry import MODELS
    from kiv.utils.state_dict import read_state_dict
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('task_heads', None)
    model = MODELS.build(model_cfg)
    state = read_state_dict(checkpoint)
    model.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith('task_heads.')})
    return model.eval()


@torch.no_grad()
def teacher_sizes(teacher: torch.nn.Module,
                  image_hw: Sequence[int]) -> list[tuple[int, int]]:
    """Grid ``(h, w)`` of every dense level of a teacher for an image size
    (one dry run on a zero image)."""
    out = teacher(torch.zeros(1, 3, *image_hw))
    return [tuple(f.shape[-2:]) for f in out.features]


@torch.no_grad()
def inherited_outputs(model: torch.nn.Module, images: Tensor,
                      teachers: Sequence[str],
                      sizes: dict[str, list]) -> dict[str, FeatureOutput]:
    """The inherited models' outputs in each teacher's raw space.

    Args:
        model (nn.Module): a ``kiv.KnowledgeInheritance``.
        images (Tensor): ``(B, 3, H, W)`` RGB in [0, 255].
        teachers (Sequence[str]): teacher names.
        sizes (dict[str, list]): per teacher the grid of each level.

    Returns:
        dict[str, FeatureOutput]: per teacher, student -> s2t head ->
        inverse standardisation (``SharedLatentSpace.inherited``).
    """
    student = model.extract_student(images)
    return {t: model.latent.inherited(student, t, sizes[t])
            for t in teachers}


def _agreement(ref_top1: Tensor, ranked: Tensor, seed: int) -> dict:
    """Top-1 / top-5 agreement (%) with bootstrap intervals."""
    top1 = (ranked[:, 0] == ref_top1).double() * 100
    top5 = (ranked[:, :5] == ref_top1[:, None]).any(1).double() * 100
    return dict(top1=bootstrap_ci(top1.tolist(), seed=seed),
                top5=bootstrap_ci(top5.tolist(), seed=seed), n=len(top1))


def cls_agreement(ref_logits: Tensor, logits: Tensor, seed: int = 0) -> dict:
    """Agreement of inherited logits with the teacher's.

    Args:
        ref_logits (Tensor): ``(N, K)`` teacher logits.
        logits (Tensor): ``(N, K)`` the teacher's head on the inherited
            summaries.
        seed (int): bootstrap seed.

    Returns:
        dict: ``top1`` / ``top5`` as ``(value, low, high)`` and ``n``.
    """
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return _agreement(ref_logits.argmax(1), ranked, seed)


def trivial_cls_agreement(ref_logits: Tensor, mean_logits: Tensor,
                          seed: int = 0) -> dict:
    """The two image-blind baselines of :func:`cls_agreement`.

    Args:
        ref_logits (Tensor): ``(N, K)`` teacher logits on the set.
        mean_logits (Tensor): ``(K,)`` the teacher's head on the mean
            summary ``mu``.
        seed (int): bootstrap seed.

    Returns:
        dict: ``majority`` (always the teacher's most frequent classes on
        this set: an upper bound for any constant answer) and ``mean``
        (the head on ``mu``), each as :func:`cls_agreement`.
    """
    ref = ref_logits.argmax(1)
    counts = torch.bincount(ref, minlength=ref_logits.shape[1])
    frequent = counts.argsort(descending=True, stable=True)[:5]
    mean_rank = mean_logits.topk(5).indices
    n = len(ref)
    return dict(majority=_agreement(ref, frequent.expand(n, -1), seed),
                mean=_agreement(ref, mean_rank.expand(n, -1), seed))


def _areas(pred: Tensor, ref: Tensor, num_classes: int
           ) -> dict[str, np.ndarray]:
    """Per-image intersection, union, prediction and reference areas
    ``(N, K)`` (what mmseg's ``IoUMetric`` keeps per image)."""
    out = {k: np.zeros((len(pred), num_classes))
           for k in ('intersect', 'union', 'pred', 'label')}
    for c in range(num_classes):
        p, r = (pred == c).flatten(1), (ref == c).flatten(1)
        out['intersect'][:, c] = (p & r).sum(1).numpy()
        out['union'][:, c] = (p | r).sum(1).numpy()
        out['pred'][:, c] = p.sum(1).numpy()
        out['label'][:, c] = r.sum(1).numpy()
    return out


def seg_agreement(ref_logits: Tensor, logits: Tensor, out_file: str,
                  seed: int = 0) -> dict:
    """mIoU (%) of inherited segmentation logits against the teacher's
    own arg-max, with a bootstrap interval over images.

    Args:
        ref_logits (Tensor): ``(N, K, h, w)`` teacher logits.
        logits (Tensor): ``(N, K, h, w)`` inherited logits.
        out_file (str): ``.npz`` for the per-image areas.
        seed (int): bootstrap seed.

    Returns:
        dict: ``miou`` ``(value, low, high)``, ``pixel_agreement`` (%).
    """
    from .probes import miou_bootstrap
    ref, pred = ref_logits.argmax(1), logits.argmax(1)
    np.savez(out_file, **_areas(pred, ref, ref_logits.shape[1]))
    return dict(miou=miou_bootstrap(out_file, seed=seed),
                pixel_agreement=float((ref == pred).double().mean() * 100))


def seg_vs_ground_truth(logits: Tensor, gt_maps: Sequence[str],
                        out_file: str, seed: int = 0) -> dict:
    """mIoU (%) of segmentation logits against the annotations, as mmseg
    scores a segmenter: logits resized (bilinear) to the label map, arg-max,
    background (label 0, ``reduce_zero_label``) ignored.

    Args:
        logits (Tensor): ``(N, K, h, w)`` class logits (teacher or
            inherited).
        gt_maps (Sequence[str]): the ``N`` ADE20K-layout label maps (0 =
            background, ``k + 1`` = class ``k``).
        out_file (str): ``.npz`` for the per-image areas.
        seed (int): bootstrap seed.

    Returns:
        dict: ``miou`` ``(value, low, high)``.
    """
    import cv2

    from .probes import miou_bootstrap
    num_classes = logits.shape[1]
    areas = {k: np.zeros((len(gt_maps), num_classes))
             for k in ('intersect', 'union', 'pred', 'label')}
    for i, path in enumerate(gt_maps):
        gt = torch.from_numpy(
            cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.int64) - 1)
        pred = F.interpolate(logits[i:i + 1].float(), size=gt.shape,
                             mode='bilinear', align_corners=False
                             ).argmax(1)[0]
        valid = gt >= 0
        one = _areas(pred[valid][None], gt[valid][None], num_classes)
        for k in areas:
            areas[k][i] = one[k][0]
    np.savez(out_file, **areas)
    return dict(miou=miou_bootstrap(out_file, seed=seed))


def _det_results(model, feats: tuple, metas: list[dict],
                 masks: bool = True) -> list:
    """RPN + RoI predictions of an mmdet two-stage detector on FPN maps
    (given up to P5; P6 is max-pooled as mmdet's FPN does). The maps are
    made contiguous: mmcv's RoIAlign misreads channels-last memory.
    ``masks=False`` runs the box branch only (the boxes are the same: the
    metas' scale factor is 1)."""
    from mmdet.structures import DetDataSample
    samples = [DetDataSample(metainfo=m) for m in metas]
    feats = tuple(f.contiguous() for f in feats)
    if len(feats) < len(model.rpn_head.prior_generator.strides):
        feats = feats + (F.max_pool2d(feats[-1], 1, stride=2), )
    proposals = model.rpn_head.predict(feats, samples, rescale=False)
    if not masks:
        return model.roi_head.predict_bbox(
            feats, metas, proposals, rcnn_test_cfg=model.roi_head.test_cfg,
            rescale=True)
    return model.roi_head.predict(feats, proposals, samples, rescale=True)


def _to_coco(results: list, ids: Sequence[int], score_thr: float = 0.0,
             gt: bool = False, masks: bool = False) -> list[dict]:
    """mmdet predictions as COCO annotations (``gt``) or results (with
    RLE masks if ``masks``)."""
    from pycocotools import mask as mask_utils
    out = []
    for img_id, res in zip(ids, results):
        boxes = res.bboxes.cpu().numpy()
        rles = [None] * len(boxes)
        if masks:
            rles = [mask_utils.encode(np.asfortranarray(
                m.cpu().numpy().astype(np.uint8))) for m in res.masks]
        for box, label, score, rle in zip(boxes, res.labels.tolist(),
                                          res.scores.tolist(), rles):
            if score < score_thr:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            item = dict(image_id=int(img_id), category_id=int(label) + 1,
                        bbox=[x1, y1, x2 - x1, y2 - y1])
            if gt:
                item.update(id=len(out) + 1, iscrowd=0,
                            area=(x2 - x1) * (y2 - y1))
            else:
                item['score'] = float(score)
            if rle is not None:
                item['segmentation'] = dict(
                    size=rle['size'], counts=rle['counts'].decode('ascii'))
            out.append(item)
    return out


@torch.no_grad()
def det_agreement(model: torch.nn.Module, detector: torch.nn.Module,
                  images: Tensor, out_dir: str, classes: Sequence[str],
                  score_thr: float = 0.5, batch_size: int = 32,
                  seed: int = 0,
                  progress: Optional[Callable[[int, int], None]] = None,
                  gt_file: Optional[str] = None,
                  calibrated: bool = False) -> dict:
    """Box AP of the teacher's heads on inherited FPN maps, scored against
    the teacher's own detections (score >= ``score_thr``) as ground truth
    and, with ``gt_file``, box and mask AP against the real annotations.

    Args:
        model (nn.Module): a ``kiv.KnowledgeInheritance`` with teacher
            ``det`` (a detector's backbone + FPN).
        detector (nn.Module): that teacher's whole mmdet detector.
        images (Tensor): ``(N, 3, H, W)`` RGB in [0, 255].
        out_dir (str): where the ground-truth and result jsons go.
        classes (Sequence[str]): category names.
        score_thr (float): teacher detections kept as ground truth.
        batch_size (int): images per forward.
        seed (int): bootstrap seed.
        progress (callable, optional): ``progress(done, total)``.
        gt_file (str, optional): COCO annotations of ``images`` (image ids
            ``1..N`` in order).
        calibrated (bool): with ``gt_file``, also score the inherited FPN
            maps with kiv's label-free calibration
            (``SharedLatentSpace.calibrate``) against the annotations.

    Returns:
        dict: ``box_ap`` ``(value, low, high)`` against the teacher,
        ``teacher_boxes``, and with ``gt_file`` ``gt`` =
        ``{'box_ap', 'mask_ap'}`` of the inherited detector against the
        annotations (and ``calibrated_box_ap`` / ``calibrated_mask_ap``
        with ``calibrated``).
    """
    teacher = model.teachers['det']
    h, w = images.shape[-2:]
    sizes = teacher_sizes(teacher, (h, w))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
    ref_all, inh_all, cal_all = [], [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        metas = [dict(meta) for _ in range(len(x))]
        # the teacher's boxes are the reference: no masks needed
        ref_all += _det_results(detector, teacher(x).features, metas,
                                masks=False)
        inh = inherited_outputs(model, x, ['det'], {'det': sizes})['det']
        inh_all += _det_results(detector, inh.features, metas)
        if calibrated:
            cal_all += _det_results(
                detector, model.latent.calibrate(inh, 'det').features, metas)
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    ids = list(range(1, len(images) + 1))
    gt = dict(images=[dict(id=i, width=int(w), height=int(h)) for i in ids],
              annotations=_to_coco(ref_all, ids, score_thr, gt=True),
              categories=[dict(id=k + 1, name=c)
                          for k, c in enumerate(classes)])
    teacher_file = osp.join(out_dir, 'det_teacher_as_gt.json')
    res_file = osp.join(out_dir, 'det_inherited.bbox.json')
    with open(teacher_file, 'w', encoding='utf-8') as f:
        json.dump(gt, f)
    with open(res_file, 'w', encoding='utf-8') as f:
        json.dump(_to_coco(inh_all, ids), f)
    with contextlib.redirect_stdout(io.StringIO()):
        box = coco_bootstrap(teacher_file, res_file, 'bbox', seed=seed)
    out = dict(box_ap=box, teacher_boxes=len(gt['annotations']))
    if gt_file is not None:
        scores = {}
        runs = [('', 'inherited', inh_all)]
        if calibrated:
            runs.append(('calibrated_', 'calibrated', cal_all))
        for prefix, name, results in runs:
            res = _to_coco(results, ids, masks=True)
            for kind, iou in (('box', 'bbox'), ('mask', 'segm')):
                path = osp.join(out_dir, f'det_{name}_vs_gt.{iou}.json')
                with open(path, 'w', encoding='utf-8') as f:
                    json.dump(res if iou == 'segm' else
                              [{k: v for k, v in r.items()
                                if k != 'segmentation'} for r in res], f)
                with contextlib.redirect_stdout(io.StringIO()):
                    scores[f'{prefix}{kind}_ap'] = coco_bootstrap(
                        gt_file, path, iou, seed=seed)
        out['gt'] = scores
    return out
