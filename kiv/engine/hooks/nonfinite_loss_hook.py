"""Stop a non-finite loss before it reaches the weights.

mmdet's ``CheckInvalidLossHook`` looks at the loss in ``after_train_iter``,
after the optimizer step: by then a NaN/Inf step has been applied and every
later checkpoint carries it. :class:`NonFiniteLossHook` checks earlier, at
the one place every mmengine model hands its loss over: the optimizer
wrapper's ``update_params``. For the run it guards, the hook

1. wraps ``update_params`` of the run's optimizer wrapper (every wrapper of
   an ``OptimWrapperDict``): works with ``OptimWrapper``,
   ``AmpOptimWrapper`` and their subclasses, since it runs before their own
   ``backward``/``step``. A non-finite loss (on any rank: one flag is
   all-reduced, so all ranks skip together and DDP does not hang) gets no
   backward and no optimizer step; accumulated gradients are zeroed;
2. records the per-term loss dict of the step: it wraps the model's
   ``parse_losses`` (``BaseModel.train_step`` and mmengine's DDP wrapper
   both call it), keeping a reference to ``log_vars`` (no extra GPU sync
   for finite steps), so the warning/error names the non-finite terms, e.g.
   ``loss_clip_summary=nan``, ``seg.loss_ce=inf``;
3. then either skips the batch (``action='skip'``: one warning line per
   skipped batch, counted in ``train/nonfinite_skips``; the run stops once
   more than ``max_consecutive`` consecutive or ``max_total`` skips
   happened) or stops the run at once (``action='stop'``) with
   :class:`NonFiniteLossError`;
4. refuses to write a checkpoint whose weights hold NaN/Inf
   (``before_save_checkpoint`` raises :class:`NonFiniteWeightsError`), so the
   last checkpoint on disk is always a finite one.

Both wrappers are undone in ``after_train``.

Why instance patches, and one private attribute (mmengine 0.10's
``OptimWrapper`` was read for a public way; there is none):

- *where*: the loss reaches the optimizer inside ``model.train_step``
  (``optim_wrapper.update_params(loss)``); no hook point lies between the
  loss and the step (``Hook.after_train_iter`` runs after it) and
  ``OptimWrapper`` has no callback. A registered ``OptimWrapper`` subclass
  would guard one wrapper type only, while the guard must work with any
  (``AmpOptimWrapper``, DeepSpeed / FSDP / Apex wrappers, a user's own);
  so the hook shadows ``update_params`` on the run's wrapper *instances*
  (and ``parse_losses`` on the model instance, the only place the per-term
  loss dict passes before the step), never on a class, and undoes it after
  training;
- *gradient accumulation*: a skipped batch must count like a backward
  (mmengine's ``backward`` increments ``_inner_count``, which
  ``should_update`` and ``scale_loss`` read), or every later accumulation
  window would shift. The public ``inner_count`` is read-only, and
  ``initialize_count_status`` would also reset ``_max_counts`` (a private
  value to pass back) and may log its warnings (an indivisible count,
  BatchNorm under accumulation) on every skip; running
  ``backward`` on a dummy loss would run wrapper-specific machinery (loss
  scaler, a DeepSpeed engine) on a tensor that is not the model's loss. So
  the guard increments ``_inner_count`` itself, only when the wrapper has
  it.

kiv's configs hold the hook in ``custom_hooks``
(``configs/_base_/default_runtime.py``), so it guards their runs under any
entry point (kiv's, mmpretrain's or mmdet's ``tools/train.py``,
``Runner.from_cfg``); the config key ``nonfinite_loss`` configures it there
too. kiv's ``tools/train.py`` adds it to configs without it (CLI
``--nonfinite-loss``); other configs add ``dict(type='kiv.NonFiniteLossHook')``
to ``custom_hooks``.
"""
from __future__ import annotations

import functools
import math
import os.path as osp
from typing import Any, Callable, Mapping, Optional

import torch
from mmengine.dist import all_gather_object, all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict

from kiv.registry import HOOKS

__all__ = [
    'NonFiniteLossError', 'NonFiniteWeightsError', 'NonFiniteLossHook',
    'nonfinite_terms'
]

