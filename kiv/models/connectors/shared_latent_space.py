"""The shared latent space: standardised teacher targets and s2t heads."""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import torch
from mmengine.dist import all_reduce
from mmengine.logging import print_log
from mmengine.model import BaseModule, ModuleDict, ModuleList
from torch import Tensor

from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from .calibration import InheritedStatistics, calibrate, calibration_affine
from .s2t_heads import DenseS2THead, S2THead
from .standardizers import (STANDARDIZE_MODES, BaseStandardizer,
                            StatisticsStandardizer, build_standardizer)

__all__ = ['SharedLatentSpace', 'all_reduce_sums']


def all_reduce_sums(sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sum packed statistic sums over all ranks with one ``all_reduce``.

    Args:
        sums (dict[str, Tensor]): float64 packed sums per key (every rank
            must pass the same keys in the same order).

    Returns:
        dict[str, Tensor]: the summed vectors (a no-op outside distributed
        runs).
    """
    keys = list(sums)
    if not keys:
        return {}
    flat = torch.cat([sums[k].double().flatten() for k in keys])
    all_reduce(flat, op='sum')
    return dict(zip(keys, flat.split([sums[k].numel() for k in keys])))


_REQUIRED_KEYS = {'summary_dim', 'feature_dims'}
_TEACHER_KEYS = _REQUIRED_KEYS | {'student_levels', 'preserve'}
_STATISTICS = ('fixed', 'ema')


@MODELS.register_module()
class SharedLatentSpace(BaseModule):
    """Unified knowledge transfer: align the student with every teacher.

    For every teacher ``t`` and every output of it (the summary and each
    dense level ``l``) the neck holds

    * a standardiser of the teacher's output (``standardize``: PHI-S,
      per channel or none), whose statistics are updated from the raw teacher
      outputs in training mode, all-reduced across ranks;
    * a student-to-teacher head: :class:`S2THead` from the student's
      summary for that teacher (``FeatureOutput.summaries[t]`` when the
      student has a summary per teacher, else its one summary),
      :class:`DenseS2THead` from student level ``student_levels[l]``, resized
      bilinearly to the teacher's grid.

    Modules are addressable by teacher name: ``summary_heads[t]``,
    ``feature_heads[t][l]``, ``summary_standardizers[t]``,
    ``feature_standardizers[t][l]``.

    Statistics (``statistics=``):

    * ``'fixed'`` (default, RADIOv2.5): estimated once before distillation
      and then fixed, so the targets never move under the student and the
      hot path does no eigendecomposition. Give the exact sums of a warm-up
      pass (``kiv.StatisticsWarmupHook``, which uses :meth:`statistic_sums`)
      or of a teacher-feature cache to :meth:`load_statistics`. If training
      starts without them, the first training batch's statistics are used
      (and fixed), with a warning.
    * ``'ema'``: updated from every training batch (EMA with ``momentum``,
      all-reduced), optionally frozen after ``max_stat_updates``; the PHI-S
      transform is then recomputed (one float64 ``eigh``) after every
      update. The preserved heads (below) start as the standardiser after
      the first update and again when the statistics freeze.

    Evaluating (``predict``, agreement metrics, inherited heads) before any
    statistics exist would compare raw-space numbers: it warns once.

    Calibration (label-free, :mod:`kiv.models.connectors.calibration`):
    every output with statistics also has the per-channel statistics of the
    student's inherited output (``summary_calibrations[t]``,
    ``feature_calibrations[t][l]``), empty until :meth:`load_calibration`
    (``kiv.InheritedCalibrationHook``, at the end of distillation) fills
    them; ``to_teacher_space(..., calibrated=True)`` then maps each channel
    onto the teacher's mean and standard deviation.

    Knowledge preservation (``preserve=True`` for a teacher, set by
    ``kiv.KnowledgeInheritance`` for its ``base_teacher``): the teacher's
    heads get a linear skip path initialised to the teacher's standardiser
    by :meth:`init_preservation_heads` (called by :meth:`load_statistics`),
    with ``fc2`` at zero. A student that *is* that teacher (frozen base,
    zero-initialised adapter) then predicts the standardised targets exactly
    at step 0: its loss is 0 and it sends no gradient into the adapter until
    the other teachers have moved it.

    Args:
        student_summary_dim (int): channels of the student summary.
        student_feature_dims (list[int]): channels of each student level,
            highest resolution first.
        teachers (dict[str, dict]): per teacher name (no ``.``):
            ``summary_dim`` (int, or None for a teacher without a summary:
            then ``pred.summary`` and ``target.summary`` are None),
            ``feature_dims`` (list[int], one per teacher level, may be empty),
            ``student_levels`` (list[int], optional: the student level that
            feeds each teacher level; defaults to ``default_student_level``
            for all), ``preserve`` (bool, optional: knowledge preservation,
            see above; needs student and teacher dims to match).
        standardize (str): ``'phis'``, ``'channel'`` or ``'none'``.
            Defaults to ``'phis'``.
        statistics (str): ``'fixed'`` or ``'ema'``, see above. Defaults to
            ``'fixed'``.
        momentum (float): EMA decay of the statistics (``'ema'``).
            Defaults to 0.99.
        eps (float): standardiser epsilon. Defaults to 1e-6.
        max_stat_updates (int, optional): freeze the statistics after this
            many updates (PHI-S estimates them once). Defaults to None.
        hidden_dim (int): hidden width of every s2t head. Defaults to 1280.
        default_student_level (int): student level for teacher levels without
            ``student_levels`` (negative counts from the end). Defaults to 2,
            the stride-16 level of a 4-level pyramid; use 0 for a single-level
            (ViT) student.
        norm_cfg (dict, optional): norm of the heads. Defaults to LN.
        act_cfg (dict, optional): activation of the heads. Defaults to GELU.
        init_cfg (dict | list[dict], optional): mmengine init config.
            Defaults to None (the heads' own truncated normal init).
    """

    def __init__(self,
                 student_summary_dim: int,
                 student_feature_dims: Sequence[int],
                 teachers: Mapping[str, Mapping],
                 standardize: str = 'phis',
                 statistics: str = 'fixed',
                 momentum: float = 0.99,
                 eps: float = 1e-6,
                 max_stat_updates: Optional[int] = None,
                 hidden_dim: int = 1280,
                 default_student_level: int = 2,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict | list[dict]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        self.student_summary_dim = int(student_summary_dim)
        self.student_feature_dims = [int(d) for d in student_feature_dims]
        num_levels = len(self.student_feature_dims)
        if not teachers:
            raise ValueError(f'{name}: teachers must name at least one '
                             f'teacher')
        self.standardize = standardize
        if statistics not in _STATISTICS:
            raise ValueError(f'{name}: statistics={statistics!r} is not one '
                             f'of {list(_STATISTICS)}')
        self.statistics = statistics
        self._warned_first_batch = False
        self._warned_no_statistics = False
        std_kwargs = dict(momentum=momentum, eps=eps,
                          max_updates=max_stat_updates)
        head_kwargs = dict(hidden_dim=hidden_dim, norm_cfg=norm_cfg,
                           act_cfg=act_cfg)

        self.summary_heads = ModuleDict()
        self.summary_standardizers = ModuleDict()
        self.feature_heads = ModuleDict()
        self.feature_standardizers = ModuleDict()
        self.summary_calibrations = ModuleDict()
        self.feature_calibrations = ModuleDict()
        #: teacher name -> student level feeding each teacher level.
        self.student_levels: dict[str, list[int]] = {}
        #: teacher name -> teacher summary dim (None: no summary).
        self.teacher_summary_dims: dict[str, Optional[int]] = {}
        #: teachers whose heads start as their standardiser.
        self.preserved_teachers: list[str] = []
        for teacher, cfg in teachers.items():
            where = f'{name}: teachers[{teacher!r}]'
            if not isinstance(teacher, str) or not teacher or '.' in teacher:
                raise ValueError(f'{where}: teacher names must be non-empty '
                                 f'strings without "."')
            keys = set(cfg)
            if keys - _TEACHER_KEYS or not _REQUIRED_KEYS <= keys:
                raise ValueError(
                    f'{where}: expected keys summary_dim, feature_dims and '
                    f'optionally student_levels, got {sorted(keys)}')
            summary_dim = cfg['summary_dim']
            feature_dims = [int(d) for d in cfg['feature_dims']]
            levels = cfg.get('student_levels')
            if levels is None:
                levels = [default_student_level] * len(feature_dims)
            levels = [int(lv) for lv in levels]
            if len(levels) != len(feature_dims):
                raise ValueError(f'{where}: student_levels has {len(levels)} '
                                 f'entries for {len(feature_dims)} '
                                 f'feature_dims')
            for lv in levels:
                if not -num_levels <= lv < num_levels:
                    raise ValueError(
                        f'{where}: student level {lv} does not exist, the '
                        f'student has {num_levels} levels (set '
                        f'student_levels or default_student_level)')
            self.student_levels[teacher] = [lv % num_levels for lv in levels]
            self.teacher_summary_dims[teacher] = summary_dim
            preserve = bool(cfg.get('preserve', False))
            if preserve:
                in_dims = [self.student_summary_dim] * (summary_dim
                                                        is not None)
                in_dims += [self.student_feature_dims[lv]
                            for lv in self.student_levels[teacher]]
                out_dims = [summary_dim] * (summary_dim is not None)
                out_dims += feature_dims
                if in_dims != out_dims:
                    raise ValueError(
                        f'{where}: preserve=True needs the student dims '
                        f'{in_dims} to equal the teacher dims {out_dims} '
                        f'(the student must be built on this teacher)')
                self.preserved_teachers.append(teacher)
            if summary_dim is not None:
                self.summary_heads[teacher] = S2THead(
                    self.student_summary_dim, int(summary_dim),
                    with_skip=preserve, **head_kwargs)
                self.summary_standardizers[teacher] = build_standardizer(
                    standardize, int(summary_dim), **std_kwargs)
            self.feature_heads[teacher] = ModuleList([
                DenseS2THead(self.student_feature_dims[lv], dim,
                             with_skip=preserve, **head_kwargs)
                for lv, dim in zip(self.student_levels[teacher], feature_dims)
            ])
            self.feature_standardizers[teacher] = ModuleList([
                build_standardizer(standardize, dim, **std_kwargs)
                for dim in feature_dims
            ])
            # calibration needs the teacher's statistics
            if STANDARDIZE_MODES[standardize].tracks_statistics:
                if summary_dim is not None:
                    self.summary_calibrations[teacher] = InheritedStatistics(
                        int(summary_dim), eps=eps)
                self.feature_calibrations[teacher] = ModuleList(
                    [InheritedStatistics(dim, eps=eps)
                     for dim in feature_dims])

    @property
    def teacher_names(self) -> list[str]:
        """Configured teacher names, in config order."""
        return list(self.student_levels)

    # ----------------------------------------------------------------- checks
    def _check_teacher(self, teacher: str) -> None:
        if teacher not in self.student_levels:
            raise KeyError(f'{type(self).__name__}: unknown teacher '
                           f'{teacher!r}; configured: {self.teacher_names}')

    def _check_student(self, student: FeatureOutput) -> None:
        dims = [f.shape[1] for f in student.features]
        summaries = [student.summary] + list(
            (student.summaries or {}).values())
        summary_dims = sorted({s.shape[-1] for s in summaries})
        if summary_dims != [self.student_summary_dim] or \
                dims != self.student_feature_dims:
            raise ValueError(
                f'{type(self).__name__}: student output has summary dims '
                f'{summary_dims} and level dims {dims}, expected '
                f'student_summary_dim={self.student_summary_dim} and '
                f'student_feature_dims={self.student_feature_dims}')

    def _check_teacher_output(self, out: FeatureOutput, teacher: str) -> None:
        self._check_teacher(teacher)
        want_summary = self.teacher_summary_dims[teacher]
        want_dims = [h.out_dim for h in self.feature_heads[teacher]]
        has_summary = None if out.summary is None else out.summary.shape[-1]
        dims = [f.shape[1] for f in out.features]
        if has_summary != want_summary or dims != want_dims:
            raise ValueError(
                f'{type(self).__name__}: output for teacher {teacher!r} has '
                f'summary dim {has_summary} and level dims {dims}, expected '
                f'summary_dim={want_summary} and feature_dims={want_dims}')

    # ------------------------------------------------------------ statistics
    def _standardizers(self, teacher: str) -> list[BaseStandardizer]:
        stds = list(self.feature_standardizers[teacher])
        if teacher in self.summary_standardizers:
            stds.insert(0, self.summary_standardizers[teacher])
        return stds

    @staticmethod
    def _outputs(out: FeatureOutput) -> list[Tensor]:
        tensors = list(out.features)
        if out.summary is not None:
            tensors.insert(0, out.summary)
        return tensors

    def _named_standardizers(self, teacher: str
                             ) -> list[tuple[str, BaseStandardizer]]:
        """``(key, standardiser)`` of one teacher, summary first; keys are
        ``'<teacher>.summary'`` and ``'<teacher>.features.<level>'``."""
        named = [(f'{teacher}.features.{i}', std) for i, std in enumerate(
            self.feature_standardizers[teacher])]
        if teacher in self.summary_standardizers:
            named.insert(0, (f'{teacher}.summary',
                             self.summary_standardizers[teacher]))
        return named

    def statistic_keys(self) -> list[str]:
        """Keys of every standardiser with statistics, in a fixed order."""
        return [key for t in self.teacher_names
                for key, std in self._named_standardizers(t)
                if isinstance(std, StatisticsStandardizer)]

    @property
    def statistics_ready(self) -> bool:
        """Whether every standardiser with statistics has them fixed."""
        return all(std.frozen for t in self.teacher_names
                   for _, std in self._named_standardizers(t)
                   if isinstance(std, StatisticsStandardizer))

    @property
    def statistics_exist(self) -> bool:
        """Whether every standardiser with statistics has some (fixed or
        running); without them the standardisers are the identity."""
        return all(std.initialized for t in self.teacher_names
                   for _, std in self._named_standardizers(t)
                   if isinstance(std, StatisticsStandardizer))

    def _warn_if_no_statistics(self) -> None:
        """Warn once when outputs are used before statistics exist: they
        would be compared in the teachers' raw spaces."""
        if self._warned_no_statistics or self.statistics_exist:
            return
        self._warned_no_statistics = True
        missing = [key for t in self.teacher_names
                   for key, std in self._named_standardizers(t)
                   if isinstance(std, StatisticsStandardizer)
                   and not std.initialized]
        print_log(
            f'{type(self).__name__}: no standardiser statistics yet for '
            f'{missing}: their targets and projections are in the '
            f"teachers' raw spaces (identity standardisers), so agreement "
            f'numbers are not comparable. Estimate them first '
            f'(kiv.StatisticsWarmupHook, a teacher-feature cache, or '
            f'load_statistics), or load a trained checkpoint',
            logger='current', level=logging.WARNING)

    @torch.no_grad()
    def statistic_sums(self, targets: Mapping[str, FeatureOutput]
                       ) -> dict[str, Tensor]:
        """This rank's packed sums of a batch of raw teacher outputs.

        Summed over batches (and all-reduced over ranks) they give the exact
        statistics of all the samples, for :meth:`load_statistics`.

        Args:
            targets (dict[str, FeatureOutput]): raw outputs per teacher.

        Returns:
            dict[str, Tensor]: float64 packed ``[count, sum x, sum x x^T]``
            (see ``StatisticsStandardizer.batch_sums``) per key of
            :meth:`statistic_keys` of the given teachers.
        """
        sums = {}
        for teacher, out in targets.items():
            self._check_teacher_output(out, teacher)
            for (key, std), x in zip(self._named_standardizers(teacher),
                                     self._outputs(out)):
                if isinstance(std, StatisticsStandardizer):
                    sums[key] = std.batch_sums(x)
        return sums

    @torch.no_grad()
    def load_statistics(self, sums: Mapping[str, Tensor],
                        freeze: bool = True, strict: bool = True) -> None:
        """Set standardiser statistics exactly from summed sums.

        Then initialises the knowledge-preservation heads
        (:meth:`init_preservation_heads`) of the teachers whose statistics
        are all fixed.

        Args:
            sums (dict[str, Tensor]): a packed sum per key of
                :meth:`statistic_keys`.
            freeze (bool): fix the statistics. Defaults to True.
            strict (bool): every key of :meth:`statistic_keys` must be
                given. Defaults to True.
        """
        keys = self.statistic_keys()
        missing = sorted(set(keys) - set(sums)) if strict else []
        unknown = sorted(set(sums) - set(keys))
        if missing or unknown:
            raise KeyError(f'{type(self).__name__}.load_statistics: missing '
                           f'keys {missing}, unknown keys {unknown}; '
                           f'expected {keys}')
        for teacher in self.teacher_names:
            for key, std in self._named_standardizers(teacher):
                if isinstance(std, StatisticsStandardizer) and key in sums:
                    std.load_sums(sums[key].double(), freeze=freeze)
        self.init_preservation_heads()

    # ----------------------------------------------------------- calibration
    def _named_calibrations(self, teacher: str) -> list[
            tuple[str, InheritedStatistics, StatisticsStandardizer]]:
        """``(key, inherited statistics, standardiser)`` of one teacher's
        calibrated outputs, summary first (keys as
        :meth:`_named_standardizers`)."""
        stds = dict(self._named_standardizers(teacher))
        named = [(f'{teacher}.features.{i}', cal)
                 for i, cal in enumerate(self.feature_calibrations[teacher])
                 ] if teacher in self.feature_calibrations else []
        if teacher in self.summary_calibrations:
            named.insert(0, (f'{teacher}.summary',
                             self.summary_calibrations[teacher]))
        return [(key, cal, stds[key]) for key, cal in named]

    def calibration_keys(self) -> list[str]:
        """Keys of every output that can be calibrated, in a fixed order
        (none with ``standardize='none'``: no teacher statistics)."""
        return [key for t in self.teacher_names
                for key, _, _ in self._named_calibrations(t)]

    @property
    def calibration_ready(self) -> bool:
        """Whether every calibratable output has its inherited statistics
        (False when there is none)."""
        keys = self.calibration_keys()
        return bool(keys) and all(
            cal.initialized for t in self.teacher_names
            for _, cal, _ in self._named_calibrations(t))

    @torch.no_grad()
    def calibration_sums(self, inherited: Mapping[str, FeatureOutput]
                         ) -> dict[str, Tensor]:
        """This rank's packed per-channel sums of a batch of inherited
        outputs (raw space, uncalibrated), for :meth:`load_calibration`.

        Args:
            inherited (dict[str, FeatureOutput]): per teacher, the output of
                :meth:`to_teacher_space`.

        Returns:
            dict[str, Tensor]: float64 ``[count, sum x, sum x^2]`` per key
            of :meth:`calibration_keys` of the given teachers.
        """
        sums = {}
        for teacher, out in inherited.items():
            self._check_teacher_output(out, teacher)
            outputs = dict(zip((k for k, _ in
                                self._named_standardizers(teacher)),
                               self._outputs(out)))
            for key, cal, _ in self._named_calibrations(teacher):
                sums[key] = cal.batch_sums(outputs[key])
        return sums

    @torch.no_grad()
    def load_calibration(self, sums: Mapping[str, Tensor]) -> None:
        """Set the inherited outputs' statistics from summed sums.

        Args:
            sums (dict[str, Tensor]): a packed sum per key of
                :meth:`calibration_keys` (all of them).

        Raises:
            KeyError: keys missing or unknown (both named).
            RuntimeError: the teachers' statistics are not fixed yet.
        """
        keys = self.calibration_keys()
        missing, unknown = sorted(set(keys) - set(sums)), sorted(
            set(sums) - set(keys))
        if missing or unknown:
            raise KeyError(f'{type(self).__name__}.load_calibration: missing '
                           f'keys {missing}, unknown keys {unknown}; '
                           f'expected {keys}')
        if not self.statistics_exist:
            raise RuntimeError(f'{type(self).__name__}.load_calibration: '
                               'the teachers\' statistics do not exist yet')
        for teacher in self.teacher_names:
            for key, cal, _ in self._named_calibrations(teacher):
                cal.load_sums(sums[key].double())

    def calibrate(self, out: FeatureOutput, teacher: str) -> FeatureOutput:
        """Map inherited outputs onto the teacher's per-channel statistics.

        Args:
            out (FeatureOutput): :meth:`to_teacher_space` output of
                ``teacher``.
            teacher (str): teacher name.

        Returns:
            FeatureOutput: same shapes, each channel at the teacher's mean
            and standard deviation (see
            :func:`~kiv.models.connectors.calibration.calibrate`).

        Raises:
            RuntimeError: no calibration statistics (named).
        """
        self._check_teacher_output(out, teacher)
        named = self._named_calibrations(teacher)
        if not named or not all(cal.initialized for _, cal, _ in named):
            raise RuntimeError(
                f'{type(self).__name__}: no calibration statistics for '
                f'teacher {teacher!r} (standardize={self.standardize!r}; '
                'they are set by kiv.InheritedCalibrationHook at the end of '
                'distillation)')
        done = {key: calibrate(x, *calibration_affine(cal, std))
                for (key, cal, std), x in zip(named, self._outputs(out))}
        summary = None if out.summary is None else \
            done[f'{teacher}.summary']
        features = tuple(
            done[f'{teacher}.features.{i}'].contiguous()
            for i in range(len(out.features)))
        return FeatureOutput(summary, features)

    def _preserved_state(self, attr: str) -> dict[str, bool]:
        """Per preserved teacher: whether every standardiser with
        statistics has ``attr`` (``'frozen'`` / ``'initialized'``)."""
        return {t: all(getattr(std, attr) for _, std in
                       self._named_standardizers(t)
                       if isinstance(std, StatisticsStandardizer))
                for t in self.preserved_teachers}

    @torch.no_grad()
    def init_preservation_heads(self,
                                teachers: Optional[Sequence[str]] = None,
                                require_frozen: bool = True) -> None:
        """Start the preserved teachers' heads as their standardisers.

        For every teacher with ``preserve=True`` each head becomes exactly
        the affine map of its standardiser (skip path) with ``fc2`` zero: a
        student whose features equal the teacher's raw outputs predicts the
        standardised targets exactly.

        Args:
            teachers (Sequence[str], optional): only these preserved
                teachers. Defaults to all of them.
            require_frozen (bool): skip teachers whose statistics are not
                fixed yet (``'fixed'`` statistics); with False, teachers
                whose statistics merely exist (``'ema'``) are initialised
                too. Defaults to True.
        """
        ready = self._preserved_state(
            'frozen' if require_frozen else 'initialized')
        for teacher in self.preserved_teachers:
            if teachers is not None and teacher not in teachers:
                continue
            if not ready[teacher]:
                continue
            heads = list(self.feature_heads[teacher])
            if teacher in self.summary_heads:
                heads.insert(0, self.summary_heads[teacher])
            for head, (_, std) in zip(heads,
                                      self._named_standardizers(teacher)):
                head.init_as_affine(*std.affine())

    def _fix_from_first_batch(self, targets: Mapping[str, FeatureOutput]
                              ) -> None:
        """``statistics='fixed'`` without a warm-up: use this batch for
        every standardiser of these teachers that has no statistics yet."""
        if not self._warned_first_batch:
            print_log(
                f'{type(self).__name__}: standardiser statistics were not '
                f'estimated before training (add kiv.StatisticsWarmupHook '
                f'or train from a teacher-feature cache); using the first '
                f'training batch and fixing them', logger='current',
                level=logging.WARNING)
            self._warned_first_batch = True
        sums = self.statistic_sums(targets)
        ready = {key for t in targets
                 for key, std in self._named_standardizers(t)
                 if isinstance(std, StatisticsStandardizer) and std.frozen}
        sums = {k: v for k, v in sums.items() if k not in ready}
        self.load_statistics(all_reduce_sums(sums), strict=False)

    @torch.no_grad()
    def update_statistics(self, targets: Mapping[str, FeatureOutput]) -> None:
        """Update every standardiser with raw teacher outputs.

        One ``all_reduce`` carries the batch sums of all standardisers. Every
        rank must pass the same teachers (it is a collective operation).
        Frozen standardisers (``max_stat_updates`` reached) are skipped.

        Args:
            targets (dict[str, FeatureOutput]): raw outputs per teacher.
        """
        initialized = self._preserved_state('initialized')
        frozen = self._preserved_state('frozen')
        pending: list[tuple[StatisticsStandardizer, Tensor]] = []
        for teacher, out in targets.items():
            self._check_teacher_output(out, teacher)
            for std, x in zip(self._standardizers(teacher),
                              self._outputs(out)):
                if isinstance(std, StatisticsStandardizer) and not std.frozen:
                    pending.append((std, std.batch_sums(x)))
        if not pending:
            return
        sums = torch.cat([s for _, s in pending])
        all_reduce(sums, op='sum')
        for (std, _), chunk in zip(
                pending, sums.split([s.numel() for _, s in pending])):
            std.update_from_sums(chunk)
        # knowledge preservation with moving statistics: the preserved
        # heads start as the standardiser once it first exists, and again
        # when the statistics freeze (max_stat_updates), so the base
        # teacher's loss is 0 for the statistics the run keeps
        now_initialized = self._preserved_state('initialized')
        now_frozen = self._preserved_state('frozen')
        changed = [t for t in self.preserved_teachers
                   if now_initialized[t] and not initialized[t]
                   or now_frozen[t] and not frozen[t]]
        if changed:
            self.init_preservation_heads(changed, require_frozen=False)

    def standardize_targets(self, target: FeatureOutput,
                            teacher: str) -> FeatureOutput:
        """Standardise one teacher's raw output (no statistics update).

        Args:
            target (FeatureOutput): raw teacher output, summary ``(B, D_t)``
                (or None), levels ``(B, D_l, h_l, w_l)``.
            teacher (str): teacher name.

        Returns:
            FeatureOutput: same shapes, detached.
        """
        self._check_teacher_output(target, teacher)
        self._warn_if_no_statistics()
        with torch.no_grad():
            summary = None if target.summary is None else \
                self.summary_standardizers[teacher](target.summary.detach())
            features = tuple(
                std(x.detach()) for std, x in zip(
                    self.feature_standardizers[teacher], target.features))
        return FeatureOutput(summary, features)

    def to_teacher_space(self, pred: FeatureOutput, teacher: str,
                         calibrated: bool = False) -> FeatureOutput:
        """Map projections back to the teacher's raw space (``inverse``).

        Used by inherited heads: student + s2t head + the teacher's own head.
        Differentiable.

        Args:
            pred (FeatureOutput): standardised-space output of
                :meth:`project` for ``teacher``.
            teacher (str): teacher name.
            calibrated (bool): then also :meth:`calibrate`. Defaults to
                False.

        Returns:
            FeatureOutput: same shapes, in the teacher's raw feature space
            (contiguous NCHW maps).
        """
        self._check_teacher_output(pred, teacher)
        self._warn_if_no_statistics()
        summary = None if pred.summary is None else \
            self.summary_standardizers[teacher].inverse(pred.summary)
        # contiguous: the teacher's own head may be an mmcv RoI head, which
        # reads channels-last maps (the dense s2t heads') as NCHW memory
        features = tuple(
            std.inverse(x).contiguous()
            for std, x in zip(self.feature_standardizers[teacher],
                              pred.features))
        out = FeatureOutput(summary, features)
        return self.calibrate(out, teacher) if calibrated else out

    # ------------------------------------------------------------ projection
    def project(self, student: FeatureOutput, teacher: str,
                sizes: Sequence[Sequence[int]]) -> FeatureOutput:
        """Project the student into one teacher's standardised space.

        Args:
            student (FeatureOutput): summary ``(B, student_summary_dim)``
                (and, per teacher, ``summaries``: the teacher's summary head
                reads ``summaries[teacher]``), levels
                ``(B, student_feature_dims[l], H_l, W_l)``.
            teacher (str): teacher name.
            sizes (list[tuple[int, int]]): target grid ``(h, w)`` of each
                teacher level.

        Returns:
            FeatureOutput: summary ``(B, summary_dim)`` (None if the teacher
            has none), levels ``(B, feature_dims[l], h_l, w_l)``.
        """
        self._check_teacher(teacher)
        self._check_student(student)
        heads = self.feature_heads[teacher]
        if len(sizes) != len(heads):
            raise ValueError(f'{type(self).__name__}: teacher {teacher!r} has '
                             f'{len(heads)} levels, got {len(sizes)} sizes')
        summary = self.summary_heads[teacher](student.summary_for(teacher)) \
            if teacher in self.summary_heads else None
        features = tuple(
            head(student.features[lv], size) for head, lv, size in zip(
                heads, self.student_levels[teacher], sizes))
        return FeatureOutput(summary, features)

    def inherited(self, student: FeatureOutput, teacher: str,
                  sizes: Sequence[Sequence[int]],
                  calibrated: bool = False) -> FeatureOutput:
        """The student's prediction of a teacher's outputs in that teacher's
        raw space: :meth:`project`, then :meth:`to_teacher_space`.

        Args:
            student (FeatureOutput): student output (see :meth:`project`).
            teacher (str): teacher name.
            sizes (list[tuple[int, int]]): grid of each teacher level.
            calibrated (bool): also :meth:`calibrate`. Defaults to False.

        Returns:
            FeatureOutput: the teacher's shapes, raw space.
        """
        return self.to_teacher_space(self.project(student, teacher, sizes),
                                     teacher, calibrated=calibrated)

    def forward(
        self, student: FeatureOutput, targets: Mapping[str, FeatureOutput]
    ) -> dict[str, dict[str, FeatureOutput]]:
        """Predictions and standardised targets for every given teacher.

        With ``statistics='ema'`` in training mode the standardiser
        statistics are first updated with the raw targets (no grad); with
        ``'fixed'`` they never change here (except once, from the first
        training batch, if nothing estimated them before). Eval mode leaves
        them untouched.

        Args:
            student (FeatureOutput): student output.
            targets (dict[str, FeatureOutput]): raw outputs of some or all
                configured teachers.

        Returns:
            dict[str, dict[str, FeatureOutput]]: per teacher, ``pred`` (the
            student's projections, each level at the teacher level's grid) and
            ``target`` (standardised, detached), with equal shapes.
        """
        if self.training:
            if self.statistics == 'ema':
                self.update_statistics(targets)
            elif not self.statistics_ready:
                self._fix_from_first_batch(targets)  # once: then ready
        results = {}
        for teacher, target in targets.items():
            target = self.standardize_targets(target, teacher)
            sizes = [tuple(f.shape[-2:]) for f in target.features]
            results[teacher] = dict(
                pred=self.project(student, teacher, sizes), target=target)
        return results
