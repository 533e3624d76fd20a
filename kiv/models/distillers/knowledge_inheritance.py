"""The distiller: frozen teachers -> shared latent space -> adapter student.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.model import BaseModel, ModuleDict
from torch import Tensor

from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from kiv.utils import in_own_scope
from .teacher_cache import cached_teachers, fix_cache_statistics

#: default distillation losses (RADIOv2.5): MSE on PHI-S-standardised
#: targets for the summary and every dense level. PHI-S gives every teacher
#: output unit variance per channel, so MSE weighs teachers alike and, unlike
#: a cosine, also teaches the prediction's scale: de-standardised
#: predictions then land in the teacher's own space (inherited heads).
DEFAULT_LOSSES = dict(
    summary=dict(type='kiv.FeatureMatchingLoss', cosine_weight=0.0,
                 mse_weight=1.0),
    features=dict(type='kiv.FeatureMatchingLoss', cosine_weight=0.0,
                  mse_weight=1.0))

_LOSS_KEYS = ('summary', 'features', 'logits')

#: default data preprocessor: images stacked as float RGB in [0, 255]
#: (teachers and student normalise themselves)
DEFAULT_DATA_PREPROCESSOR = dict(type='ImgDataPreprocessor', bgr_to_rgb=True)


_TEACHER_PREFIX = 'teachers.'


def _drop_teacher_state(module: nn.Module, state_dict: dict, prefix: str,
                        local_metadata: dict) -> dict:
    """state_dict hook: leave the frozen teachers out of checkpoints."""
    for key in [k for k in state_dict
                if k.startswith(prefix + _TEACHER_PREFIX)]:
        del state_dict[key]
    return state_dict


def _ignore_missing_teachers(module: nn.Module, incompatible) -> None:
    """load_state_dict hook: teachers are not expected in checkpoints."""
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys
        if not k.startswith(_TEACHER_PREFIX)
    ]


@MODELS.register_module()
class KnowledgeInheritance(BaseModel):
    """Inherit a student from several frozen teachers (mmrazor-style split:
    teachers, connectors = the shared latent space, losses).

    The student is :class:`~kiv.models.backbones.AdapterViT`: the frozen
    general-purpose teacher's ViT plus a zero-initialised adapter. Each
    teacher's targets are standardised in the shared latent space and the
    student's summary and dense features are projected onto every teacher
    by its student-to-teacher heads.

    Logged every iteration: ``loss_<teacher>_summary``,
    ``loss_<teacher>_features`` (weighted). Every ``grad_share_interval``
    training iterations also ``grad_share/<teacher>``: the share of the
    gradient norm each teacher's loss sends into the shared (adapter)
    parameters, the measure of imbalanced transfer, with
    ``grad_share_iter``, the (1-based) iteration it was measured at
    (mmengine's logger repeats a scalar's latest value until it changes).

    Checkpoints hold the student, the latent space (heads and standardiser
    statistics) and the task heads, not the frozen teachers: teachers are
    rebuilt from their own weight files, so a ViT-B run with three teachers
    does not write their ~0.6 GB into every checkpoint.

    Args:
        student (dict): backbone config with ``forward_features`` returning
            :class:`~kiv.structures.FeatureOutput` (e.g. ``kiv.AdapterViT``).
        teachers (dict[str, dict]): teacher name -> ``kiv.Teacher`` config.
        base_teacher (str, optional): the general-purpose teacher whose
            architecture and weights the student inherits (recorded in the
            exported student's meta).
        latent (dict): ``kiv.SharedLatentSpace`` config without the
            dimensions, which are filled from the student and teachers.
        student_mean (Sequence[float]): student normalisation mean, 0-255
            RGB scale. Defaults to ImageNet's.
        student_std (Sequence[float]): student normalisation std.
        losses (dict, optional): ``summary`` and ``features`` loss configs
            used for every teacher, and optionally ``logits`` (e.g.
            ``dict(type='kiv.LogitDistillationLoss', temperature=2.0)``):
            logit distillation through the teacher's own kept head, for
            teachers with ``head=dict(input='summary')`` (others ignore
            it). Defaults to :data:`DEFAULT_LOSSES` (MSE on standardised
            targets); keys not given fall back to it.
        teacher_losses (dict[str, dict], optional): per-teacher overrides of
            ``losses`` (same keys; ``logits=None`` turns it off).
        teacher_weights (dict[str, float], optional): weight of each
            teacher's losses. Defaults to 1 for every teacher.
        task_heads (dict[str, dict], optional): multi-task heads trained on
            labelled samples jointly with distillation. Each entry:
            ``dict(head=<mmpretrain/mmseg/mmdet head cfg>, inputs='summary'
            | 'pyramid', gt_field='gt_label' | 'gt_sem_seg' |
            'gt_instances', loss_kwargs=dict(), weight=1.0)``; with
            per-teacher summaries ``summary=<name>`` picks the one a
            ``'summary'`` head reads (default: the student's first).
        summary_per_teacher (bool): when two or more teachers have a
            summary, each teacher's summary head reads a summary of its own
            (``student.summary_names`` must list exactly those teachers;
            the knowledge base's stays its CLS token at step 0). False
            shares one summary between all teachers (the ablation).
            Defaults to True.
        grad_share_interval (int): compute per-teacher gradient shares every
            this many training iterations (0 disables). Costs one extra
            backward pass per teacher on those iterations: with ``T``
            teachers about ``T * 0.7 / grad_share_interval`` of the
            training time (4 teachers at the default 100: under 3 %).
            Defaults to 100.
        teacher_cache (str, optional): a teacher-feature cache written by
            ``tools/cache_teachers.py`` from these teachers. Each teacher's
            config is checked against the cache, then a ``kiv.CachedTeacher``
            stands in for it, reading its outputs from the batch's
            ``kiv.TeacherCacheDataset`` samples (no teacher model is built,
            no teacher weight file opened), and the standardiser statistics
            are fixed here from the cache's exact ones. Cached configs
            (``configs/distill/*_cached.py``) set it, so they train from the
            cache under any entry point (docs/teacher_cache.md). Defaults to
            None: teachers online.
        data_preprocessor (dict, optional): defaults to stacking images as
            float RGB in [0, 255] (teachers and student normalise
            themselves).
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(self,
                 student: dict,
                 teachers: dict[str, dict],
                 latent: dict,
                 base_teacher: Optional[str] = None,
                 student_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 student_std: Sequence[float] = (58.395, 57.12, 57.375),
                 losses: Optional[dict] = None,
                 teacher_losses: Optional[dict[str, dict]] = None,
                 teacher_weights: Optional[dict[str, float]] = None,
                 task_heads: Optional[dict[str, dict]] = None,
                 summary_per_teacher: bool = True,
                 grad_share_interval: int = 100,
                 teacher_cache: Optional[str] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if data_preprocessor is None:
            data_preprocessor = copy.deepcopy(DEFAULT_DATA_PREPROCESSOR)
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if not teachers:
            raise ValueError('KnowledgeInheritance: `teachers` is empty')
        if base_teacher is not None and base_teacher not in teachers:
            raise KeyError(f'base_teacher {base_teacher!r} is not one of the '
                           f'teachers {sorted(teachers)}')
        self.base_teacher = base_teacher
        self.teachers = self._build_teachers(
            teachers, teacher_cache, latent, task_heads,
            heads=self.logit_teachers(teachers, losses, teacher_losses))
        self.student = MODELS.build(
            self._check_summary_names(student, summary_per_teacher))
        num_levels = len(getattr(self.student, 'feature_strides',
                                 (4, 8, 16, 32)))
        patch_level = getattr(self.student, 'patch_level', None)
        self.register_buffer('student_mean',
                             torch.tensor(student_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('student_std',
                             torch.tensor(student_std).view(1, 3, 1, 1),
                             persistent=False)

        latent = copy.deepcopy(latent)
        unknown = set(latent.get('teachers', None) or {}) - set(self.teachers)
        if unknown:
            raise KeyError(f'latent.teachers names unknown teachers '
                           f'{sorted(unknown)}; teachers are '
                           f'{sorted(self.teachers)}')
        latent_teachers = {}
        for name, t in self.teachers.items():
            cfg = dict(summary_dim=t.summary_dim,
                       feature_dims=list(t.feature_dims))
            if name == base_teacher:
                # knowledge preservation through the losses: the base's heads
                # start as its standardiser, its dense levels read the
                # student's own patch grid (no resize round trip)
                cfg['preserve'] = True
                if patch_level is not None:
                    cfg['student_levels'] = [patch_level] * len(
                        t.feature_dims)
            cfg.update(latent.get('teachers', {}).get(name, {}))
            latent_teachers[name] = cfg
        latent.update(
            student_summary_dim=self.student.embed_dim,
            student_feature_dims=[self.student.embed_dim] * num_levels,
            teachers=latent_teachers)
        self.latent = MODELS.build(latent)
        if teacher_cache is not None:
            self._fix_cache_statistics(teacher_cache)

        unknown = set(teacher_weights or {}) | set(teacher_losses or {})
        unknown -= set(self.teachers)
        if unknown:
            raise KeyError(f'teacher_weights/teacher_losses name unknown '
                           f'teachers {sorted(unknown)}; teachers are '
                           f'{sorted(self.teachers)}')
        self.teacher_weights = {
            name: float((teacher_weights or {}).get(name, 1.0))
            for name in self.teachers
        }
        self.summary_losses = nn.ModuleDict()
        self.feature_losses = nn.ModuleDict()
        self.logit_losses = nn.ModuleDict()
        loss_cfgs = self.loss_cfgs(self.teachers, losses, teacher_losses)
        for name, teacher in self.teachers.items():
            cfg = loss_cfgs[name]
            self.summary_losses[name] = MODELS.build(cfg['summary'])
            self.feature_losses[name] = MODELS.build(cfg['features'])
            if cfg.get('logits') is not None and \
                    teacher.head_layer is not None and \
                    teacher.head_input == 'summary':
                self.logit_losses[name] = MODELS.build(cfg['logits'])
            elif (teacher_losses or {}).get(name, {}).get('logits'):
                raise ValueError(
                    f'teacher_losses.{name}.logits needs the teacher to keep '
                    f"a summary head (head=dict(layer=..., input='summary'))")

        self.task_cfgs: dict[str, dict] = {}
        # mmengine's ModuleDict: init_weights() reaches the heads (e.g. the
        # bias priors of mmdet's classification heads)
        self.task_heads = ModuleDict()
        for name, cfg in (task_heads or {}).items():
            cfg = copy.deepcopy(cfg)
            self.task_heads[name] = MODELS.build(
                in_own_scope(cfg.pop('head')))
            cfg.setdefault('inputs', 'summary')
            cfg.setdefault('summary', None)
            names = getattr(self.student, 'summary_names', None) or ()
            if cfg['summary'] is not None and cfg['summary'] not in names:
                raise KeyError(f'task_heads.{name}.summary='
                               f"{cfg['summary']!r} is not one of the "
                               f'student summaries {list(names)}')
            cfg.setdefault('weight', 1.0)
            cfg.setdefault('loss_kwargs', {})
            if 'gt_field' not in cfg:
                raise KeyError(f'task_heads.{name} needs `gt_field` (e.g. '
                               "'gt_label', 'gt_sem_seg', 'gt_instances')")
            self.task_cfgs[name] = cfg
        self.grad_share_interval = int(grad_share_interval)
        self._train_iter = 0
        self._register_state_dict_hook(_drop_teacher_state)
        self.register_load_state_dict_post_hook(_ignore_missing_teachers)

    def _check_summary_names(self, student: dict,
                             per_teacher: bool) -> dict:
        """Check the student's per-teacher summaries against the teachers.

        Args:
            student (dict): the student config.
            per_teacher (bool): ``summary_per_teacher``.

        Returns:
            dict: the student config (unchanged).

        Raises:
            ValueError: the student's ``summary_names`` are not exactly the
                teachers with a summary (when two or more have one), or are
                given with ``summary_per_teacher=False``.
        """
        with_summary = [n for n, t in self.teachers.items()
                        if t.summary_dim is not None]
        if self.base_teacher in with_summary:  # the knowledge base first
            with_summary.remove(self.base_teacher)
            with_summary.insert(0, self.base_teacher)
        names = list(student.get('summary_names', None) or [])
        if not per_teacher:
            if names:
                raise ValueError(
                    f'student.summary_names={names} contradicts '
                    'summary_per_teacher=False (one shared summary)')
            return student
        if len(with_summary) < 2:
            if names and names != with_summary:
                raise ValueError(
                    f'student.summary_names={names} must name the teachers '
                    f'with a summary, {with_summary}')
            return student
        if sorted(names) != sorted(with_summary):
            missing = [n for n in with_summary if n not in names]
            unknown = [n for n in names if n not in with_summary]
            raise ValueError(
                f'teachers {with_summary} each have a summary: give the '
                f'student one per teacher, student.summary_names='
                f'{with_summary} (missing {missing}, not teachers with a '
                f'summary {unknown}), or set summary_per_teacher=False to '
                'share one summary between them')
        return student

    @staticmethod
    def logit_teachers(teachers: dict[str, dict], losses: Optional[dict],
                       teacher_losses: Optional[dict]) -> list[str]:
        """Teachers whose configs keep a summary head and whose losses
        include ``logits``: a cached stand-in keeps their head.

        Args:
            teachers (dict[str, dict]): teacher name -> config.
            losses (dict, optional): the distiller's ``losses``.
            teacher_losses (dict, optional): its per-teacher overrides.

        Returns:
            list[str]: those teachers' names.
        """
        cfgs = KnowledgeInheritance.loss_cfgs(teachers, losses,
                                              teacher_losses)
        names = []
        for name, cfg in teachers.items():
            head = cfg.get('head') if isinstance(cfg, dict) else None
            if cfgs[name].get('logits') is not None and head and \
                    head.get('input', 'summary') == 'summary':
                names.append(name)
        return names

    @staticmethod
    def loss_cfgs(teachers: Sequence[str], losses: Optional[dict],
                  teacher_losses: Optional[dict]) -> dict[str, dict]:
        """Every teacher's loss configs: :data:`DEFAULT_LOSSES`, updated by
        ``losses``, then by its ``teacher_losses`` entry.

        Args:
            teachers (Sequence[str]): teacher names.
            losses (dict, optional): the distiller's ``losses``.
            teacher_losses (dict, optional): its per-teacher overrides.

        Returns:
            dict[str, dict]: name -> ``{'summary', 'features'[, 'logits']}``
            configs (deep copies).

        Raises:
            KeyError: a key other than those of ``_LOSS_KEYS``.
        """
        out = {}
        for name in teachers:
            cfg = copy.deepcopy(DEFAULT_LOSSES)
            cfg.update(copy.deepcopy(losses or {}))
            cfg.update(copy.deepcopy((teacher_losses or {}).get(name, {})))
            unknown_keys = sorted(set(cfg) - set(_LOSS_KEYS))
            if unknown_keys:
                raise KeyError(f'losses for teacher {name!r} have unknown '
                               f'keys {unknown_keys}; allowed: '
                               f'{list(_LOSS_KEYS)}')
            out[name] = cfg
        return out

    def _build_teachers(self, teachers: dict[str, dict],
                        teacher_cache: Optional[str], latent: dict,
                        task_heads: Optional[dict[str, dict]],
                        heads: Sequence[str] = ()) -> nn.ModuleDict:
        """Build the teachers, or with a cache their cached stand-ins.

        Args:
            teachers (dict[str, dict]): teacher name -> ``kiv.Teacher``
                config.
            teacher_cache (str, optional): the cache to read them from.
            latent (dict): the latent-space config (its ``standardize`` must
                be the cache's).
            task_heads (dict, optional): must be empty with a cache.
            heads (Sequence[str]): teachers whose cached stand-in keeps the
                real teacher's head (logit distillation).

        Returns:
            nn.ModuleDict: name -> teacher; ``kiv.CachedTeacher`` for every
            teacher with ``teacher_cache`` (see
            :func:`kiv.models.distillers.teacher_cache.cached_teachers`).

        Raises:
            TeacherCacheError: the cache does not belong to the teachers
                (one message naming what differs), or task heads with a
                cache.
        """
        self.teacher_cache = teacher_cache
        if teacher_cache is not None:
            teachers = cached_teachers(
                teachers, teacher_cache,
                standardize=latent.get('standardize', 'phis'),
                task_heads=task_heads, keep_heads=heads)
        return nn.ModuleDict(
            {name: MODELS.build(cfg) for name, cfg in teachers.items()})

    def _fix_cache_statistics(self, teacher_cache: str) -> None:
        """Fix the standardiser statistics to the cache's exact ones.

        The sums over all cached targets (``statistics.safetensors``); a
        checkpoint loaded later (``load_from``, ``--resume``) replaces them
        with its own.

        Args:
            teacher_cache (str): the cache directory.
        """
        fix_cache_statistics(self, teacher_cache)

    def init_weights(self) -> None:
        """mmengine init; keeps the knowledge-preservation heads exact.

        The s2t heads' own init would overwrite their skip path; when the
        statistics are already fixed (e.g. loaded from a teacher-feature
        cache before the Runner initialises the model) the preserved heads
        are re-initialised as the standardiser afterwards.
        """
        super().init_weights()
        if self.latent.statistics_ready:
            self.latent.init_preservation_heads()

    # ------------------------------------------------------------------ #
    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable student parameters every teacher's loss reaches."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def extract_student(self, images: Tensor) -> FeatureOutput:
        """Student features of raw RGB images in [0, 255].

        Args:
            images (Tensor): ``(B, 3, H, W)`` float.

        Returns:
            FeatureOutput: global token ``(B, C)`` and the 4-level pyramid.
        """
        return self.student.forward_features(
            (images - self.student_mean) / self.student_std)

    @torch.no_grad()
    def extract_teachers(self, images: Tensor,
                         data_samples: Optional[list] = None
                         ) -> dict[str, FeatureOutput]:
        """Every teacher's raw (not standardised) output.

        Args:
            images (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255].
            data_samples (list, optional): the batch's data samples; teachers
                with ``reads_cache = True`` (``kiv.CachedTeacher``) read
                their stored outputs from them instead of running a model.

        Returns:
            dict[str, FeatureOutput]: per teacher, summary ``(B, C)`` (or
            None) and dense levels ``(B, C_l, h_l, w_l)``, float32.
        """
        return {
            name: t(images, data_samples=data_samples)
            if getattr(t, 'reads_cache', False) else t(images)
            for name, t in self.teachers.items()
        }

    def teacher_losses(self, images: Tensor,
                       data_samples: Optional[list] = None
                       ) -> tuple[dict[str, Tensor], FeatureOutput]:
        """Per-teacher weighted distillation losses.

        Args:
            images (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255].
            data_samples (list, optional): passed to
                :meth:`extract_teachers` (cached teachers).

        Returns:
            tuple: ``{f'loss_{t}_summary': ..., f'loss_{t}_features': ...,
            f'loss_{t}_logits': ...}`` (summary only for teachers with one,
            logits only with a ``logits`` loss) and the student output
            (reused by task heads).
        """
        targets = self.extract_teachers(images, data_samples)
        student = self.extract_student(images)
        aligned = self.latent(student, targets)
        losses = {}
        for name, pair in aligned.items():
            pred, target = pair['pred'], pair['target']
            w = self.teacher_weights[name]
            if target.summary is not None:  # teachers without a summary
                losses[f'loss_{name}_summary'] = w * self.summary_losses[
                    name](pred.summary, target.summary)
            if pred.features:
                dense = [self.feature_losses[name](p, t)
                         for p, t in zip(pred.features, target.features)]
                losses[f'loss_{name}_features'] = w * torch.stack(
                    dense).mean()
            if name in self.logit_losses and target.summary is not None:
                teacher = self.teachers[name]
                inherited = self.latent.summary_standardizers[name].inverse(
                    pred.summary)
                losses[f'loss_{name}_logits'] = w * self.logit_losses[name](
                    teacher.forward_head(inherited),
                    teacher.forward_head(targets[name].summary))
        return losses, student

    # ------------------------------------------------------------------ #
    @torch.no_grad()
    def statistic_sums(self, inputs: Tensor,
                       data_samples: Optional[list] = None
                       ) -> dict[str, Tensor]:
        """This rank's packed standardiser sums of one batch of images.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255] (after
                the data preprocessor).
            data_samples (list, optional): for cached teachers.

        Returns:
            dict[str, Tensor]: see
            :meth:`kiv.SharedLatentSpace.statistic_sums`.
        """
        return self.latent.statistic_sums(
            self.extract_teachers(inputs, data_samples))

    @torch.no_grad()
    def load_statistics(self, sums: dict[str, Tensor]) -> None:
        """Fix the standardiser statistics from summed packed sums (of a
        warm-up pass or a teacher-feature cache) and start the base
        teacher's heads as its standardiser.

        Args:
            sums (dict[str, Tensor]): see
                :meth:`kiv.SharedLatentSpace.load_statistics`.
        """
        self.latent.load_statistics(sums, freeze=True)

    @torch.no_grad()
    def calibration_sums(self, inputs: Tensor,
                         data_samples: Optional[list] = None
                         ) -> dict[str, Tensor]:
        """This rank's packed per-channel sums of the inherited outputs of
        one batch of images (every teacher; raw space, uncalibrated).

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255] (after
                the data preprocessor).
            data_samples (list, optional): for cached teachers.

        Returns:
            dict[str, Tensor]: see
            :meth:`kiv.SharedLatentSpace.calibration_sums`.
        """
        student = self.extract_student(inputs)
        # the teachers' grids: one image is enough (a batch shares its size)
        first = None if data_samples is None else data_samples[:1]
        return self.latent.calibration_sums({
            name: self.latent.inherited(
                student, name, [tuple(f.shape[-2:]) for f in out.features])
            for name, out in self.extract_teachers(inputs[:1],
                                                   first).items()})

    @torch.no_grad()
    def load_calibration(self, sums: dict[str, Tensor]) -> None:
        """Set the inherited outputs' statistics of the label-free
        calibration from summed packed sums (``kiv.InheritedCalibrationHook``).

        Args:
            sums (dict[str, Tensor]): see
                :meth:`kiv.SharedLatentSpace.load_calibration`.
        """
        self.latent.load_calibration(sums)

    def gradient_shares(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Share of the shared-parameter gradient norm per teacher.

        Args:
            losses (dict): output of :meth:`teacher_losses`.

        Returns:
            dict: ``grad_share/<t>`` in [0, 1] (sums to 1) and
            ``grad_norm/<t>``. ``torch.autograd.grad`` does not accumulate
            into ``.grad`` nor trigger DDP's reducer, so the training step
            is unchanged.
        """
        params = self.shared_parameters()
        norms = {}
        for name in self.teachers:
            total = sum(losses[k] for k in (f'loss_{name}_summary',
                                            f'loss_{name}_features',
                                            f'loss_{name}_logits')
                        if k in losses)
            grads = torch.autograd.grad(total, params, retain_graph=True,
                                        allow_unused=True)
            sq = [g.detach().float().pow(2).sum() for g in grads
                  if g is not None]
            norms[name] = torch.stack(sq).sum().sqrt() if sq else \
                total.new_zeros(())
        denom = torch.stack(list(norms.values())).sum().clamp_min(1e-12)
        out = {}
        for name, n in norms.items():
            out[f'grad_share/{name}'] = n / denom
            out[f'grad_norm/{name}'] = n
        return out

    def task_losses(self, student: FeatureOutput,
                    data_samples: Optional[list]) -> dict[str, Tensor]:
        """Losses of the multi-task heads on the labelled samples only."""
        losses: dict[str, Tensor] = {}
        if not self.task_heads or not data_samples:
            return losses
        for name, head in self.task_heads.items():
            cfg = self.task_cfgs[name]
            idx = [i for i, s in enumerate(data_samples)
                   if s is not None and cfg['gt_field'] in s]
            if not idx:
                continue
            sel = torch.as_tensor(idx, device=student.summary.device)
            if cfg['inputs'] == 'summary':
                summary = student.summary if cfg['summary'] is None else \
                    student.summary_for(cfg['summary'])
                feats = (summary.index_select(0, sel), )
            else:
                feats = tuple(f.index_select(0, sel)
                              for f in student.features)
            head_losses = head.loss(feats, [data_samples[i] for i in idx],
                                    **cfg['loss_kwargs'])
            for key, value in head_losses.items():
                if 'loss' in key:
                    value = value * cfg['weight']
                losses[f'{name}.{key}'] = value
        return losses

    # ------------------------------------------------------------------ #
    def loss(self, inputs: Tensor,
             data_samples: Optional[list] = None) -> dict[str, Tensor]:
        """Distillation losses of every teacher (+ task-head losses).

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255].
            data_samples (list, optional): per-image data samples.

        Returns:
            dict[str, Tensor]: named losses; every
            ``grad_share_interval``-th training iteration also the gradient
            shares and ``grad_share_iter``.
        """
        losses, student = self.teacher_losses(inputs, data_samples)
        if self.grad_share_interval > 0 and self.training \
                and torch.is_grad_enabled():
            it = self._next_train_iter()
            if it % self.grad_share_interval == 0:
                shares = self.gradient_shares(losses)
                # mmengine logs a scalar's latest value at every logging
                # step: the iteration tells a new measurement from a repeat
                shares['grad_share_iter'] = next(iter(
                    shares.values())).new_tensor(float(it))
                losses.update(shares)
        losses.update(self.task_losses(student, data_samples))
        return losses

    def _next_train_iter(self) -> int:
        """1-based number of this training iteration.

        The Runner's iteration (mmengine's ``MessageHub`` info ``'iter'``,
        restored on resume, so a resumed run measures gradient shares at
        the same iterations as an uninterrupted one); a counter of calls
        outside a Runner.
        """
        self._train_iter += 1
        runner_iter = MessageHub.get_current_instance().get_info('iter')
        return self._train_iter if runner_iter is None else \
            int(runner_iter) + 1

    def forward(self,
                inputs: Tensor,
                data_samples: Optional[list] = None,
                mode: str = 'tensor') -> Union[dict, list, FeatureOutput]:
        """mmengine entry point.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255] (after
                the data preprocessor).
            data_samples (list, optional): per-image data samples; labelled
                ones feed the task heads.
            mode (str): ``'loss'`` (dict of losses), ``'tensor'`` (student
                :class:`FeatureOutput`) or ``'predict'`` (per-image agreement
                of the inherited models with their teachers, see
                :meth:`predict`; consumed by ``kiv.TeacherAgreementMetric``).
        """
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'tensor':
            return self.extract_student(inputs)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        raise ValueError(f"mode must be 'loss', 'tensor' or 'predict', "
                         f'got {mode!r}')

    @torch.no_grad()
    def inherit(self, images: Tensor, teacher: str,
                student: Optional[FeatureOutput] = None,
                data_samples: Optional[list] = None,
                calibrated: bool = False
                ) -> tuple[FeatureOutput, FeatureOutput]:
        """The inherited model of one teacher next to the teacher itself.

        Student -> s2t heads -> inverse standardisation gives features in the
        teacher's own raw space, so the teacher's own task head
        (:meth:`~kiv.models.teachers.Teacher.forward_head`) runs on them
        with no downstream training ("inherited heads").

        Args:
            images (Tensor): ``(B, 3, H, W)`` float RGB in [0, 255].
            teacher (str): teacher name.
            student (FeatureOutput, optional): the student's output for
                ``images`` if already computed (shared across teachers).
            data_samples (list, optional): for cached teachers.
            calibrated (bool): apply the label-free calibration
                (:meth:`kiv.SharedLatentSpace.calibrate`; its statistics
                come from ``kiv.InheritedCalibrationHook``). Defaults to
                False.

        Returns:
            tuple[FeatureOutput, FeatureOutput]: (inherited, teacher) outputs
            in the teacher's raw feature space, same shapes.
        """
        if teacher not in self.teachers:
            raise KeyError(f'unknown teacher {teacher!r}; teachers are '
                           f'{sorted(self.teachers)}')
        t = self.teachers[teacher]
        target = t(images, data_samples=data_samples) \
            if getattr(t, 'reads_cache', False) else t(images)
        if student is None:
            student = self.extract_student(images)
        sizes = [tuple(f.shape[-2:]) for f in target.features]
        return self.latent.inherited(student, teacher, sizes,
                                     calibrated=calibrated), target

    @torch.no_grad()
    def predict(self, inputs: Tensor,
                data_samples: Optional[list] = None) -> list[dict[str, Any]]:
        """Agreement of every inherited model with its teacher, per image.

        Returns:
            list[dict]: per image ``{teacher: {'summary_cos': float | None,
            'feature_cos': [float per level], 'top1': (teacher class,
            inherited class), 'top5': (teacher class, [inherited top-5])}}``;
            ``top1``/``top5`` only for teachers with a classification head
            kept (``head=dict(..., input='summary')``), ``summary_cos``
            None for teachers without a summary. Cosine similarities are
            over channels (averaged over positions) in the shared latent
            space, i.e. between the student's projection and the
            standardised target: the raw space's mean would inflate them.
        """
        student = self.extract_student(inputs)
        targets = self.extract_teachers(inputs, data_samples)
        per_teacher = {}
        for name, raw in targets.items():
            teacher = self.teachers[name]
            target = self.latent.standardize_targets(raw, name)
            pred = self.latent.project(
                student, name, [tuple(f.shape[-2:]) for f in raw.features])
            item: dict[str, Any] = dict(
                summary_cos=None if pred.summary is None else
                F.cosine_similarity(pred.summary, target.summary, dim=1),
                feature_cos=[
                    F.cosine_similarity(p, t, dim=1).flatten(1).mean(1)
                    for p, t in zip(pred.features, target.features)
                ])
            if teacher.head_layer is not None and \
                    teacher.head_input == 'summary' and \
                    pred.summary is not None:
                inherited = self.latent.to_teacher_space(pred, name)
                ref = teacher.forward_head(raw.summary)
                got = teacher.forward_head(inherited.summary)
                k = min(5, got.shape[1])
                item['top1'] = (ref.argmax(1), got.argmax(1))
                item['top5'] = got.topk(k, dim=1).indices
            per_teacher[name] = item
        results = []
        for i in range(inputs.shape[0]):
            out = {}
            for name, item in per_teacher.items():
                cos = item['summary_cos']
                out[name] = dict(
                    summary_cos=None if cos is None else float(cos[i]),
                    feature_cos=[float(c[i]) for c in item['feature_cos']])
                if 'top1' in item:
                    ref_cls = int(item['top1'][0][i])
                    out[name]['top1'] = (ref_cls, int(item['top1'][1][i]))
                    out[name]['top5'] = (ref_cls,
                                         item['top5'][i].tolist())
            results.append(out)
        return results
