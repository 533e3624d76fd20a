"""The environment bootstrap: cached fast path, broken-venv repair, mmcv
wheel verification and source patches."""
import importlib.util
import os
import os.path as osp
import subprocess
import zipfile

import pytest

from kiv.testing.paths import REPO

BOOTSTRAP = osp.join(REPO, 'tools', 'setup', 'bootstrap.sh')


def _load_build_mmcv():
    spec = importlib.util.spec_from_file_location(
        'build_mmcv', osp.join(REPO, 'tools', 'setup', 'build_mmcv.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_installed_mmcv_has_compiled_cpu_ops():
    import mmcv
    import mmcv.ops
    from mmcv.utils import ext_loader
    ext = ext_loader.load_ext('_ext', ['ms_deform_attn_forward'])
    assert ext.__file__.endswith('.so')
    assert mmcv.__version__ == '2.1.0'


def test_wheel_check_rejects_pure_python_wheel(tmp_path):
    mod = _load_build_mmcv()
    pure = tmp_path / 'mmcv-2.1.0-py2.py3-none-any.whl'
    with zipfile.ZipFile(pure, 'w') as zf:
        zf.writestr('mmcv/__init__.py', '')
    assert not mod.has_compiled_ops(str(pure))
    good = tmp_path / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl'
    with zipfile.ZipFile(good, 'w') as zf:
        zf.writestr('mmcv/_ext.cpython-311-x86_64-linux-gnu.so', b'\0')
    assert mod.has_compiled_ops(str(good))


def test_source_patches(tmp_path):
    mod = _load_build_mmcv()
    (tmp_path / 'mmcv' / 'image').mkdir(parents=True)
    (tmp_path / 'setup.py').write_text("args = ['-std=c++17']\n")
    (tmp_path / 'mmcv' / 'image' / 'photometric.py').write_text(
        'h += np.uint8(hue_factor * 255)\n')
    mod.patch_source(str(tmp_path))
    assert "'-std=c++20'" in (tmp_path / 'setup.py').read_text()
    assert 'np.uint8(int(hue_factor * 255) % 256)' in (
        tmp_path / 'mmcv' / 'image' / 'photometric.py').read_text()
    mod.patch_source(str(tmp_path))  # idempotent
    (tmp_path / 'setup.py').write_text('nothing here\n')
    with pytest.raises(SystemExit):
        mod.patch_source(str(tmp_path))


def test_hue_adjustment_works_with_numpy2():
    """The patched mmcv no longer overflows on negative hue factors."""
    import mmcv
    import numpy as np
    img = np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)
    out = mmcv.adjust_hue(img, -0.1)
    assert out.shape == img.shape and out.dtype == np.uint8


@pytest.mark.skipif(not osp.isfile(osp.join(REPO, '.venv', '.kiv-setup-ok')),
                    reason='needs the environment made by `make env`')
@pytest.mark.slow
def test_second_setup_is_fast():
    """A set-up that is done only checks its stamp and the imports: it
    says so and installs nothing (no wall-clock limit: shared machines)."""
    proc = subprocess.run(['bash', BOOTSTRAP], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'ready (cached)' in proc.stdout
    assert '1/6' not in proc.stdout  # no set-up step ran


def test_broken_venv_is_detected_and_rebuilt(tmp_path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    fake = venv / 'bin' / 'python'
    fake.write_text('#!/bin/sh\nexit 1\n')
    fake.chmod(0o755)
    (venv / '.kiv-setup-ok').write_text('stale')
    env = dict(os.environ, KIV_VENV=str(venv), KIV_PYTHON='/bin/false',
               KIV_CACHE_DIR=str(tmp_path / 'cache'))
    proc = subprocess.run(['bash', BOOTSTRAP], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert 'removing broken virtual environment' in proc.stdout
    assert 'FAILED at step: create venv' in proc.stdout
    assert not (venv / '.kiv-setup-ok').exists()
