"""Toy modules for configs that the engine tests run through tools and
upstream-style scripts (``custom_imports=dict(imports=[
'kiv.testing.toy_engine'])``; :func:`kiv.testing.tools.toy_config` writes
such a config).

Registered in mmengine's root registries, like a user's own project.
"""
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS


@MODELS.register_module()
class ToyNet(BaseModel):
    """Two loss terms; ``loss_b`` is NaN at the 1-based training
    iterations in ``nan_iters``."""

    def __init__(self, nan_iters=()):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.nan_iters = set(nan_iters)
        self.calls = 0

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.lin(inputs)
        if mode == 'loss':
            self.calls += 1
            loss_b = out.abs().mean()
            if self.calls in self.nan_iters:
                loss_b = loss_b * float('nan')
            return dict(loss_a=(out - 1).pow(2).mean(), loss_b=loss_b)
        return [dict(pred=o) for o in out]


@DATASETS.register_module()
class ToyData(torch.utils.data.Dataset):
    """16 fixed random vectors."""

    def __init__(self, length=16):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        gen = torch.Generator().manual_seed(idx)
        return dict(inputs=torch.randn(4, generator=gen))


@METRICS.register_module()
class ToyMetric(BaseMetric):
    """Mean prediction."""

    def process(self, data_batch, data_samples):
        self.results.extend(float(s['pred']) for s in data_samples)

    def compute_metrics(self, results):
        return dict(mean=sum(results) / max(1, len(results)))
