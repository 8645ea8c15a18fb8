"""Evaluation metrics against independent references: pairwise AUC, hand top-k, bootstrap."""

import itertools
import warnings

import numpy as np
import pytest

from micle_jax.eval import bootstrap, eval_metrics


def pairwise_auc(scores, labels) -> float:
  """O(N^2) definition: P(positive scores above negative), a tie counting 1/2."""
  pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
  neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_definition_with_many_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 60))
  scores = rng.integers(0, 5, n)  # Few distinct values: ties within and across classes.
  labels = rng.integers(0, 2, n)
  labels[:2] = [0, 1]
  # Same U numerator and denominator, so the two agree exactly.
  assert eval_metrics.roc_auc(scores, labels) == pairwise_auc(scores, labels)


def test_roc_auc_edge_cases():
  labels = np.array([0, 0, 1, 1, 1])
  assert eval_metrics.roc_auc(np.array([0.1, 0.2, 0.3, 0.4, 0.9]), labels) == 1.0
  assert eval_metrics.roc_auc(np.array([0.9, 0.8, 0.3, 0.2, 0.1]), labels) == 0.0
  assert eval_metrics.roc_auc(np.full(5, 7.0), labels) == 0.5
  assert eval_metrics.roc_auc(np.array([1, 2, 3]), np.array([True, False, True])) == 0.5
  assert eval_metrics.roc_auc(np.array([1.0, 2.0]), np.array([0.0, 1.0])) == 1.0


def test_roc_auc_one_class_is_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert np.isnan(eval_metrics.roc_auc(np.array([0.1, 0.5, 0.2]), np.array([1, 1, 1])))
    assert np.isnan(eval_metrics.roc_auc(np.array([0.1, 0.5]), np.array([0, 0])))
    assert np.isnan(eval_metrics.roc_auc(np.zeros(0), np.zeros(0, int)))


def test_roc_auc_rejects_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    eval_metrics.roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match="0 or 1"):
    eval_metrics.roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
  with pytest.raises(ValueError, match="0 or 1"):
    eval_metrics.roc_auc(np.array([0.1, 0.2]), np.array([0.0, np.nan]))
  with pytest.raises(ValueError, match="equal length"):
    eval_metrics.roc_auc(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def test_per_label_auc_with_mask():
  scores = np.array([[0.1, 0.9, 0.5], [0.4, 0.8, 0.5], [0.45, 0.2, np.nan], [0.8, 0.1, 0.5]])
  targets = np.array([[0, 1, 1], [1, 1, 1], [0, -1, 0], [1, 0, 1]])
  mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
  got = eval_metrics.per_label_auc(scores, targets, mask, ["a", "b", "c"])
  assert list(got) == ["a", "b", "c"]
  assert got["a"] == pairwise_auc(scores[:, 0], targets[:, 0])  # 0.75
  assert got["a"] == 0.75
  # Masked cell (-1 target) is excluded: rows 0, 1, 3 -> perfect.
  assert got["b"] == 1.0
  # Masked cell held the only negative (and a NaN score): one class left -> nan, no crash.
  assert np.isnan(got["c"])
  assert eval_metrics.mean_auc(got) == pytest.approx(0.875)
  assert eval_metrics.num_defined(got) == 2

  unmasked = eval_metrics.per_label_auc(scores[:, :2], np.abs(targets[:, :2]), None, ["a", "b"])
  assert unmasked["b"] == pairwise_auc(scores[:, 1], np.abs(targets[:, 1]))

  with pytest.raises(ValueError, match="label 'b'.*0 or 1"):
    eval_metrics.per_label_auc(scores[:, :2], targets[:, :2], None, ["a", "b"])
  with pytest.raises(ValueError, match="names"):
    eval_metrics.per_label_auc(scores, targets, mask, ["a", "b"])


def test_mean_auc_of_no_defined_labels_is_nan():
  assert np.isnan(eval_metrics.mean_auc({"a": float("nan")}))
  assert np.isnan(eval_metrics.mean_auc({}))
  assert eval_metrics.num_defined({"a": float("nan")}) == 0


def test_top_k_accuracy_hand_example():
  probs = np.array(
    [
      [0.1, 0.6, 0.2, 0.1],  # label 1: rank 0.
      [0.3, 0.3, 0.3, 0.1],  # label 2: tied with 0 and 1, which win by index -> rank 2.
      [0.3, 0.3, 0.3, 0.1],  # label 0: wins the tie -> rank 0.
      [0.4, 0.3, 0.2, 0.1],  # label 3: rank 3.
      [0.25, 0.25, 0.25, 0.25],  # label 3: all tied, last by index -> rank 3.
    ]
  )
  labels = np.array([1, 2, 0, 3, 3])
  assert eval_metrics.top_k_accuracy(probs, labels, 1) == 2 / 5
  assert eval_metrics.top_k_accuracy(probs, labels, 3) == 3 / 5
  assert eval_metrics.top_k_accuracy(probs, labels, 4) == 1.0
  with pytest.raises(ValueError, match="k must"):
    eval_metrics.top_k_accuracy(probs, labels, 5)
  with pytest.raises(ValueError, match="class indices"):
    eval_metrics.top_k_accuracy(probs, np.array([0, 1, 2, 3, 4]), 1)


def test_aggregate_by_case_averages_in_first_appearance_order():
  ids = ["b", "a", "b", "c", "a", "b"]
  probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.4, 0.6], [1.0, 0.0], [0.8, 0.2], [0.0, 1.0]])
  labels = np.array([1, 0, 1, 0, 0, 1])
  case_ids, case_probs, case_labels = eval_metrics.aggregate_by_case(ids, probs, labels)
  assert case_ids == ["b", "a", "c"]
  np.testing.assert_allclose(case_probs, [[0.2, 0.8], [0.7, 0.3], [1.0, 0.0]])
  np.testing.assert_array_equal(case_labels, [1, 0, 0])


