"""How much of each teacher the student inherited."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric

from kiv.registry import METRICS


@METRICS.register_module()
class TeacherAgreementMetric(BaseMetric):
    """Agreement of the inherited models (student + s2t head) with teachers.

    Consumes the per-image dicts of
    :meth:`kiv.models.distillers.KnowledgeInheritance.predict`. Reports,
    for every teacher ``t``:

    * ``t/summary_cos``: mean cosine similarity of summaries (teachers
      with a summary);
    * ``t/level{l}_cos``: mean cosine similarity of dense level ``l``;
    * ``t/top1_agreement``: % of images where the teacher's own head gives
      the same class on the inherited features as on its own (teachers
      with a classification head kept);
    * ``t/top5_agreement``: % of images where the teacher's class is among
      the inherited head's top 5.

    Cosines are measured in the shared latent space (standardised targets).

    Args:
        collect_device (str): ``'cpu'`` or ``'gpu'``.
        prefix (str): metric name prefix. Defaults to ``'agreement'``.
    """

    default_prefix = 'agreement'

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            self.results.append(sample)

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not results:
            return metrics
        for name in results[0]:
            items = [r[name] for r in results]
            if items[0].get('summary_cos') is not None:
                metrics[f'{name}/summary_cos'] = float(
                    np.mean([it['summary_cos'] for it in items]))
            levels = np.array([it['feature_cos'] for it in items])
            for lv in range(levels.shape[1] if levels.ndim == 2 else 0):
                metrics[f'{name}/level{lv}_cos'] = float(levels[:, lv].mean())
            if 'top1' in items[0]:
                agree = [it['top1'][0] == it['top1'][1] for it in items]
                metrics[f'{name}/top1_agreement'] = 100.0 * float(
                    np.mean(agree))
            if 'top5' in items[0]:
                agree = [it['top5'][0] in it['top5'][1] for it in items]
                metrics[f'{name}/top5_agreement'] = 100.0 * float(
                    np.mean(agree))
        return metrics
