"""Importing this module switches on kiv's safe I/O (config one-liner).

For scripts you do not want to edit (e.g. a toolbox's own
``tools/train.py``), list it after ``kiv`` in the config::

    custom_imports = dict(imports=['kiv', 'kiv.engine.use_safe_io'],
                          allow_failed_imports=False)

It calls :func:`kiv.engine.safe_io.enable_safe_io` (weights-only checkpoint
loading, atomic local writes); see that module.
"""
from .safe_io import enable_safe_io

enable_safe_io()
