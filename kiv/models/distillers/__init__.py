from .knowledge_inheritance import (DEFAULT_DATA_PREPROCESSOR, DEFAULT_LOSSES,
                                    KnowledgeInheritance)

__all__ = [
    'KnowledgeInheritance', 'DEFAULT_LOSSES', 'DEFAULT_DATA_PREPROCESSOR'
]