#: ``checkpoint['meta']`` key holding the hook's counters (for resume)
META_KEY = 'kiv_nonfinite_loss'
#: marker attribute of the wrappers the hook installs
_MARK = '_kiv_nonfinite_guard'


class NonFiniteLossError(RuntimeError):
    """A non-finite loss stopped the run; no update was applied for it.

    Args:
        message (str): the full message.
        terms (dict[str, float]): the non-finite terms (``name -> value``;
            names prefixed ``rank<r>:`` for other ranks).
        iteration (int): the 1-based training iteration.
    """

    def __init__(self, message: str, terms: Mapping[str, float],
                 iteration: int) -> None:
        super().__init__(message)
        self.terms = dict(terms)
        self.iteration = iteration

    def __reduce__(self):
        return type(self), (self.args[0], self.terms, self.iteration)


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint was about to be written with NaN/Inf weights.

    Args:
        message (str): the full message.
        keys (list[str]): the state-dict keys holding non-finite values.
    """

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = list(keys)

    def __reduce__(self):
        return type(self), (self.args[0], self.keys)


def _as_float(value: Any) -> Optional[float]:
    """A logged value as one float (mean of a tensor), None if not numeric.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        if not torch.isfinite(value).all():
            # keep the kind of non-finite value (nan, inf or -inf)
            bad = value.detach()[~torch.isfinite(value.detach())]
            return float(bad.flatten()[0])
        return float(value.detach().float().mean())
    if isinstance(value, (int, float)):
        return float(value)
    return None


