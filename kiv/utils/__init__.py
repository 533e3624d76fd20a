from .scope import in_own_scope
from .version_check import MM_REQUIREMENTS, check_mm_versions

__all__ = ['MM_REQUIREMENTS', 'check_mm_versions', 'in_own_scope']

# side-by-side benchmark helpers (tools/analysis/benchmark.py)
from .benchmark import (BenchCase, CaseResult, RatioResult,  # noqa: E402
                        RatioSpec, compute_ratio, count_flops,
                        measure_interleaved)

__all__ += [
    'BenchCase', 'CaseResult', 'RatioResult', 'RatioSpec', 'compute_ratio',
    'count_flops', 'measure_interleaved'
]
