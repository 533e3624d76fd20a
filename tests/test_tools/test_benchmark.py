"""tools/analysis/benchmark.py and its helpers (kiv.utils.benchmark).

The tool runs on the tiny distillation config in CI: its numbers are
printed, not asserted; the table structure, the JSON, that every case is
built from the config and that every ratio is finite and positive are.
(``test_test_tool_options.py`` is about ``tools/test.py``'s options.)
"""
from __future__ import annotations

import importlib.util
import json
import math
import mmap
import os
import os.path as osp
import re
import shutil
import sys

import pytest
import torch
from mmengine.config import Config

from kiv.utils.benchmark import (BenchCase, CaseResult, RatioSpec,
                                 compute_ratio, count_flops, format_ratios,
                                 format_table, measure_interleaved,
                                 peak_rss_bytes, reset_peak_rss)

from kiv.testing.paths import REPO, TINY_DISTILL_CFG
from kiv.testing.tools import run_tool

CASES = ['timm_fwd', 'timm_train', 'adapter_fwd', 'adapter_train',
         'teachers_fwd', 'teachers_fused', 'distill_online',
         'distill_cached', 'cache_write', 'optim_default', 'optim_config']
RATIOS = ['adapter fwd / timm fwd',
          'adapter train (frozen base) / timm train (all)',
          'cached distill step / student-only train step',
          'online distill step / (teachers fwd + student step)',
          'cache writing / teachers fwd',
          'teachers fwd, fused + channels-last / as configured',
          "optimizer step as configured / mmengine's default groups"]
OPTIM = ('optim_default', 'optim_config')


@pytest.fixture(scope='module')
def tiny_teachers(tmp_path_factory) -> str:
    """A directory holding the tiny config's teachers (data/tiny_teachers),
    the tool's cwd."""
    from kiv.testing.tiny_teachers import create_tiny_teachers
    root = str(tmp_path_factory.mktemp('benchmark'))
    create_tiny_teachers(osp.join(root, 'data', 'tiny_teachers'))
    return root


