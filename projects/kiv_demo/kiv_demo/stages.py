"""Cached pipeline stages with a progress display (stage i/N, elapsed, ETA).

A stage writes everything into ``<work_dir>/<name>/`` and then, atomically,
``<work_dir>/<name>/done``: a JSON file with the stage's *fingerprint* and
its result. The fingerprint hashes the stage's parameters, the seed, the
text of the config files it reads and the fingerprints of the stages it
depends on, so a re-run reuses a finished stage exactly when nothing it
depends on changed; anything else (a different preset, seed, config edit or
an upstream re-run) re-runs it and, through the fingerprints, everything
downstream of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from mmengine.hooks import Hook

from kiv.utils.atomic import atomic_write_json

__all__ = ['Stage', 'StageContext', 'ProgressDisplay', 'ProgressHook',
           'run_stages', 'working_dir', 'read_timings', 'expected_seconds',
           'size_key', 'critical_path_seconds']

DONE = 'done'
#: measured stage times, in the work dir
TIMINGS = 'timings.json'


@dataclass
class Stage:
    """One step of the demo.

    Args:
        name (str): folder name under the work dir (and the key of its
            result).
        title (str): one-line description shown in the progress display.
        run (callable): ``run(ctx: StageContext) -> dict`` (JSON-safe
            result), executed with the work dir as current directory.
        deps (Sequence[str]): stages whose outputs it reads.
        params (dict): JSON-safe parameters (fingerprinted).
        files (Sequence[str]): files whose content is fingerprinted (e.g.
            the configs it loads, with their ``_base_`` files).
        cost (float): expected seconds on an idle 2-core machine, for the
            ETA when this stage has not run here before at this size.
    """
    name: str
    title: str
    run: Callable[['StageContext'], dict]
    deps: Sequence[str] = ()
    params: dict = field(default_factory=dict)
    files: Sequence[str] = ()
    cost: float = 10.0


@dataclass
class StageContext:
    """What a running stage gets.

    Attributes:
        stage (Stage): the stage.
        dir (str): its output folder, relative to the work dir (cwd).
        seed (int): the run's seed.
        results (dict[str, dict]): results of the finished stages so far.
        progress (ProgressDisplay): for iteration progress.
    """
    stage: Stage
    dir: str
    seed: int
    results: dict
    progress: 'ProgressDisplay'


@contextmanager
def working_dir(path: str) -> Iterator[None]:
    """Run a block with ``path`` as the current directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f'{seconds // 60:d}:{seconds % 60:02d}'


class ProgressDisplay:
    """Prints ``[i/N] stage | elapsed | ETA`` lines and iteration progress.

    The ETA scales the remaining stages' expected costs by how fast the
    stages run so far went compared with their expected costs, divided by
    the number of stages that run at once.

    Args:
        costs (dict[str, float]): expected seconds of each stage to run.
        stream: where to print. Defaults to ``sys.stdout``.
        jobs (int): stages running at once. Defaults to 1.
    """

    def __init__(self, costs: dict[str, float], stream=None,
                 jobs: int = 1) -> None:
        self.costs = dict(costs)
        self.stream = stream or sys.stdout
        self.jobs = max(1, int(jobs))
        self.start = time.monotonic()
        self.done_cost = 0.0  # expected cost of the stages finished
        self.done_time = 0.0  # their measured time
        #: running stages: name -> [start time, fraction done]
        self.running: dict[str, list[float]] = {}
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self._last_print = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self) -> float:
        """Seconds left: remaining expected cost x measured speed ratio."""
        spent, expected = self.done_time, self.done_cost
        remaining = sum(self.costs.values())
        now = time.monotonic()
        for name, (start, fraction) in self.running.items():
            done = self.costs.get(name, 0.0) * min(fraction, 1.0)
            remaining -= done
            spent += now - start
            expected += done
        # measured / expected speed, damped so one short stage cannot swing it
        ratio = (spent + 60.0) / (expected + 60.0)
        return max(0.0, remaining * ratio / self.jobs)

    def print(self, text: str, end: str = '\n') -> None:
        self.stream.write(text + end)
        self.stream.flush()

    def start_stage(self, index: int, total: int, stage: Stage,
                    cached: bool) -> None:
        state = 'cached, reused' if cached else 'running'
        self.print(f'[{index}/{total}] {stage.name}: {stage.title} '
                   f'({state}) | elapsed {_fmt(self.elapsed())} | '
                   f'ETA {_fmt(self.eta())}')
        if not cached:
            self.running[stage.name] = [time.monotonic(), 0.0]

    def update(self, fraction: float, text: str,
               name: str | None = None) -> None:
        """Report progress inside a running stage (0..1); ``name`` is
        needed only when several stages run."""
        if name is None and len(self.running) == 1:
            name = next(iter(self.running))
        if name in self.running:
            self.running[name][1] = fraction
        now = time.monotonic()
        if not self.tty and now - self._last_print < 15 and fraction < 1:
            return
        self._last_print = now
        who = f'{name}: ' if self.jobs > 1 and name else ''
        line = (f'      {who}{text} | elapsed {_fmt(self.elapsed())} | '
                f'ETA {_fmt(self.eta())}')
        if self.tty:
            self.stream.write('\r' + line.ljust(100)[:120])
            if fraction >= 1:
                self.stream.write('\n')
            self.stream.flush()
        else:
            self.print(line)

    def end_stage(self, name: str | None = None) -> float:
        """Close a running stage (the only one if ``name`` is None).

        Returns:
            float: its seconds.
        """
        if name is None:
            if len(self.running) != 1:
                return 0.0
            name = next(iter(self.running))
        if name not in self.running:
            return 0.0
        seconds = time.monotonic() - self.running.pop(name)[0]
        self.done_time += seconds
        self.done_cost += self.costs.pop(name, 0.0)
        who = f'{name} ' if self.jobs > 1 else ''
        if self.tty:
            self.stream.write('\n')
        self.print(f'      {who}done in {_fmt(seconds)}')
        return seconds


