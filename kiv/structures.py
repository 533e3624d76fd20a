"""Typed model outputs shared by teachers, the student and the distiller."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

from torch import Tensor


class FeatureOutput(NamedTuple):
    """A model's knowledge for one image batch (RADIO's ``summary, features``).

    Attributes:
        summary (Tensor): one vector per image, shape ``(B, C_s)`` (CLS token,
            pooled features or a global token).
        features (tuple[Tensor, ...]): dense maps, each ``(B, C_l, H_l, W_l)``
            (NCHW). A ViT gives one level; a CNN or the adapter pyramid give
            several, ordered from the highest resolution to the lowest.
        summaries (dict[str, Tensor], optional): a student's summary per
            teacher name, each ``(B, C_s)`` (RADIO's summary token per
            teacher): teacher ``t``'s student-to-teacher summary head reads
            ``summaries[t]``, so teachers do not compete for one vector.
            ``summary`` is then one of them. None for teachers and for
            students with a single summary.
    """
    summary: Tensor
    features: tuple[Tensor, ...]
    summaries: Optional[Mapping[str, Tensor]] = None

    def summary_for(self, name: str) -> Tensor:
        """The summary that teacher ``name`` reads.

        Args:
            name (str): teacher name.

        Returns:
            Tensor: ``summaries[name]`` if this output has per-teacher
            summaries, else the one ``summary``, ``(B, C_s)``.

        Raises:
            KeyError: per-teacher summaries exist but none for ``name``.
        """
        if self.summaries is None:
            return self.summary
        if name not in self.summaries:
            raise KeyError(f'no summary for teacher {name!r}; the output '
                           f'has summaries for {sorted(self.summaries)}')
        return self.summaries[name]
