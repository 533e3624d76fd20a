from .version_check import MM_REQUIREMENTS, check_mm_versions

__all__ = ['MM_REQUIREMENTS', 'check_mm_versions']
