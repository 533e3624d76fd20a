from .scope import in_own_scope
from .version_check import MM_REQUIREMENTS, check_mm_versions

__all__ = ['MM_REQUIREMENTS', 'check_mm_versions', 'in_own_scope']
