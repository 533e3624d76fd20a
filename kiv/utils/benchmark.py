"""Side-by-side speed, FLOP and memory measurement (``tools/analysis``).

What ``tools/analysis/benchmark.py`` builds on, kept free of kiv's models
so it can be tested (and reused) on any callables:

- :class:`BenchCase`: one thing to time (a forward, a train step, a cache
  pass), how many images one call processes, and optional untimed set-up
  before each call;
- :func:`measure_interleaved`: every case timed in turn, repeat after
  repeat, in one process, so slow phases of a shared machine hit all cases
  alike; per-repeat times give medians and min/max spreads, and ratios are
  taken per repeat (side by side) before their median;
- :func:`count_flops`: FLOPs of one call with
  :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products,
  convolutions, attention; forward and backward; elementwise ops, norms,
  gathers are not counted);
- :func:`rss_bytes` / :func:`peak_rss_bytes` / :func:`reset_peak_rss`:
  process memory for the memory workers (one fresh process per case, its
  peak restarted after the imports);
- :func:`format_table`, :func:`format_ratios`: the markdown tables;
- :func:`cpu_model`: which CPU the figures came from.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    'BenchCase', 'CaseResult', 'RatioSpec', 'RatioResult', 'synchronize',
    'count_flops', 'measure_interleaved', 'compute_ratio', 'rss_bytes',
    'peak_rss_bytes', 'reset_peak_rss', 'format_table', 'format_ratios',
    'cpu_model', 'CLOCKS'
]

#: ``--clock`` choices: wall time (throughput) or process CPU time (robust
#: on a shared machine; sums the CPU time of all threads).
CLOCKS: dict[str, Callable[[], float]] = {
    'wall': time.perf_counter,
    'cpu': time.process_time,
}


@dataclass
class BenchCase:
    """One measured case.

    Attributes:
        name (str): short id, e.g. ``'timm_fwd'``.
        label (str): what it is, for the table.
        images (int): images processed by one call of ``step``.
        step (Callable[[], Any], optional): one call (a forward, a train
            step, a pass of the cache writer). None if unavailable.
        calls (int): calls per repeat (``--iters``; 1 for passes that
            cover all iterations in one call).
        before_call (Callable[[], None], optional): untimed set-up run before
            every call (e.g. a fresh output directory).
        unavailable (str, optional): why the case cannot run here (shown
            in the table instead of numbers).
        group (str): the benchmark group, e.g. ``'(a)'``.
    """
    name: str
    label: str
    images: int
    step: Optional[Callable[[], Any]] = None
    calls: int = 1
    before_call: Optional[Callable[[], None]] = None
    unavailable: Optional[str] = None
    group: str = ''

    @property
    def available(self) -> bool:
        """Whether the case has a step to run."""
        return self.step is not None and self.unavailable is None


@dataclass
class CaseResult:
    """Measurements of one case.

    Attributes:
        name (str): case id.
        label (str): description.
        group (str): benchmark group.
        images (int): images per call.
        seconds (list[float]): seconds per call, one value per repeat.
        flops (float, optional): counted FLOPs of one call.
        peak_memory (int, optional): peak memory of the case in bytes.
        unavailable (str, optional): why there are no numbers.
    """
    name: str
    label: str
    group: str = ''
    images: int = 0
    seconds: list[float] = field(default_factory=list)
    flops: Optional[float] = None
    peak_memory: Optional[int] = None
    unavailable: Optional[str] = None

    def _per_image(self) -> list[float]:
        return [s / self.images for s in self.seconds]

    @property
    def img_per_s(self) -> Optional[float]:
        """Median images per second over the repeats."""
        if not self.seconds:
            return None
        return self.images / statistics.median(self.seconds)

    @property
    def img_per_s_range(self) -> Optional[tuple[float, float]]:
        """``(min, max)`` images per second over the repeats."""
        if not self.seconds:
            return None
        return (self.images / max(self.seconds),
                self.images / min(self.seconds))

    @property
    def flops_per_image(self) -> Optional[float]:
        """Counted FLOPs per image."""
        if self.flops is None or not self.images:
            return None
        return self.flops / self.images

    @property
    def flops_per_s(self) -> Optional[float]:
        """Achieved FLOP/s (counted FLOPs over the median time)."""
        if self.flops is None or not self.seconds:
            return None
        return self.flops / statistics.median(self.seconds)

    def to_dict(self) -> dict:
        """JSON-able summary (raw times included)."""
        return dict(
            name=self.name, label=self.label, group=self.group,
            images_per_call=self.images, seconds_per_call=self.seconds,
            img_per_s=self.img_per_s,
            img_per_s_min_max=self.img_per_s_range,
            flops_per_call=self.flops,
            gflop_per_image=None if self.flops_per_image is None
            else self.flops_per_image / 1e9,
            achieved_gflop_per_s=None if self.flops_per_s is None
            else self.flops_per_s / 1e9,
            peak_memory_mb=None if self.peak_memory is None
            else self.peak_memory / 2**20,
            unavailable=self.unavailable)


@dataclass
class RatioSpec:
    """A ratio of per-image times: ``sum(numerator) / sum(denominator)``.

    Attributes:
        name (str): e.g. ``'adapter fwd / timm fwd'``.
        numerator (Sequence[str]): case names whose per-image times add up.
        denominator (Sequence[str]): case names whose per-image times add up.
        target (str): the goal, for the table (e.g. ``'<= 1.25'``).
    """
    name: str
    numerator: Sequence[str]
    denominator: Sequence[str]
    target: str = ''


@dataclass
class RatioResult:
    """A measured ratio.

    Attributes:
        name (str): the spec's name.
        target (str): the spec's target.
        values (list[float]): the ratio in every repeat.
        flop_ratio (float, optional): the same ratio of counted FLOPs per
            image (what the time ratio would be at equal efficiency).
        unavailable (str, optional): why it could not be computed.
    """
    name: str
    target: str = ''
    values: list[float] = field(default_factory=list)
    flop_ratio: Optional[float] = None
    unavailable: Optional[str] = None

    @property
    def median(self) -> Optional[float]:
        """Median over the repeats."""
        return statistics.median(self.values) if self.values else None

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return dict(name=self.name, target=self.target, median=self.median,
                    min=min(self.values) if self.values else None,
                    max=max(self.values) if self.values else None,
                    per_repeat=self.values, flop_ratio=self.flop_ratio,
                    unavailable=self.unavailable)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels of ``device`` (no-op on CPU).

    Args:
        device (torch.device | str): the benchmark device.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _sdpa_cpu_flops(query_shape: Sequence[int], key_shape: Sequence[int],
                    value_shape: Sequence[int], *args: Any,
                    **kwargs: Any) -> int:
    """FLOPs of a CPU flash-attention forward (from the input shapes)."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape: Sequence[int],
                             query_shape: Sequence[int],
                             key_shape: Sequence[int],
                             value_shape: Sequence[int], *args: Any,
                             **kwargs: Any) -> int:
    """FLOPs of a CPU flash-attention backward (from the input shapes)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                    value_shape)


def _cpu_attention_formulas() -> dict:
    """FLOP formulas of the CPU flash-attention kernels, which
    ``FlopCounterMode`` does not count (it knows the CUDA ones): the same
    formulas as for those."""
    from torch.utils.flop_counter import flop_registry
    aten = torch.ops.aten
    formulas = {}
    for name, formula in (
            ('_scaled_dot_product_flash_attention_for_cpu', _sdpa_cpu_flops),
            ('_scaled_dot_product_flash_attention_for_cpu_backward',
             _sdpa_cpu_backward_flops)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            formulas[op] = formula
    return formulas


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward and backward ops it runs).

    Counts matrix products, convolutions and attention (including the CPU
    flash-attention kernels); elementwise ops, norms, gathers and reductions
    are not counted.

    Args:
        step (Callable[[], Any]): the call to count.

    Returns:
        int: total FLOPs counted by
        :class:`torch.utils.flop_counter.FlopCounterMode`.
    """
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False,
                         custom_mapping=_cpu_attention_formulas()) as counter:
        step()
    return int(counter.get_total_flops())


