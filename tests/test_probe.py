"""The kNN probe: leave-patient-out neighbours equal a brute-force float64 reference; scores."""

import numpy as np
import pytest

from micle_jax import eval_metrics, probe


def _reference(features, groups, targets, k):
  """Row by row: cosine similarities, other patients only, ties by index, NaN targets skipped."""
  x = np.array(features, np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  out = np.full(targets.shape, np.nan)
  for i in range(len(x)):
    others = [j for j in range(len(x)) if groups[j] != groups[i]]
    others.sort(key=lambda j: (-float(x[i] @ x[j]), j))
    chosen = others[:k]
    for c in range(targets.shape[1]):
      known = [targets[j, c] for j in chosen if np.isfinite(targets[j, c])]
      if known:
        out[i, c] = np.mean(known)
  return out


def test_knn_scores_equal_a_brute_force_reference():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(40, 6)).astype(np.float32)
  groups = rng.integers(0, 12, 40)
  targets = rng.integers(0, 2, (40, 3)).astype(np.float64)
  targets[rng.uniform(size=targets.shape) < 0.2] = np.nan
  got = probe.knn_scores(features, groups, targets, k=5)
  np.testing.assert_allclose(got, _reference(features, groups, targets, 5), rtol=1e-12)


def test_a_patients_own_images_are_never_its_neighbours():
  # Two patients with identical images and opposite labels: the neighbours are the other patient.
  features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  groups = np.array([7, 7, 9, 9])
  targets = np.array([[1.0], [1.0], [0.0], [0.0]])
  np.testing.assert_array_equal(probe.knn_scores(features, groups, targets, k=1), 1 - targets)


def test_scores_multiclass_and_multilabel():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 10)
  features = np.eye(3)[labels] + 0.05 * rng.normal(size=(30, 3))
  batch = {"label": labels, "patient_id": np.arange(30)}
  assert probe.score(features, batch, task="multiclass", names=("a", "b", "c"), k=3) == {
    "top1": 1.0
  }
  # Multi-label: the first label follows the features, the second is noise.
  targets = np.stack([labels == 0, rng.uniform(size=30) < 0.5], 1).astype(np.float32)
  batch = {"targets": targets, "target_mask": np.ones_like(targets), "patient_id": np.arange(30)}
  scores = probe.score(features, batch, task="chexpert", names=("x", "y"), k=3)
  assert scores["auc/x"] == 1.0
  assert scores["mean_auc"] == pytest.approx((1.0 + scores["auc/y"]) / 2)
  reference = eval_metrics.per_label_auc(
    probe.knn_scores(features, batch["patient_id"], targets, 3), targets, targets > -1, ("x", "y")
  )
  assert scores["auc/y"] == pytest.approx(reference["y"])


@pytest.mark.parametrize(
  "key, value, message",
  [("task", "mri", "probe.task"), ("k", 0, "probe.k"), ("max_images", -1, "")],
)
def test_bad_probe_config_is_named(key, value, message):
  with pytest.raises(ValueError, match=f"{message}.*{value}|probe.{key}"):
    probe.ProbeSpec(dataset="x", **{key: value})
