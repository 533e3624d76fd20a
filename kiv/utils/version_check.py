"""Check at import time that the installed OpenMMLab packages fit kiv."""
from importlib import metadata

from mmengine.utils import digit_version

#: package -> (minimum inclusive, maximum exclusive, required?)
MM_REQUIREMENTS: dict[str, tuple[str, str, bool]] = {
    'mmengine': ('0.10.7', '1.0.0', True),
    'mmcv': ('2.1.0', '2.2.0', True),
    'mmdet': ('3.3.0', '3.4.0', False),
    'mmsegmentation': ('1.2.2', '1.3.0', False),
    'mmpretrain': ('1.2.0', '1.3.0', False),
}


def check_mm_versions() -> None:
    """Raise one clear ``ImportError`` if an mm package has the wrong version.

    Required packages must be installed; optional toolboxes (mmdet, mmseg,
    mmpretrain) are checked only when installed.

    Raises:
        ImportError: naming the package, the found version, the accepted
            range and the command that fixes it.
    """
    for pkg, (lo, hi, required) in MM_REQUIREMENTS.items():
        try:
            found = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            if required:
                raise ImportError(
                    f'kiv needs {pkg}>={lo},<{hi} but it is not installed; '
                    'run `make env` (see README).') from None
            continue
        if not digit_version(lo) <= digit_version(found) < digit_version(hi):
            raise ImportError(
                f'kiv needs {pkg}>={lo},<{hi} but {pkg}=={found} is '
                f'installed; run `pip install "{pkg}>={lo},<{hi}"` or '
                '`make env` (see README).')