def _run(case: BenchCase, calls: int, device: torch.device | str,
         clock: Callable[[], float]) -> float:
    """Seconds per call of ``calls`` calls (set-up hooks untimed)."""
    total = 0.0
    for _ in range(calls):
        if case.before_call is not None:
            case.before_call()
        synchronize(device)
        start = clock()
        case.step()
        synchronize(device)
        total += clock() - start
    return total / calls


def measure_interleaved(cases: Sequence[BenchCase],
                        warmup: int,
                        repeats: int,
                        device: torch.device | str = 'cpu',
                        clock: str = 'wall',
                        log: Optional[Callable[[str], None]] = None
                        ) -> dict[str, list[float]]:
    """Time every available case, interleaved, ``repeats`` times.

    Each case first runs ``min(warmup, calls)`` untimed calls. Then,
    ``repeats`` times, every case runs its ``calls`` calls in turn; the mean
    seconds per call of each (case, repeat) is recorded.

    Args:
        cases (Sequence[BenchCase]): the cases (unavailable ones skipped).
        warmup (int): untimed calls per case before the first repeat.
        repeats (int): interleaved repeats (>= 1).
        device (torch.device | str): synchronised around every call.
        clock (str): ``'wall'`` or ``'cpu'`` (see :data:`CLOCKS`).
        log (Callable[[str], None], optional): progress messages.

    Returns:
        dict[str, list[float]]: case name -> seconds per call, per repeat.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    if clock not in CLOCKS:
        raise ValueError(f'clock must be one of {list(CLOCKS)}, got '
                         f'{clock!r}')
    timer = CLOCKS[clock]
    log = log or (lambda msg: None)
    runnable = [c for c in cases if c.available]
    for case in runnable:
        n = min(warmup, case.calls)
        if n > 0:
            log(f'warm-up {case.name} ({n} call{"s" if n > 1 else ""})')
            _run(case, n, device, timer)
    times: dict[str, list[float]] = {c.name: [] for c in runnable}
    for r in range(repeats):
        for case in runnable:
            seconds = _run(case, case.calls, device, timer)
            times[case.name].append(seconds)
            log(f'repeat {r + 1}/{repeats} {case.name}: '
                f'{case.images / seconds:.3g} img/s')
    return times


def compute_ratio(spec: RatioSpec,
                  results: dict[str, CaseResult]) -> RatioResult:
    """A ratio of per-image times, per repeat (side by side).

    Args:
        spec (RatioSpec): which cases.
        results (dict[str, CaseResult]): measured cases by name.

    Returns:
        RatioResult: per-repeat values (empty, with ``unavailable`` set, if
        a case is missing or has no times).
    """
    out = RatioResult(spec.name, spec.target)
    names = list(spec.numerator) + list(spec.denominator)
    missing = [n for n in names
               if n not in results or not results[n].seconds]
    if missing:
        reasons = [f'{n}: {results[n].unavailable}' if n in results
                   and results[n].unavailable else f'{n}: not measured'
                   for n in missing]
        out.unavailable = '; '.join(reasons)
        return out
    repeats = min(len(results[n].seconds) for n in names)
    for r in range(repeats):
        num = sum(results[n].seconds[r] / results[n].images
                  for n in spec.numerator)
        den = sum(results[n].seconds[r] / results[n].images
                  for n in spec.denominator)
        out.values.append(num / den)
    flops = [results[n].flops_per_image for n in names]
    if all(f is not None for f in flops):
        num = sum(flops[:len(spec.numerator)])
        den = sum(flops[len(spec.numerator):])
        out.flop_ratio = num / den if den else None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform``
    knows): figures of machines of one kind differ by CPU model."""
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return name


