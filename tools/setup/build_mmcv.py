#!/usr/bin/env python
"""Build an mmcv wheel with CPU ops against the installed torch, and cache it.

mmcv 2.1.0 (the newest release mmdet 3.3.0 / mmseg 1.2.2 accept) ships only
as a source archive and does not build as shipped against torch 2.14 with
NumPy 2. This script downloads the archive, applies two small patches, builds
the wheel without build isolation (so the ops compile against *this* torch),
verifies that it really contains the compiled ops, and moves it atomically into
the cache directory.

Patches:

* ``setup.py``: ``-std=c++17`` -> ``-std=c++20`` (torch >= 2.10 ATen requires
  C++20; the flag comes after ``CFLAGS`` so only editing ``setup.py`` helps).
* ``mmcv/image/photometric.py``: ``np.uint8(hue_factor * 255)`` overflows on
  NumPy 2 for negative factors; use ``np.uint8(int(hue_factor * 255) % 256)``.

Usage::

    python tools/setup/build_mmcv.py --cache-dir ~/.cache/kiv/wheels

Prints the path of the cached wheel on its last line of stdout.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

MMCV_VERSION = '2.1.0'

_PATCHES: dict[str, list[tuple[str, str]]] = {
    'setup.py': [("'-std=c++17'", "'-std=c++20'")],
    'mmcv/image/photometric.py': [
        ('np.uint8(hue_factor * 255)',
         'np.uint8(int(hue_factor * 255) % 256)'),
    ],
}


def _fail(step: str, hint: str) -> None:
    print(f'[build_mmcv] FAILED at step "{step}". {hint}', file=sys.stderr)
    sys.exit(1)


def wheel_tag() -> str:
    """Return the cache key: mmcv version, torch version, python tag."""
    import torch
    torch_ver = torch.__version__.split('+')[0]
    return (f'mmcv-{MMCV_VERSION}-torch{torch_ver}-'
            f'cp{sys.version_info.major}{sys.version_info.minor}')


def patch_source(src_dir: str) -> None:
    """Apply the patches in place; fail loudly if a pattern is missing."""
    for rel, subs in _PATCHES.items():
        path = os.path.join(src_dir, rel)
        with open(path, encoding='utf-8') as f:
            text = f.read()
        for old, new in subs:
            if old not in text and new not in text:
                _fail('patch', f'pattern {old!r} not found in {rel}; '
                      f'is this really mmcv {MMCV_VERSION}?')
            text = text.replace(old, new)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)


def has_compiled_ops(wheel: str) -> bool:
    """True if the wheel is platform specific and ships ``mmcv/_ext``."""
    if not wheel.endswith('linux_x86_64.whl') and 'manylinux' not in wheel:
        return False
    with zipfile.ZipFile(wheel) as zf:
        return any(n.startswith('mmcv/_ext') and n.endswith('.so')
                   for n in zf.namelist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cache-dir', required=True,
                        help='directory where built wheels are cached')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1,
                        help='parallel compile jobs (MAX_JOBS)')
    args = parser.parse_args()

    cache = os.path.join(os.path.expanduser(args.cache_dir), wheel_tag())
    os.makedirs(cache, exist_ok=True)
    cached = sorted(glob.glob(os.path.join(cache, 'mmcv-*.whl')))
    cached = [w for w in cached if has_compiled_ops(w)]
    if cached:
        print(cached[-1])
        return

    with tempfile.TemporaryDirectory(prefix='kiv-mmcv-') as tmp:
        print(f'[build_mmcv] downloading mmcv=={MMCV_VERSION} sources',
              file=sys.stderr)
        rc = subprocess.call([
            sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
            '--no-binary', ':all:', '--no-build-isolation',
            f'mmcv=={MMCV_VERSION}', '-d', tmp
        ])
        archives = glob.glob(os.path.join(tmp, 'mmcv-*.tar.gz'))
        if rc != 0 or not archives:
            _fail('download',
                  'check that PyPI is reachable (pip download mmcv).')
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter='data')
        src = os.path.join(tmp, f'mmcv-{MMCV_VERSION}')
        patch_source(src)

        env = dict(os.environ, MMCV_WITH_OPS='1', MAX_JOBS=str(args.jobs))
        # This machine may have nvcc but no GPU: never force a CUDA build.
        env.pop('FORCE_CUDA', None)
        print(f'[build_mmcv] compiling CPU ops with {args.jobs} jobs '
              '(about 10 minutes on 2 cores)', file=sys.stderr)
        dist = os.path.join(tmp, 'dist')
        rc = subprocess.call([
            sys.executable, '-m', 'pip', 'wheel', '--no-deps',
            '--no-build-isolation', '-w', dist, src
        ], env=env, stdout=sys.stderr)
        wheels = glob.glob(os.path.join(dist, 'mmcv-*.whl'))
        if rc != 0 or not wheels:
            _fail('compile', 'see the compiler output above; you need gcc/g++ '
                  '>= 10, ninja, and torch installed in this environment.')
        if not has_compiled_ops(wheels[0]):
            _fail('verify', f'{os.path.basename(wheels[0])} has no compiled '
                  'ops (mmcv/_ext*.so). Was the build isolated?')
        # Atomic publish: copy next to the target, then rename.
        final = os.path.join(cache, os.path.basename(wheels[0]))
        part = final + '.part'
        shutil.copyfile(wheels[0], part)
        os.replace(part, final)
    print(final)


if __name__ == '__main__':
    main()
