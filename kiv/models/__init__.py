"""kiv models: teachers, the adapter backbone, the latent space, losses and
the distiller. Importing this package registers them all in ``kiv.MODELS``.
"""
from . import (backbones, connectors, distillers, layers, losses,  # noqa
               necks, teachers)