class ProgressHook(Hook):
    """mmengine hook feeding training / test iterations to the display.

    Args:
        progress (ProgressDisplay): the display.
        what (str): label, e.g. ``'train'``.
        share (float): fraction of the stage's cost that training takes
            (the rest is evaluation).
    """

    priority = 'VERY_LOW'

    def __init__(self, progress: ProgressDisplay, what: str = 'train',
                 share: float = 0.9) -> None:
        self.progress = progress
        self.what = what
        self.share = share

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        total = runner.max_iters
        done = runner.iter + 1
        loss = ''
        if isinstance(outputs, dict) and 'loss' in outputs:
            loss = f' loss {float(outputs["loss"]):.3f}'
        self.progress.update(self.share * done / total,
                             f'{self.what} iter {done}/{total}{loss}')

    def after_test_iter(self, runner, batch_idx: int, data_batch=None,
                        outputs=None) -> None:
        total = len(runner.test_dataloader)
        self.progress.update(
            self.share + (1 - self.share) * (batch_idx + 1) / total,
            f'test batch {batch_idx + 1}/{total}')


def _file_digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def size_key(stage: Stage) -> str:
    """What a stage's run time depends on: its name and parameters (not the
    seed, not the inputs' content)."""
    blob = json.dumps(dict(name=stage.name, params=stage.params),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_timings(work_dir: str) -> dict[str, dict]:
    """Measured stage times of earlier runs: ``name -> {size key:
    seconds}``."""
    found = _read_done(osp.join(work_dir, TIMINGS))
    return found if isinstance(found, dict) else {}


def expected_seconds(stage: Stage, timings: dict[str, dict]) -> float:
    """The last measured time of ``stage`` at its size, else its ``cost``.
    """
    measured = timings.get(stage.name, {}).get(size_key(stage))
    return float(measured) if measured is not None else float(stage.cost)


def fingerprint(stage: Stage, seed: int, upstream: dict[str, str]) -> str:
    """Hash of everything a stage's outputs depend on."""
    payload = dict(name=stage.name, params=stage.params, seed=seed,
                   files={osp.basename(f): _file_digest(f)
                          for f in sorted(stage.files)},
                   deps={d: upstream[d] for d in stage.deps})
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_done(path: str) -> dict | None:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


#: a stage's mmengine messages below WARNING (weights loaded, parameters
#: initialised, teachers read from a cache) go to this file in its folder
STAGE_LOG = 'stage.log'


@contextmanager
def _info_to_file(path: str) -> Iterator[None]:
    """Send the current mmengine logger's INFO messages to ``path`` only.

    Its console handlers keep warnings and errors; the console stays the
    progress display's. A Runner built inside makes its own logger (the
    stages set its level to WARNING and its files to the stage folder).
    """
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    consoles = [h for h in logger.handlers
                if type(h) is logging.StreamHandler]
    levels = [h.level for h in consoles]
    to_file = logging.FileHandler(path, encoding='utf-8')
    to_file.setFormatter(logging.Formatter(
        '%(asctime)s - %(name)s - %(levelname)s - %(message)s'))
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    logger.addHandler(to_file)
    try:
        yield
    finally:
        logger.removeHandler(to_file)
        to_file.close()
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)


