"""Training metrics through clu: per-step scalars averaged over each logging window."""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from clu import metrics as clu_metrics


def averages(keys: Iterable[str]) -> type[clu_metrics.Collection]:
  """A clu Collection class averaging each named per-step scalar."""
  return clu_metrics.Collection.create(
    **{key: clu_metrics.Average.from_output(key) for key in sorted(keys)}
  )


class WindowAverages:
  """Accumulates host copies of step metrics until `compute_and_reset`."""

  def __init__(self):
    self._collection: clu_metrics.Collection | None = None

  def update(self, step_metrics: Mapping[str, Any]) -> None:
    values = {k: np.asarray(v, np.float32) for k, v in step_metrics.items()}
    single = averages(values).single_from_model_output(**values)
    self._collection = single if self._collection is None else self._collection.merge(single)

  def compute_and_reset(self) -> dict[str, float]:
    if self._collection is None:
      return {}
    out = {k: float(v) for k, v in self._collection.compute().items()}
    self._collection = None
    return out
