"""kiv: Knowledge Inheritance for Vision on OpenMMLab 2.x.

Importing ``kiv`` (directly or through ``custom_imports``) checks the mm
package versions and registers every kiv module under the ``kiv`` scope.
It changes nothing else in the process: mmengine keeps its own checkpoint
loader and file backend. kiv's tools switch on weights-only checkpoint
loading and atomic writes with one call, which your own scripts can make
too::

    import kiv
    kiv.enable_safe_io()

(or ``custom_imports = dict(imports=['kiv', 'kiv.engine.use_safe_io'])`` in
a config); see :mod:`kiv.engine.safe_io`.
"""
from .utils import check_mm_versions
from .version import __version__, version_info

check_mm_versions()

from . import engine  # noqa: E402,F401  hooks, safe checkpoint loading
from . import datasets, evaluation, models  # noqa: E402,F401  registers kiv.*
from .engine.safe_io import (disable_safe_io, enable_safe_io,  # noqa: E402
                             safe_io_enabled)
from .structures import FeatureOutput  # noqa: E402

__all__ = [
    '__version__', 'version_info', 'FeatureOutput', 'enable_safe_io',
    'disable_safe_io', 'safe_io_enabled'
]
