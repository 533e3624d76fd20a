"""kiv: Knowledge Inheritance for Vision on OpenMMLab 2.x.

Importing ``kiv`` (directly or through ``custom_imports``) checks the mm
package versions, installs the safe checkpoint loader and registers every kiv
module under the ``kiv`` scope.
"""
from .utils import check_mm_versions
from .version import __version__, version_info

check_mm_versions()

from . import engine  # noqa: E402,F401  safe checkpoint loading, hooks
from . import datasets, evaluation, models  # noqa: E402,F401  registers kiv.*
from .structures import FeatureOutput  # noqa: E402

__all__ = ['__version__', 'version_info', 'FeatureOutput']
