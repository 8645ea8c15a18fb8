"""Training metrics through clu: per-step scalars averaged over each logging window."""

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from clu import metrics as clu_metrics


def averages(keys: Iterable[str]) -> type[clu_metrics.Collection]:
  """A clu Collection class averaging each named per-step scalar (one class per set of keys)."""
  return _averages(tuple(sorted(keys)))


@functools.cache
def _averages(keys: tuple[str, ...]) -> type[clu_metrics.Collection]:
  # Built once per key set: a class per step would cost milliseconds each, and leave thousands of
  # classes for the garbage collector at the end of a run (a 25 s stall after 500 steps).
  return clu_metrics.Collection.create(
    **{key: clu_metrics.Average.from_output(key) for key in keys}
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