def nonfinite_terms(log_vars: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """The non-finite loss terms of one step.

    Args:
        log_vars (Mapping[str, Any], optional): the second output of
            ``BaseModel.parse_losses``: the total ``loss`` and every term.

    Returns:
        dict[str, float]: ``name -> value`` of the terms whose name contains
        ``'loss'`` (the ones ``parse_losses`` sums), the total ``loss``
        excluded, that are NaN or +-Inf; if none are, the other non-finite
        logged values (which may have been weighted into the loss by a
        custom ``parse_losses``). Empty if nothing logged is non-finite.
    """
    if not log_vars:
        return {}
    found: dict[str, float] = {}
    others: dict[str, float] = {}
    for name, value in log_vars.items():
        if name == 'loss':
            continue
        number = _as_float(value)
        if number is None or math.isfinite(number):
            continue
        (found if 'loss' in name else others)[name] = number
    return found or others


def _describe(terms: Mapping[str, float]) -> str:
    """``a=nan, b=inf`` or a note that no term was found."""
    if not terms:
        return ('no logged loss term is non-finite: the total is (an '
                'overflow in the sum, a custom parse_losses, or a train_step '
                'that does not call parse_losses)')
    return ', '.join(f'{name}={value}' for name, value in terms.items())


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Skip or stop on a NaN/Inf loss before the optimizer step.

    See :mod:`kiv.engine.hooks.nonfinite_loss_hook` for how (and why it
    patches the wrapper instances). Counters survive ``--resume`` (stored in
    ``checkpoint['meta']['kiv_nonfinite_loss']``).

    Args:
        action (str): ``'skip'`` the batch (no backward, no step, gradients
            zeroed; one warning line naming the terms) or ``'stop'`` the run
            with :class:`NonFiniteLossError`. Defaults to ``'skip'``.
        max_consecutive (int): with ``'skip'``, most consecutive iterations
            skipped; the next one stops the run. Defaults to 5.
        max_total (int, optional): with ``'skip'``, most skipped iterations
            in the whole run; the next one stops it. None: no limit.
            Defaults to 100.
        check_checkpoint (bool): refuse to write a checkpoint whose
            ``state_dict`` has NaN/Inf values (:class:`NonFiniteWeightsError`,
            raised before the file is written). Defaults to True.

    The run's config key ``nonfinite_loss`` (a dict of these arguments, or
    ``'off'``) configures a hook built with the defaults when training
    starts, under any entry point; see :meth:`apply_config`.

    Raises:
        ValueError: an unknown ``action`` or a negative limit.
    """

    priority = 'HIGH'
    ACTIONS = ('skip', 'stop')
    #: the arguments' defaults, in order
    DEFAULTS = dict(action='skip', max_consecutive=5, max_total=100,
                    check_checkpoint=True)

    def __init__(self,
                 action: str = 'skip',
                 max_consecutive: int = 5,
                 max_total: Optional[int] = 100,
                 check_checkpoint: bool = True) -> None:
        self._args = dict(action=action, max_consecutive=max_consecutive,
                          max_total=max_total,
                          check_checkpoint=check_checkpoint)
        self._configure(**self._args)
        self.enabled = True
        self.total = 0  # skipped iterations, whole run
        self.consecutive = 0  # skipped iterations in a row
        self._last_bad_iter = -2  # 0-based iteration of the last skip
        self._log_vars: Optional[Mapping[str, Any]] = None
        self._runner = None
        self._undo: list[Callable[[], None]] = []

    def _configure(self, action: str, max_consecutive: int,
                   max_total: Optional[int], check_checkpoint: bool) -> None:
        """Check and set the options (see the class arguments).

        Raises:
            ValueError: an unknown ``action`` or a negative limit.
        """
        if action not in self.ACTIONS:
            raise ValueError(f'NonFiniteLossHook: action must be one of '
                             f'{self.ACTIONS}, got {action!r}')
        for name, value in (('max_consecutive', max_consecutive),
                            ('max_total', max_total)):
            if value is None and name == 'max_total':
                continue
            if not isinstance(value, int) or isinstance(value, bool) \
                    or value < 0:
                raise ValueError(f'NonFiniteLossHook: {name} must be an int '
                                 f'>= 0, got {value!r}')
        self.action = action
        self.max_consecutive = max_consecutive
        self.max_total = max_total
        self.check_checkpoint = bool(check_checkpoint)

    def apply_config(self, cfg: Optional[Mapping]) -> None:
        """Take the options of the config key ``nonfinite_loss``.

        ``nonfinite_loss = dict(action='stop', max_consecutive=3, ...)``
        replaces the defaults; ``'off'`` disables the hook (no wrapper, no
        checkpoint check). kiv's ``tools/train.py`` folds the key into the
        hook entry and clears it; other entry points (mmpretrain's or mmdet's
        ``tools/train.py``, ``Runner.from_cfg``) leave it to this method.

        Args:
            cfg (Mapping, optional): the run's config (``runner.cfg``).

        Raises:
            ValueError: the key is set and the hook was given arguments too
                (set twice), an unknown option or a value of the wrong kind.
        """
        setting = cfg.get('nonfinite_loss', None) if cfg is not None \
            else None
        if setting is None or setting is True:
            return
        if self._args != self.DEFAULTS:
            raise ValueError(
                'NonFiniteLossHook: the non-finite loss guard is set twice: '
                'by the config key nonfinite_loss and by the arguments of '
                'the NonFiniteLossHook in custom_hooks; keep one')
        if setting == 'off' or setting is False:
            self.enabled = False
            return
        if not isinstance(setting, Mapping):
            raise ValueError("NonFiniteLossHook: config key nonfinite_loss "
                             f"must be a dict or 'off', got {setting!r}")
        unknown = sorted(set(setting) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(
                f'NonFiniteLossHook: config key nonfinite_loss: unknown '
                f'option(s) {", ".join(unknown)}; expected '
                f'{", ".join(self.DEFAULTS)}')
        self._configure(**{**self.DEFAULTS, **setting})

    # ------------------------------------------------------------ install --
    def before_train(self, runner) -> None:
        """Read the config key ``nonfinite_loss``, then wrap the optimizer
        wrapper(s) and the model's ``parse_losses``."""
        self.apply_config(getattr(runner, 'cfg', None))
        self._runner = runner
        self._remove()
        if not self.enabled:
            runner.logger.info('NonFiniteLossHook: off (config key '
                               "nonfinite_loss='off')")
            return
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        if callable(getattr(model, 'parse_losses', None)):
            self._wrap(model, 'parse_losses', self._recording_parse_losses)
        wrapper = runner.optim_wrapper
        wrappers = (list(wrapper.values()) if isinstance(
            wrapper, OptimWrapperDict) else [wrapper])
        for optim_wrapper in wrappers:
            self._wrap(optim_wrapper, 'update_params',
                       self._guard_maker(optim_wrapper))

    def after_train(self, runner) -> None:
        """Undo the wrappers; log the number of skipped iterations."""
        self._remove()
        self._runner = None
        self._log_vars = None
        if self.total:
            runner.logger.warning(
                f'NonFiniteLossHook: {self.total} training iteration(s) had '
                'a non-finite loss and were skipped in this run')

    def _wrap(self, obj: Any, name: str,
              make: Callable[[Callable], Callable]) -> None:
        """Shadow ``obj.<name>`` by ``make(original)`` on the instance only.

        Args:
            obj: the model or optimizer wrapper.
            name (str): the method name.
            make (Callable): builds the wrapper from the original method.
        """
        original = getattr(obj, name)
        if getattr(original, _MARK, False):  # already guarded
            return
        wrapped = make(original)
        setattr(wrapped, _MARK, True)
        own = vars(obj)
        had_own, previous = name in own, own.get(name)
        object.__setattr__(obj, name, wrapped)

        def undo() -> None:
            if had_own:
                object.__setattr__(obj, name, previous)
            else:
                vars(obj).pop(name, None)

        self._undo.append(undo)

    def _remove(self) -> None:
        """Undo every wrapper this hook installed (newest first)."""
        while self._undo:
            self._undo.pop()()

    def _guard_maker(self, optim_wrapper) -> Callable[[Callable], Callable]:
        """Builds ``update_params`` of ``optim_wrapper`` from the original.
        """

        def make(original: Callable) -> Callable:
            return functools.partial(self._guarded_update_params,
                                     optim_wrapper, original)

        return make

    def _recording_parse_losses(self, original: Callable) -> Callable:
        """``parse_losses`` that keeps a reference to its ``log_vars``."""

        @functools.wraps(original)
        def parse_losses(*args, **kwargs):
            loss, log_vars = original(*args, **kwargs)
            self._log_vars = log_vars
            return loss, log_vars

        return parse_losses

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Any = None) -> None:
        """Forget the previous iteration's loss terms."""
        self._log_vars = None

    # -------------------------------------------------------------- guard --
    def _guarded_update_params(self, optim_wrapper, original: Callable,
                               loss: torch.Tensor, *args, **kwargs) -> None:
        """``update_params`` that skips non-finite losses on all ranks."""
        bad = ~torch.isfinite(loss.detach()).all()
        if get_world_size() > 1:
            flag = bad.to(torch.int32).reshape(1)
            all_reduce(flag, op='max')
            bad = flag[0]
        if not bool(bad):
            return original(loss, *args, **kwargs)
        terms = nonfinite_terms(self._log_vars)
        self._log_vars = None
        if get_world_size() > 1:
            terms = self._gather_terms(terms)
        # what a skipped backward would have done for gradient accumulation
        # (no public setter: see the module doc)
        if hasattr(optim_wrapper, '_inner_count'):
            optim_wrapper._inner_count += 1
        zero_kwargs = kwargs.get('zero_kwargs') or {}
        optim_wrapper.zero_grad(**zero_kwargs)
        self._on_nonfinite(terms, float(loss.detach().float().sum()))

    @staticmethod
    def _gather_terms(terms: dict[str, float]) -> dict[str, float]:
        """Every rank's non-finite terms (``rank<r>:`` before other ranks').
        """
        from mmengine.dist import get_rank
        merged: dict[str, float] = {}
        for rank, rank_terms in enumerate(all_gather_object(terms)):
            for name, value in rank_terms.items():
                key = name if rank == get_rank() else f'rank{rank}:{name}'
                merged.setdefault(key, value)
        return merged

    def _last_checkpoint(self) -> str:
        """Where the last checkpoint written by the run is, for messages."""
        runner = self._runner
        path = osp.join(runner.work_dir, 'last_checkpoint')
        try:
            with open(path, encoding='utf-8') as f:
                last = f.read().strip()
        except OSError:
            last = ''
        if last:
            return (f'the last checkpoint, {last}, was written before it '
                    '(resume with --resume)')
        return 'no checkpoint was written yet'

    def _on_nonfinite(self, terms: dict[str, float], total: float) -> None:
        """Count a non-finite step; warn, or raise when it must stop.

        Args:
            terms (dict[str, float]): the non-finite terms (all ranks).
            total (float): this rank's total loss.

        Raises:
            NonFiniteLossError: ``action='stop'`` or a limit was passed.
        """
        runner = self._runner
        it = runner.iter  # 0-based; the log shows it + 1
        if it != self._last_bad_iter:  # several wrappers: count once
            self.consecutive = (self.consecutive +
                                1 if it == self._last_bad_iter + 1 else 1)
            self.total += 1
            self._last_bad_iter = it
            runner.message_hub.update_scalar('train/nonfinite_skips',
                                             self.total)
        what = (f'NonFiniteLossHook: iteration {it + 1}: non-finite loss '
                f'(loss={total}): {_describe(terms)}')
        reason = None
        if self.action == 'stop':
            reason = "action='stop'"
        elif self.consecutive > self.max_consecutive:
            reason = (f'{self.consecutive} consecutive non-finite losses '
                      f'(max_consecutive={self.max_consecutive})')
        elif self.max_total is not None and self.total > self.max_total:
            reason = (f'{self.total} non-finite losses in this run '
                      f'(max_total={self.max_total})')
        if reason is not None:
            raise NonFiniteLossError(
                f'{what}. Stopping the run: {reason}. No update was applied '
                f'for this batch; {self._last_checkpoint()}. Check the data '
                'and the learning rate, or configure the guard: config '
                "nonfinite_loss=dict(action='skip', max_consecutive=..., "
                'max_total=...) or tools/train.py --nonfinite-loss '
                '{skip,stop,off}.', terms, it + 1)
        limit = ('no limit' if self.max_total is None else
                 f'max {self.max_total}')
        runner.logger.warning(
            f'{what}; batch skipped: no backward, no optimizer step, '
            f'gradients zeroed ({self.consecutive} consecutive, max '
            f'{self.max_consecutive}; {self.total} in total, {limit})')

    # -------------------------------------------------------- checkpoints --
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Refuse non-finite weights; store the counters in ``meta``.

        Raises:
            NonFiniteWeightsError: ``check_checkpoint`` is on and a
                floating-point tensor of ``checkpoint['state_dict']`` has a
                NaN/Inf value. Nothing is written.
        """
        if not self.enabled:
            return
        if self.check_checkpoint:
            bad = [
                key for key, value in checkpoint.get('state_dict', {}).items()
                if isinstance(value, torch.Tensor) and (
                    value.is_floating_point() or value.is_complex())
                and not torch.isfinite(value).all()
            ]
            if bad:
                shown = ', '.join(bad[:5]) + (
                    f' (+{len(bad) - 5} more)' if len(bad) > 5 else '')
                self._runner = self._runner or runner
                meta = checkpoint.get('meta') or {}
                where = (f"epoch {meta['epoch']}" if 'epoch' in meta
                         and 'iter' not in meta else
                         f"iteration {meta.get('iter', runner.iter)}")
                raise NonFiniteWeightsError(
                    f'NonFiniteLossHook: refusing to write the checkpoint at '
                    f'{where}: {len(bad)} weight tensor(s) '
                    f'hold NaN/Inf values: {shown}; '
                    f'{self._last_checkpoint()}.', bad)
        checkpoint.setdefault('meta', {})[META_KEY] = dict(
            total=self.total,
            consecutive=self.consecutive,
            last_bad_iter=self._last_bad_iter)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Restore the counters when resuming (not for ``load_from``)."""
        state = (checkpoint.get('meta') or {}).get(META_KEY)
        if not getattr(runner, '_resume', False) or not isinstance(
                state, dict):
            return
        self.total = int(state.get('total', 0))
        self.consecutive = int(state.get('consecutive', 0))
        self._last_bad_iter = int(state.get('last_bad_iter', -2))