def _execute(stage: Stage, work_dir: str, seed: int, results: dict,
             progress, fingerprint_: str) -> float:
    """Run one stage in a clean folder and write its ``done`` marker.

    Returns:
        float: its seconds.
    """
    stage_dir = osp.join(work_dir, stage.name)
    if osp.isdir(stage_dir):
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir)
    start = time.monotonic()
    with working_dir(work_dir), _info_to_file(osp.join(stage_dir,
                                                       STAGE_LOG)):
        result = stage.run(StageContext(stage, stage.name, seed, results,
                                        progress))
    seconds = time.monotonic() - start
    atomic_write_json(dict(fingerprint=fingerprint_, result=result,
                           seconds=round(seconds, 1)),
                      osp.join(stage_dir, DONE), indent=1, sort_keys=True)
    return seconds


class _ChildProgress:
    """A forked stage's progress, sent to the parent's display."""

    def __init__(self, queue, name: str) -> None:
        self.queue, self.name, self._last = queue, name, 0.0

    def update(self, fraction: float, text: str) -> None:
        now = time.monotonic()
        if now - self._last < 1.0 and fraction < 1:
            return
        self._last = now
        self.queue.put(('progress', self.name, float(fraction), text))


def _child(stage: Stage, work_dir: str, seed: int, results: dict, queue,
           fingerprint_: str, threads: int | None) -> None:
    """Body of a forked stage process: run, report, exit."""
    code = 0
    try:
        if threads:
            import torch
            torch.set_num_threads(threads)
        seconds = _execute(stage, work_dir, seed, results,
                           _ChildProgress(queue, stage.name), fingerprint_)
        queue.put(('done', stage.name, seconds))
    except BaseException:  # noqa: B902  reported to the parent, then exit
        queue.put(('error', stage.name, traceback.format_exc()))
        code = 1
    finally:
        # hand the message to the pipe before the process ends (Queue.put
        # only queues it for a feeder thread)
        queue.close()
        queue.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_stages(stages: Sequence[Stage], work_dir: str, seed: int,
               fresh: bool = False, stream=None, jobs: int = 1,
               threads: int | None = None) -> dict[str, dict]:
    """Run (or reuse) every stage.

    With ``jobs > 1`` up to ``jobs`` stages whose dependencies are done run
    at once, each in a forked process with ``threads`` torch threads; of
    the ready stages the one heading the longest chain of expected stage
    times to the end starts first (:func:`critical_path_seconds`; list
    order breaks ties). A stage's outputs depend only on its inputs, seed
    and thread count, never on what runs beside it.

    Args:
        stages (Sequence[Stage]): in dependency order.
        work_dir (str): the demo's work dir (created).
        seed (int): the run's seed (part of every fingerprint).
        fresh (bool): ignore finished stages and run everything.
        stream: progress output. Defaults to ``sys.stdout``.
        jobs (int): stages run at once. Defaults to 1 (in this process).
        threads (int, optional): torch threads of each forked stage.

    Returns:
        dict[str, dict]: every stage's result, plus under ``'_stages'`` per
        stage ``{'cached': bool, 'seconds': float}``.

    Raises:
        RuntimeError: a forked stage failed (its traceback in the message).
    """
    os.makedirs(work_dir, exist_ok=True)
    names = [s.name for s in stages]
    for s in stages:
        missing = [d for d in s.deps if d not in names[:names.index(s.name)]]
        if missing:
            raise ValueError(f'demo stage {s.name!r} depends on {missing}, '
                             'which do not run before it')
    prints: dict[str, str] = {}
    cached: dict[str, dict] = {}
    for s in stages:
        prints[s.name] = fingerprint(s, seed, prints)
        done = _read_done(osp.join(work_dir, s.name, DONE))
        if (not fresh and done is not None
                and done.get('fingerprint') == prints[s.name]):
            cached[s.name] = done
    timings = read_timings(work_dir)
    expected = {s.name: expected_seconds(s, timings) for s in stages
                if s.name not in cached}
    progress = ProgressDisplay(expected, stream, jobs=jobs)
    results: dict[str, Any] = {'_stages': {}}
    index = {s.name: i for i, s in enumerate(stages, 1)}

    def finish(s: Stage, seconds: float) -> None:
        results[s.name] = _read_done(osp.join(work_dir, s.name,
                                              DONE))['result']
        results['_stages'][s.name] = dict(cached=False, seconds=seconds)
        timings.setdefault(s.name, {})[size_key(s)] = round(seconds, 1)
        atomic_write_json(timings, osp.join(work_dir, TIMINGS), indent=1,
                          sort_keys=True)

    pending = []
    for s in stages:
        if s.name in cached:
            progress.start_stage(index[s.name], len(stages), s, True)
            results[s.name] = cached[s.name]['result']
            results['_stages'][s.name] = dict(
                cached=True, seconds=cached[s.name].get('seconds', 0.0))
        else:
            pending.append(s)
    if jobs <= 1:
        for s in pending:
            progress.start_stage(index[s.name], len(stages), s, False)
            seconds = _execute(s, work_dir, seed, results, progress,
                               prints[s.name])
            progress.end_stage(s.name)
            finish(s, seconds)
    else:
        chain = critical_path_seconds(pending, expected)
        pending.sort(key=lambda s: (-chain[s.name], index[s.name]))
        _run_forked(pending, jobs, threads, work_dir, seed, results,
                    progress, prints, index, len(stages), finish)
    results['_stages']['total_seconds'] = progress.elapsed()
    return results


