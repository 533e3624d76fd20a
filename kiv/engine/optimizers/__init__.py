"""Optimizer wrapper constructors.

:mod:`.layer_decay_constructor` imports mmpretrain, so it is not imported
here: ``kiv.OPTIM_WRAPPER_CONSTRUCTORS`` finds it on first lookup, or a
config imports it (``custom_imports``).
"""