def test_aggregate_by_case_multilabel_targets_and_conflicts():
  targets = np.array([[1, 0], [1, 0], [0, 1]])
  _, case_probs, case_targets = eval_metrics.aggregate_by_case(
    ["x", "x", "y"], np.array([[0.5], [0.7], [0.1]]), targets
  )
  np.testing.assert_allclose(case_probs, [[0.6], [0.1]])
  np.testing.assert_array_equal(case_targets, [[1, 0], [0, 1]])
  with pytest.raises(ValueError, match=r"conflicting labels.*\['y'\]"):
    eval_metrics.aggregate_by_case(
      ["x", "y", "x", "y"], np.zeros((4, 2)), np.array([[1, 0], [1, 0], [1, 0], [1, 1]])
    )
  with pytest.raises(ValueError, match=r"\['case-7'\]"):
    eval_metrics.aggregate_by_case(["case-7", "case-7"], np.zeros((2, 3)), np.array([0, 2]))


def test_case_level_auc_with_ci_end_to_end():
  rng = np.random.default_rng(2)
  case_of_image = np.repeat(np.arange(40), 3)
  case_label = rng.integers(0, 2, 40)
  probs1 = np.clip(0.5 + 0.3 * (case_label[case_of_image] - 0.5) + rng.normal(0, 0.2, 120), 0, 1)
  ids, case_probs, labels = eval_metrics.aggregate_by_case(
    [f"c{i}" for i in case_of_image], np.stack([1 - probs1, probs1], 1), case_label[case_of_image]
  )
  assert len(ids) == 40

  def case_auc(weights):
    return {"auc": eval_metrics.weighted_auc(case_probs[:, 1], labels, weights)}

  out = bootstrap.metrics_with_ci(case_auc, len(ids), num_samples=200)["auc"]
  assert out["value"] == pytest.approx(pairwise_auc(case_probs[:, 1], labels), abs=1e-12)
  assert out["ci_low"] <= out["value"] <= out["ci_high"]