def critical_path_seconds(stages: Sequence[Stage],
                          expected: dict[str, float]) -> dict[str, float]:
    """Per stage, the expected seconds of the longest chain of stages from
    its start to the end of the run (itself and the stages that need it,
    directly or not): the priority of a list scheduler that keeps the
    critical path moving.

    Args:
        stages (Sequence[Stage]): in dependency order (dependencies outside
            ``stages``, e.g. cached ones, are ignored).
        expected (dict[str, float]): expected seconds per stage name.

    Returns:
        dict[str, float]: stage name -> chain seconds.
    """
    names = {s.name for s in stages}
    needed_by: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for d in s.deps:
            if d in names:
                needed_by[d].append(s.name)
    chain: dict[str, float] = {}
    for s in reversed(list(stages)):
        chain[s.name] = expected[s.name] + max(
            (chain[n] for n in needed_by[s.name]), default=0.0)
    return chain


def _run_forked(pending: list[Stage], jobs: int, threads: int | None,
                work_dir: str, seed: int, results: dict,
                progress: ProgressDisplay, prints: dict[str, str],
                index: dict[str, int], total: int,
                finish: Callable[[Stage, float], None]) -> None:
    """The ``jobs > 1`` scheduler of :func:`run_stages`."""
    import multiprocessing
    import queue as queue_lib
    mp = multiprocessing.get_context('fork')
    queue = mp.Queue()
    done = set(results) - {'_stages'}
    running: dict[str, Any] = {}
    by_name = {s.name: s for s in pending}
    try:
        while pending or running:
            for s in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in done for d in s.deps):
                    progress.start_stage(index[s.name], total, s, False)
                    proc = mp.Process(
                        target=_child, args=(s, work_dir, seed, results,
                                             queue, prints[s.name],
                                             threads), daemon=False)
                    proc.start()
                    running[s.name] = proc
                    pending.remove(s)
            try:
                msg = queue.get(timeout=2.0)
            except queue_lib.Empty:
                for name, proc in running.items():
                    if proc.exitcode is not None:  # its message came first
                        raise RuntimeError(f'demo stage {name!r} ended '
                                           f'(exit code {proc.exitcode}) '
                                           'without reporting')
                continue
            kind, name = msg[0], msg[1]
            if kind == 'progress':
                progress.update(msg[2], msg[3], name=name)
            elif kind == 'error':
                raise RuntimeError(f'demo stage {name!r} failed:\n{msg[2]}')
            else:
                running.pop(name).join()
                progress.end_stage(name)
                finish(by_name[name], msg[2])
                done.add(name)
    finally:
        for proc in running.values():
            if proc.is_alive():
                proc.terminate()
            proc.join()