def rss_bytes() -> int:
    """Current resident set size of this process in bytes.

    Returns:
        int: from ``/proc/self/statm`` on Linux, else the peak
        (``ru_maxrss``), which is never below it.
    """
    try:
        with open('/proc/self/statm') as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    Returns:
        int: ``VmHWM`` of ``/proc/self/status`` on Linux (this process's
        own peak: ``ru_maxrss`` also counts the peak of the process that
        started it, e.g. a large parent through ``subprocess``), else
        ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == 'darwin' else int(peak) * 1024


def reset_peak_rss() -> bool:
    """Restart :func:`peak_rss_bytes` at the current resident set size
    (Linux: ``5`` written to ``/proc/self/clear_refs``), so a later peak is
    not one of an earlier phase (imports, set-up).

    Returns:
        bool: whether the peak was reset.
    """
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return False
    return True


def _num(value: Optional[float], fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return '-'
    return format(value, fmt)


def format_table(results: Sequence[CaseResult]) -> str:
    """Markdown table of the cases.

    Args:
        results (Sequence[CaseResult]): in display order.

    Returns:
        str: one row per case: images/s (median, min-max over repeats),
        ms per image, counted GFLOP per image, achieved GFLOP/s, peak
        memory; unavailable cases show the reason.
    """
    lines = [
        '| case | what | img/s | min-max | ms/img | GFLOP/img | GFLOP/s '
        '| peak MB |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for res in results:
        if res.unavailable or not res.seconds:
            reason = res.unavailable or 'not measured'
            lines.append(f'| {res.name} | {res.label} | not available: '
                         f'{reason} | | | | | |')
            continue
        lo, hi = res.img_per_s_range
        ms = 1e3 / res.img_per_s
        gflop = None if res.flops_per_image is None else \
            res.flops_per_image / 1e9
        rate = None if res.flops_per_s is None else res.flops_per_s / 1e9
        mem = None if res.peak_memory is None else res.peak_memory / 2**20
        lines.append(
            f'| {res.name} | {res.label} | {_num(res.img_per_s, ".3g")} | '
            f'{_num(lo, ".3g")}-{_num(hi, ".3g")} | {_num(ms, ".1f")} | '
            f'{_num(gflop, ".3g")} | {_num(rate, ".3g")} | '
            f'{_num(mem, ".0f")} |')
    return '\n'.join(lines)


def format_ratios(ratios: Sequence[RatioResult]) -> str:
    """Markdown table of the ratios.

    Args:
        ratios (Sequence[RatioResult]): in display order.

    Returns:
        str: one row per ratio: median, min-max over repeats, the FLOP
        ratio and the target.
    """
    lines = ['| ratio (time per image) | median | min-max | FLOP ratio | '
             'target |', '|---|---:|---:|---:|---|']
    for ratio in ratios:
        if ratio.unavailable or not ratio.values:
            lines.append(f'| {ratio.name} | not available: '
                         f'{ratio.unavailable or "not measured"} | | | '
                         f'{ratio.target} |')
            continue
        lines.append(
            f'| {ratio.name} | {_num(ratio.median, ".3f")} | '
            f'{_num(min(ratio.values), ".3f")}-'
            f'{_num(max(ratio.values), ".3f")} | '
            f'{_num(ratio.flop_ratio, ".3f")} | {ratio.target} |')
    return '\n'.join(lines)