@pytest.mark.slow
def test_benchmark_tiny_config_all_cases(tiny_teachers, tmp_path):
    """Every case and ratio of the tiny config: table, JSON, finite
    numbers."""
    out = tmp_path / 'bench.json'
    proc = run_tool(['analysis/benchmark.py', '--config', TINY_DISTILL_CFG,
                     '--iters', '1', '--warmup', '1', '--repeats', '2',
                     '--memory', 'none', '--quiet', '--out', str(out)],
                    tiny_teachers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the numbers, for the log
    report = json.loads(out.read_text())

    # sizes from the config: its batch size and its pipeline's 56 px
    meta = report['meta']
    assert meta['config'] == TINY_DISTILL_CFG
    assert meta['batch_size'] == 4 and meta['input_size'] == [56, 56]
    assert meta['random_weights'] == []
    cases = {c['name']: c for c in report['cases']}
    assert list(cases) == CASES
    for name, case in cases.items():
        assert case['unavailable'] is None, (name, case['unavailable'])
        assert len(case['seconds_per_call']) == 2
        assert math.isfinite(case['img_per_s']) and case['img_per_s'] > 0
        # an optimizer step has no matrix product to count
        assert (case['gflop_per_image'] == 0) == (name in OPTIM), name
        assert math.isfinite(case['achieved_gflop_per_s'])
    # the config's teachers, in its order
    label = re.fullmatch(r'teachers forward \(dinov2, clip, detector; '
                         r'(\d+) BatchNorms\)', cases['teachers_fwd']['label'])
    assert label and int(label[1]) > 0, cases['teachers_fwd']['label']
    # the same teachers, BatchNorms folded (the FLOP counter counts none
    # of theirs, so the label says whether any is left): fewer FLOPs
    assert cases['teachers_fused']['label'].endswith(
        '(dinov2, clip, detector; 0 BatchNorms)'), \
        cases['teachers_fused']['label']
    assert 0 < cases['teachers_fused']['gflop_per_image'] <= \
        cases['teachers_fwd']['gflop_per_image']
    # a cached step holds no teacher: its FLOPs are the student step's
    assert cases['distill_online']['gflop_per_image'] > \
        cases['distill_cached']['gflop_per_image']

    # the same trainable tensors: mmengine's default constructor gives each
    # its own group under paramwise_cfg, the config's constructor a few
    # groups, and its fused AdamW
    default = re.fullmatch(
        r"optimizer step, mmengine's default constructor \(mmengine\."
        r'DefaultOptimWrapperConstructor, single-tensor; (\d+) tensors in '
        r'(\d+) groups\)', cases['optim_default']['label'])
    grouped = re.fullmatch(
        r'optimizer step as configured \(kiv\.GroupedOptimWrapper'
        r'Constructor, fused; (\d+) tensors in (\d+) groups\)',
        cases['optim_config']['label'])
    assert default and grouped, (cases['optim_default']['label'],
                                 cases['optim_config']['label'])
    assert default[1] == default[2] == grouped[1]
    assert 1 < int(grouped[2]) < 10 < int(grouped[1])

    ratios = {r['name']: r for r in report['ratios']}
    assert list(ratios) == RATIOS
    for name, ratio in ratios.items():
        assert ratio['unavailable'] is None, (name, ratio['unavailable'])
        assert len(ratio['per_repeat']) == 2
        assert all(math.isfinite(v) and v > 0 for v in ratio['per_repeat'])
        assert ratio['min'] <= ratio['median'] <= ratio['max']
        if name.startswith('optimizer step'):
            assert ratio['flop_ratio'] is None  # 0 / 0 counted FLOPs
        else:
            assert math.isfinite(ratio['flop_ratio']) and \
                ratio['flop_ratio'] > 0

    # the printed tables: header, one row per case / ratio
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(
        'kiv benchmark: kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images'
        '.py, batch 4, 56x56 px, cpu'), lines[0]
    head = lines.index('| case | what | img/s | min-max | ms/img | '
                       'GFLOP/img | GFLOP/s | peak MB |')
    rows = [line.split('|')[1].strip()
            for line in lines[head + 2:head + 2 + len(CASES)]]
    assert rows == CASES
    head = [i for i, line in enumerate(lines)
            if line.startswith('| ratio (time per image)')][0]
    assert len(lines) >= head + 2 + len(RATIOS)
    for line, name in zip(lines[head + 2:head + 2 + len(RATIOS)], RATIOS):
        assert line.startswith(f'| {name} | ')
        assert re.match(r'\| .+ \| \d+\.\d{3} \| \d+\.\d{3}-\d+\.\d{3} '
                        r'\| (\d+\.\d{3}|-) \| ', line), line


@pytest.mark.slow
def test_benchmark_random_weights_and_memory(tiny_teachers, tmp_path):
    """A cached config is benchmarked as its online config;
    --random-weights stands in for missing weights files (one file per
    original: the student base and the base teacher share theirs);
    --cfg-options applies first; --memory rss: each case in a fresh
    process, a positive peak."""
    cwd = tmp_path / 'cwd'
    teachers = cwd / 'data' / 'tiny_teachers'
    teachers.mkdir(parents=True)
    for name in os.listdir(osp.join(tiny_teachers, 'data', 'tiny_teachers')):
        if not name.endswith('.pth'):  # the detector's mmdet config only
            shutil.copy(osp.join(tiny_teachers, 'data', 'tiny_teachers',
                                 name), teachers)
    out, work = tmp_path / 'mem.json', tmp_path / 'work'
    cached = TINY_DISTILL_CFG.replace('.py', '_cached.py')
    proc = run_tool(['analysis/benchmark.py', '--config', cached,
                     '--random-weights', '--batch-size', '2', '--cases',
                     'timm_train', '--iters', '1', '--warmup', '0',
                     '--repeats', '1', '--no-flops', '--memory', 'rss',
                     '--work-dir', str(work), '--cfg-options',
                     'model.student.conv_inplane=8', '--out', str(out)],
                    str(cwd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['meta']['random_weights'] == [
        'student base', 'teacher dinov2', 'teacher clip', 'teacher detector']
    assert report['meta']['batch_size'] == 2
    assert 'random weights: student base, teacher dinov2' in proc.stdout
    case, = report['cases']
    assert case['name'] == 'timm_train' and case['peak_memory_mb'] > 0
    assert case['gflop_per_image'] is None
    assert 'adapter_fwd: not measured' in report['ratios'][0]['unavailable']
    # the prepared config: online, --cfg-options applied, weights in the
    # work dir, the base teacher's file is the student base's
    cfg = Config.fromfile(str(work / 'config.json'))
    assert 'teacher_cache' not in cfg and 'teacher_cache' not in cfg.model
    assert cfg.train_dataloader.dataset.type == 'kiv.UnlabeledImageDataset'
    assert cfg.model.student.conv_inplane == 8
    base = cfg.model.student.base.checkpoint
    assert base.startswith(str(work / 'weights'))
    assert cfg.model.teachers.dinov2.source.checkpoint == base
    assert cfg.model.grad_share_interval == 0


def _tool():
    """tools/analysis/benchmark.py as a module (kiv is already imported)."""
    spec = importlib.util.spec_from_file_location(
        'kiv_benchmark_tool', osp.join(REPO, 'tools', 'analysis',
                                       'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_options(capsys, tmp_path, monkeypatch):
    tool = _tool()
    args = tool.parse_args(['--config', TINY_DISTILL_CFG, '--cases',
                            'adapter_fwd, timm_fwd', '--device', 'cpu'])
    assert args.batch_size is None  # the config's
    assert args.cases == ['adapter_fwd', 'timm_fwd'] and args.memory == 'rss'
    for argv, message in (
            ([], '--config'),
            (['--cases', 'timm_fwd,nope'], "unknown cases ['nope']"),
            (['--memory', 'cuda', '--device', 'cpu'], '--memory cuda needs'),
            (['--iters', '0'], '--iters must be >= 1')):
        if argv:
            argv = ['--config', TINY_DISTILL_CFG] + argv
        with pytest.raises(SystemExit) as exc:
            tool.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    # the config's weights files: the student base and every teacher
    cfg = Config.fromfile(TINY_DISTILL_CFG)
    assert [what for what, _ in tool.weight_files(cfg.model)] == [
        'student base', 'teacher dinov2', 'teacher clip', 'teacher detector']
    # missing (no data/tiny_teachers here): named, with the switch that
    # replaces them
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='pass --random-weights') as exc:
        tool.Workspace(str(tmp_path / 'work')).prepare(args, print)
    assert 'student base: data/tiny_teachers/dinov2_tiny.pth' in \
        str(exc.value)


# ---------------------------------------------------------------- helpers
def test_measure_interleaved_order_and_warmup():
    calls = []

    def case(name: str, n: int, setup: bool = False) -> BenchCase:
        return BenchCase(
            name, name, images=2, calls=n,
            step=lambda: calls.append(name),
            before_call=(lambda: calls.append(f'{name}:setup'))
            if setup else None)

    cases = [case('a', 2), case('b', 1, setup=True),
             BenchCase('c', 'c', 1, unavailable='no API')]
    times = measure_interleaved(cases, warmup=1, repeats=2)
    assert calls == ['a', 'b:setup', 'b',  # warm-up, one call each
                     'a', 'a', 'b:setup', 'b',  # repeat 1
                     'a', 'a', 'b:setup', 'b']  # repeat 2
    assert set(times) == {'a', 'b'}
    assert all(len(v) == 2 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError, match='clock'):
        measure_interleaved(cases, 0, 1, clock='sundial')


def test_ratio_is_taken_per_repeat():
    results = {
        'x': CaseResult('x', 'x', images=2, seconds=[2.0, 4.0],
                        flops=20.0),
        'y': CaseResult('y', 'y', images=1, seconds=[1.0, 1.0], flops=5.0),
        'z': CaseResult('z', 'z', images=4, seconds=[4.0, 2.0], flops=8.0),
        'n': CaseResult('n', 'n', unavailable='no API'),
    }
    ratio = compute_ratio(RatioSpec('x/(y+z)', ['x'], ['y', 'z'], '<= 1'),
                          results)
    # per image: x 1, 2; y 1, 1; z 1, 0.5
    assert ratio.values == [0.5, 2 / 1.5]
    assert ratio.flop_ratio == 10.0 / (5.0 + 2.0)
    missing = compute_ratio(RatioSpec('n/x', ['n'], ['x']), results)
    assert missing.values == [] and missing.unavailable == 'n: no API'
    table = format_ratios([ratio, missing])
    assert '| x/(y+z) | 0.917 | 0.500-1.333 | 1.429 | <= 1 |' in table
    assert '| n/x | not available: n: no API |' in table


def test_case_table():
    res = CaseResult('x', 'thing', '(a)', images=4, seconds=[2.0, 1.0, 4.0],
                     flops=8e9, peak_memory=3 * 2**20)
    assert res.img_per_s == 2.0 and res.img_per_s_range == (1.0, 4.0)
    assert res.flops_per_image == 2e9 and res.flops_per_s == 4e9
    table = format_table([res, CaseResult('y', 'other', unavailable='why')])
    assert '| x | thing | 2 | 1-4 | 500.0 | 2 | 4 | 3 |' in table
    assert '| y | other | not available: why |' in table


def test_count_flops_linear_forward_and_backward():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 3 * 8 * 4
    # backward: grad input and grad weight, each as large as the forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 3 * 8 * 4


def test_peak_rss_is_this_process_and_restarts():
    """The memory workers' peak: this process's own (not the peak of the
    process that started it), restartable after the imports.

    The 32 MiB are a fresh anonymous mapping, unmapped afterwards: a tensor
    of that size can come from (and go back to) a free chunk of the heap
    that earlier tests in this process left resident, and then changes
    neither the resident set nor its peak (seen with pytest-xdist, where a
    worker runs another sequence of test files)."""
    size = 32 * 2**20
    if not reset_peak_rss():
        pytest.skip('no /proc/self/clear_refs here')
    before = peak_rss_bytes()
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1  # written: resident
    with_block = peak_rss_bytes()
    block.close()
    assert with_block >= before + 24 * 2**20  # the peak follows this process
    assert reset_peak_rss()
    assert peak_rss_bytes() < with_block - 16 * 2**20


def test_benchmark_roi_align_runs_and_agrees(tmp_path):
    """tools/analysis/benchmark_roi_align.py: both kernels agree on the
    batch, both are timed, the ratio is finite and positive."""
    proc = run_tool(['analysis/benchmark_roi_align.py', '--batch', '2',
                     '--rois', '6', '--iters', '1', '--repeats', '2'],
                    cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    diff = re.search(r'output ([0-9.e+-]+), input gradient ([0-9.e+-]+)',
                     out)
    assert diff and max(float(diff[1]), float(diff[2])) < 1e-4, out
    assert '| mmcv_roi_align |' in out and '| kiv_roi_align |' in out
    ratio = re.search(r"\| kiv.RoIAlign / mmcv's RoIAlign \| ([0-9.]+) \|",
                      out)
    assert ratio and 0 < float(ratio[1]) < math.inf, out
    bad = run_tool(['analysis/benchmark_roi_align.py', '--min-box', '0'],
                   cwd=str(tmp_path))
    assert bad.returncode == 2 and '--min-box' in bad.stderr
