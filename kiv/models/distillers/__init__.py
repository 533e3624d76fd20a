from .knowledge_inheritance import DEFAULT_LOSSES, KnowledgeInheritance

__all__ = ['KnowledgeInheritance', 'DEFAULT_LOSSES']
