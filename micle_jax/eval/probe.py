"""A kNN probe of a representation: how well frozen features of labelled images predict labels.

Pretraining learns without labels, so its loss says little about what the representation is
worth to a classifier. The probe measures that without touching the model: it embeds a fixed
set of labelled images with the network in inference mode (backbone features, L2-normalised) and
scores a k-nearest-neighbour classifier on them, leaving each patient's own images out of their
neighbours (a patient's images look alike for reasons that have nothing to do with the labels).
Nothing is trained, and nothing the probe computes enters the training state, so a run with the
probe ends with exactly the parameters of a run without it.

Scores: multi-label tasks (chest X-rays) the mean AUC over labels of the neighbours' mean
target; multi-class tasks the top-1 accuracy of the neighbours' vote. Computed at step 0 (the
architecture at initialisation) and at every checkpoint, logged as `probe/*`.

The probe set is the first `max_images` images of its split that pass the view filter (all of
them where fewer pass); `pretraining.json` records how many it used (`probe_images`). Use
images the reported evaluation does not: the pretraining config's default is the training split
(whose labels pretraining never reads).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from micle_jax import specs
from micle_jax.data import finetune_input, input_pipeline, tasks
from micle_jax.eval import eval_metrics
from micle_jax.runtime import sharding


def knn_scores(features: np.ndarray, groups: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
  """Leave-group-out kNN: each row's mean target over its k most similar rows of other groups.

  Args:
    features: [N, D] (cosine similarity: rows are L2-normalised here).
    groups: [N] group ids (patients); a row's own group is never its neighbour.
    targets: [N, K] values to average (one-hot classes, or multi-label targets; NaN = unknown,
      ignored in the mean).
    k: neighbours.

  Returns:
    [N, K] mean neighbour targets (NaN where no neighbour knows the target).
  """
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  similarity = x @ x.T
  groups = np.asarray(groups)
  similarity[groups[:, None] == groups[None, :]] = -np.inf
  k = min(k, len(x) - 1)
  # Ties broken by row index (stable sort of the negated similarity): deterministic.
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  values = np.asarray(targets, np.float64)[neighbours]  # [N, k, K]
  valid = (
    np.isfinite(values) & np.isfinite(np.take_along_axis(similarity, neighbours, 1))[..., None]
  )
  total = np.where(valid, values, 0.0).sum(1)
  count = valid.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.nan)


def attribute_r2(features: np.ndarray, groups: np.ndarray, values: np.ndarray, k: int) -> float:
  """How much of a numeric attribute's variance the features' neighbours predict.

  The leave-group-out kNN of `knn_scores` regresses `values` (e.g. a drawn heart size, an
  exposure): each row is predicted by the mean value of its k most similar rows of other groups,
  over the rows whose value is finite. Returns R² = 1 − SSE / SST: 1 when neighbours share the
  value exactly, about 0 (or below) when the features carry nothing of it.
  """
  values = np.asarray(values, np.float64)
  known = np.isfinite(values)
  if known.sum() < 2 or np.ptp(values[known]) == 0:
    return float("nan")
  y = values[known]
  predicted = knn_scores(np.asarray(features)[known], np.asarray(groups)[known], y[:, None], k)
  residual = y - predicted[:, 0]
  return float(1.0 - np.sum(residual**2) / np.sum((y - y.mean()) ** 2))


def score(
  features: np.ndarray, batch: dict[str, np.ndarray], *, task: str, names, k: int
) -> dict[str, float]:
  """The probe's metrics for features of the probe set (`batch`: labels and patient ids)."""
  groups = batch["patient_id"]
  if tasks.get(task, "probe.task").loss == "multiclass":
    labels = batch["label"].astype(np.int64)
    votes = knn_scores(features, groups, np.eye(len(names))[labels], k)
    return {"top1": eval_metrics.top_k_accuracy(np.nan_to_num(votes, nan=-1.0), labels, 1)}
  targets = np.where(batch["target_mask"] > 0, batch["targets"], np.nan)
  predicted = knn_scores(features, groups, targets, k)
  defined = np.isfinite(predicted) & (batch["target_mask"] > 0)
  per_label = eval_metrics.per_label_auc(
    np.nan_to_num(predicted), batch["targets"], defined, tuple(names)
  )
  return {"mean_auc": eval_metrics.mean_auc(per_label)} | {
    f"auc/{n}": v for n, v in per_label.items()
  }


class Probe:
  """The probe set of a run, loaded once; `__call__(state)` scores a training state."""

  def __init__(
    self, spec: specs.ProbeSpec, *, preset: str, image_size: int, labels: specs.LabelSpec, mesh
  ):
    self.spec = spec
    # The first max_images examples that pass the view filter (`limit`, after filtering), or all
    # of them when the split holds fewer.
    info = input_pipeline.open_dataset(
      spec.dataset,
      spec.split,
      spec.data_dir or None,
      specs.LabelSpec(),
      spec.views,
      views_key="probe.views",
    )
    task = tasks.get(spec.task, "probe.task")
    task.check(info.builder.info.features, spec.dataset)
    labels = dataclasses.replace(labels, task=spec.task)
    self.names = task.output_names(info.builder.info.features, labels)
    label_fn = task.label_fn(labels)
    batch_size = max(spec.batch_size // sharding.data_parallel_size(mesh), 1)
    batch_size *= sharding.data_parallel_size(mesh)
    self.batches = list(
      finetune_input.eval_batches(
        info,
        info.split,
        label_fn=label_fn,
        image_size=image_size,
        preset=preset,
        batch_size=batch_size,
        mesh=mesh,
        limit=spec.max_images,
      )
    )
    keep = np.concatenate([b["valid"] > 0 for b in self.batches])
    logging.info(
      "Probe set: the first %d images of %s:%s passing views=%r", keep.sum(), spec.dataset,
      spec.split, spec.views,
    )  # fmt: skip
    self.labels = {
      key: np.concatenate([b[key] for b in self.batches])[keep]
      for key in ("label", "targets", "target_mask", "patient_id", "image_id")
      if key in self.batches[0]
    }
    self.keep = keep
    self.mesh = mesh
    self._features: Callable[..., Any] | None = None

  @property
  def num_images(self) -> int:
    return int(self.keep.sum())

  def __call__(self, state: Any) -> dict[str, float]:
    return score(
      self.features(state), self.labels, task=self.spec.task, names=self.names, k=self.spec.k
    )

  def features(self, state: Any) -> np.ndarray:
    """[num_images, D] backbone features of the probe set under `state` (in inference mode)."""
    if self._features is None:
      self._features = jax.jit(
        lambda variables, images: state.apply_fn(variables, images, train=False)["features"],
        in_shardings=(sharding.replicated(self.mesh), sharding.data_sharding(self.mesh)),
        out_shardings=sharding.data_sharding(self.mesh),
      )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    parts = [
      sharding.to_host(self._features(variables, sharding.make_global_batch(b["image"], self.mesh)))
      for b in self.batches
    ]
    return np.concatenate(parts)[self.keep]
