"""tools/analysis/benchmark.py and its helpers (kiv.utils.benchmark).

The tool runs at ``--arch tiny`` in CI: its numbers are printed, not
asserted; the table structure, the JSON and that every ratio is finite are.
(``test_benchmark_options.py`` is about ``tools/test.py``'s options.)
"""
from __future__ import annotations

import importlib.util
import json
import math
import os.path as osp
import re
import sys

import pytest
import torch

from kiv.utils.benchmark import (BenchCase, CaseResult, RatioSpec,
                                 compute_ratio, count_flops, format_ratios,
                                 format_table, measure_interleaved)

from conftest import REPO, run_tool

CASES = ['timm_fwd', 'timm_train', 'adapter_fwd', 'adapter_train',
         'teachers_fwd', 'distill_online', 'distill_cached', 'cache_write']
RATIOS = ['adapter fwd / timm fwd',
          'adapter train (frozen base) / timm train (all)',
          'cached distill step / student-only train step',
          'online distill step / (teachers fwd + student step)',
          'cache writing / teachers fwd']


def _has_cache_api() -> bool:
    return importlib.util.find_spec('kiv.datasets.teacher_cache') is not None


def test_benchmark_tiny_all_cases(tmp_path):
    """Every case and ratio at --arch tiny: table, JSON, finite numbers."""
    out = tmp_path / 'bench.json'
    proc = run_tool(['analysis/benchmark.py', '--arch', 'tiny', '--iters',
                     '1', '--warmup', '1', '--repeats', '2', '--memory',
                     'none', '--quiet', '--out', str(out)], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the numbers, for the log
    report = json.loads(out.read_text())

    assert report['meta']['arch'] == 'tiny'
    assert report['meta']['batch_size'] == 2
    assert report['meta']['img_size'] == 56
    cases = {c['name']: c for c in report['cases']}
    assert list(cases) == CASES
    cached = ['distill_cached', 'cache_write']
    for name, case in cases.items():
        if name in cached and not _has_cache_api():
            assert case['unavailable']
            continue
        assert case['unavailable'] is None, (name, case['unavailable'])
        assert len(case['seconds_per_call']) == 2
        assert math.isfinite(case['img_per_s']) and case['img_per_s'] > 0
        assert case['gflop_per_image'] > 0
        assert math.isfinite(case['achieved_gflop_per_s'])
    # a cached step holds no teacher: its FLOPs are the student step's
    assert cases['distill_online']['gflop_per_image'] > \
        cases['distill_cached']['gflop_per_image']

    ratios = {r['name']: r for r in report['ratios']}
    assert list(ratios) == RATIOS
    for name, ratio in ratios.items():
        if ratio['unavailable']:
            assert not _has_cache_api()
            continue
        assert len(ratio['per_repeat']) == 2
        assert all(math.isfinite(v) and v > 0 for v in ratio['per_repeat'])
        assert ratio['min'] <= ratio['median'] <= ratio['max']
        assert math.isfinite(ratio['flop_ratio'])

    # the printed tables: header, one row per case / ratio
    lines = proc.stdout.splitlines()
    assert any(line.startswith('kiv benchmark: --arch tiny, batch 2, 56 px')
               for line in lines)
    head = lines.index('| case | what | img/s | min-max | ms/img | '
                       'GFLOP/img | GFLOP/s | peak MB |')
    rows = [line.split('|')[1].strip() for line in lines[head + 2:
                                                         head + 10]]
    assert rows == CASES
    head = [i for i, line in enumerate(lines)
            if line.startswith('| ratio (time per image)')][0]
    for line, name in zip(lines[head + 2:head + 7], RATIOS):
        assert line.startswith(f'| {name} | ')
        if _has_cache_api():
            assert re.match(r'\| .+ \| \d+\.\d{3} \| \d+\.\d{3}-\d+\.\d{3} '
                            r'\| \d+\.\d{3} \| ', line), line


def test_benchmark_memory_per_case(tmp_path):
    """--memory rss: each case in a fresh process; a positive peak."""
    out = tmp_path / 'mem.json'
    proc = run_tool(['analysis/benchmark.py', '--arch', 'tiny', '--cases',
                     'timm_train', '--iters', '1', '--warmup', '0',
                     '--repeats', '1', '--no-flops', '--memory', 'rss',
                     '--out', str(out)], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    case, = json.loads(out.read_text())['cases']
    assert case['name'] == 'timm_train' and case['peak_memory_mb'] > 0
    assert case['gflop_per_image'] is None
    ratio = json.loads(out.read_text())['ratios'][0]
    assert 'adapter_fwd: not measured' in ratio['unavailable']


def _tool():
    """tools/analysis/benchmark.py as a module (kiv is already imported)."""
    spec = importlib.util.spec_from_file_location(
        'kiv_benchmark_tool', osp.join(REPO, 'tools', 'analysis',
                                       'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_options(capsys):
    tool = _tool()
    args = tool.parse_args(['--arch', 'small', '--cases',
                            'adapter_fwd, timm_fwd', '--device', 'cpu'])
    assert (args.batch_size, args.img_size) == (4, 224)
    assert args.cases == ['adapter_fwd', 'timm_fwd'] and args.memory == 'rss'
    for argv, message in (
            (['--cases', 'timm_fwd,nope'], "unknown cases ['nope']"),
            (['--memory', 'cuda', '--device', 'cpu'], '--memory cuda needs'),
            (['--iters', '0'], '--iters must be >= 1')):
        with pytest.raises(SystemExit) as exc:
            tool.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    # the base arch is the real recipe's student
    base = tool.ARCHS['base']
    assert base.vit == 'vit_base_patch14_reg4_dinov2'
    assert base.adapter['deform_num_heads'] == 12
    assert base.adapter['deform_ratio'] == 0.5


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
