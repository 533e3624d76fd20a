"""The statistics a teacher cache records about what it stores.

* :class:`TargetStatistics`: the exact standardiser sums of the stored
  (rounded) targets, packed as the shared latent space packs them
  (``kiv.SharedLatentSpace.statistic_sums`` / ``load_statistics``). It builds
  only the standardisers of the config's ``latent.standardize`` mode for the
  teachers' outputs: the latent space's heads need the student, which the
  writer never builds.
* :func:`rounding_sums` / :func:`relative_rounding_error`: how much the
  storage dtype changes the targets (``index['rounding_error']``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from kiv.fileio.teacher_cache_format import output_keys
from kiv.models.connectors import build_standardizer
from kiv.structures import FeatureOutput

__all__ = ['TargetStatistics', 'rounding_sums', 'relative_rounding_error']


def _outputs(out: FeatureOutput) -> list[Tensor]:
    """A teacher output's tensors in key order (summary first)."""
    return ([out.summary] if out.summary is not None else []) + \
        list(out.features)


class TargetStatistics:
    """Packed standardiser sums of raw teacher outputs.

    Summed over all batches they are the exact statistics of all the
    samples, for ``kiv.KnowledgeInheritance.load_statistics``.

    Args:
        teachers (Mapping[str, Mapping]): per teacher ``summary_dim`` (None
            without a summary) and ``feature_dims`` (the cache index's
            teacher entries), in the config's order.
        standardize (str): ``latent.standardize`` (``'phis'``,
            ``'channel'`` or ``'none'``).
    """

    def __init__(self, teachers: Mapping[str, Mapping],
                 standardize: str) -> None:
        self.standardize = standardize
        self.standardizers = {}
        for name, entry in teachers.items():
            summary_dim = entry['summary_dim']
            dims = ([summary_dim] if summary_dim is not None else []) + \
                list(entry['feature_dims'])
            keys = output_keys(name, summary_dim is not None,
                               len(entry['feature_dims']))
            for key, dim in zip(keys, dims):
                std = build_standardizer(standardize, int(dim))
                if std.tracks_statistics:
                    self.standardizers[key] = std

    @property
    def numel(self) -> dict[str, int]:
        """Statistic key -> length of its packed sums, in key order."""
        return {key: std.sums_numel
                for key, std in self.standardizers.items()}

    @torch.no_grad()
    def sums(self, outputs: Mapping[str, FeatureOutput]) -> dict[str, Tensor]:
        """This batch's packed sums.

        Args:
            outputs (dict[str, FeatureOutput]): raw outputs per teacher.

        Returns:
            dict[str, Tensor]: float64 ``[count, sum x, sum x x^T (or
            x^2)]`` per statistic key of the given teachers.
        """
        sums = {}
        for name, out in outputs.items():
            keys = output_keys(name, out.summary is not None,
                               len(out.features))
            for key, x in zip(keys, _outputs(out)):
                if key in self.standardizers:
                    sums[key] = self.standardizers[key].batch_sums(x)
        return sums

    def stored_sums(self, handle, index: Mapping, batch_size: int,
                    device: torch.device) -> dict[str, Tensor]:
        """The sums of the targets stored in one shard, recomputed.

        Args:
            handle: the open shard (``safe_open``).
            index (Mapping): the cache index (teachers, statistic sizes).
            batch_size (int): rows read at a time.
            device (torch.device): where to compute.

        Returns:
            dict[str, Tensor]: float64 sums per statistic key (zeros for an
            empty shard).
        """
        teachers = index['teachers']
        rows = int(handle.get_slice('view.image').get_shape()[0])
        step = max(1, batch_size)
        totals: dict[str, Tensor] = {}
        for start in range(0, rows, step):
            end = min(rows, start + step)
            outputs = {}
            for name, entry in teachers.items():
                keys = output_keys(name, entry['summary_dim'] is not None,
                                   len(entry['feature_dims']))
                values = [handle.get_slice(f'target.{k}')[start:end].float()
                          .to(device) for k in keys]
                summary = values.pop(0) if entry['summary_dim'] is not None \
                    else None
                outputs[name] = FeatureOutput(summary, tuple(values))
            for key, value in self.sums(outputs).items():
                value = value.double().cpu()
                totals[key] = totals[key] + value if key in totals else value
        return {key: totals.get(key, torch.zeros(numel, dtype=torch.float64))
                for key, numel in index['statistics']['numel'].items()}


def rounding_sums(original: Tensor, stored: Tensor) -> Tensor:
    """Packed float64 ``[rows, sum err^2, sum x^2, sum x (C)]`` of one
    batch of one output: the storage rounding error ``err = stored -
    original`` and the moments of ``stored`` over rows (vectors or pixels).
    """
    channels = stored.shape[1]
    x = stored.detach().double()
    err = (x - original.detach().double()).square().sum()
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, channels)
    return torch.cat([x.new_tensor([x.shape[0]]), err.view(1),
                      x.square().sum().view(1), x.sum(0)]).cpu()


def relative_rounding_error(check: Tensor) -> float:
    """RMS storage rounding error over the RMS deviation from the mean."""
    rows, err, sq = (float(v) for v in check[:3])
    if rows == 0:
        return 0.0
    spread = sq - float(check[3:].square().sum()) / rows
    return math.sqrt(err / spread) if spread > 0 else \
        (0.0 if err == 0 else math.inf)
