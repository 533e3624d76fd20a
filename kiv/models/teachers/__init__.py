"""Frozen teachers: the :class:`Teacher` wrapper, its forward-hook recorder
and the ``TEACHER_SOURCES`` that build a network with its weights
(``'mm'``, ``'timm'``, ``'hf'``, ``'torchvision'``, ``'module'``)."""
from kiv.utils.weights import TeacherCheckpointError
from .hf_source import HFVisionModel, build_hf_teacher
from .mm_source import BackboneNeck, build_mm_teacher
from .module_source import build_module_teacher, import_factory
from .recorder import (ModuleOutputsRecorder, flatten_tensors, to_feature_map,
                       token_grid)
from .teacher import Teacher, build_teacher_model
from .timm_source import build_timm_teacher
from .torchvision_source import build_torchvision_teacher

__all__ = [
    'Teacher', 'build_teacher_model', 'ModuleOutputsRecorder',
    'flatten_tensors', 'to_feature_map', 'token_grid', 'BackboneNeck',
    'HFVisionModel', 'build_mm_teacher', 'build_timm_teacher',
    'build_hf_teacher', 'build_torchvision_teacher', 'build_module_teacher',
    'import_factory', 'TeacherCheckpointError'
]
from .cached_teacher import CachedTeacher  # noqa: E402

__all__ += ['CachedTeacher']
