"""The import-time version check names package, version and fix."""
from importlib import metadata

import pytest

from kiv.utils import version_check


def test_installed_versions_pass():
    version_check.check_mm_versions()


def test_wrong_version_is_named(monkeypatch):
    real = metadata.version

    def fake(pkg):
        return '3.0.0' if pkg == 'mmcv' else real(pkg)

    monkeypatch.setattr(version_check.metadata, 'version', fake)
    with pytest.raises(ImportError, match=r'mmcv>=2\.1\.0,<2\.2\.0 but '
                       r'mmcv==3\.0\.0 is installed'):
        version_check.check_mm_versions()


def test_missing_required_package(monkeypatch):
    def fake(pkg):
        raise metadata.PackageNotFoundError(pkg)

    monkeypatch.setattr(version_check.metadata, 'version', fake)
    with pytest.raises(ImportError, match='mmengine.*not installed'):
        version_check.check_mm_versions()


def test_missing_optional_toolbox_is_fine(monkeypatch):
    real = metadata.version

    def fake(pkg):
        if pkg == 'mmdet':
            raise metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(version_check.metadata, 'version', fake)
    version_check.check_mm_versions()
