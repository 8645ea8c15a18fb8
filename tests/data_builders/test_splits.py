"""Tests of patient-level splits and nested label-fraction subsets."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from data_builders import splits

PATIENTS = [f"patient{i:05d}" for i in range(1, 1001)]
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
LABEL_FRACTIONS = [round(0.1 * k, 1) for k in range(1, 11)]


def _rows():
  """Rows as (patient, label): 1-3 rows per patient, one label per patient, 4 uneven classes."""
  rng = np.random.default_rng(0)
  rows = []
  for patient in PATIENTS:
    label = str(rng.choice(["a", "b", "c", "d"], p=[0.6, 0.25, 0.1, 0.05]))
    rows += [(patient, label)] * int(rng.integers(1, 4))
  return [r[0] for r in rows], [r[1] for r in rows]


def test_assign_split_is_per_patient_and_near_fractions():
  ids, _ = _rows()
  assigned = collections.defaultdict(set)
  for patient in ids:  # Repeated rows of one patient must land in one split.
    assigned[patient].add(splits.assign_split(patient, FRACTIONS, seed=0))
  assert all(len(s) == 1 for s in assigned.values())
  counts = collections.Counter(next(iter(s)) for s in assigned.values())
  for name, fraction in FRACTIONS.items():
    assert abs(counts[name] / len(PATIENTS) - fraction) < 0.05


def test_assign_split_deterministic_order_free_and_seeded():
  first = [splits.assign_split(p, FRACTIONS, seed=0) for p in PATIENTS]
  reordered = dict(reversed(list(FRACTIONS.items())))
  assert first == [splits.assign_split(p, reordered, seed=0) for p in PATIENTS]
  assert first != [splits.assign_split(p, FRACTIONS, seed=1) for p in PATIENTS]
  # Golden values: the hash must never change, or published splits would move.
  assert first[:6] == ["train", "validation", "train", "train", "train", "train"]
  assert splits.stable_unit("patient00001", seed=0) == pytest.approx(0.388244889806971, abs=1e-15)
  assert splits.assign_split("x", {"only": 1.0}, seed=3) == "only"


@pytest.mark.parametrize("fractions", [{}, {"a": 0.5, "b": 0.4}, {"a": 1.2, "b": -0.2}])
def test_assign_split_rejects_bad_fractions(fractions):
  with pytest.raises(ValueError):
    splits.assign_split("p", fractions, seed=0)


def test_subsets_are_nested_deterministic_and_seeded():
  ids, labels = _rows()
  subsets = [splits.label_fraction_subset(ids, labels, f, seed=0) for f in LABEL_FRACTIONS]
  for smaller, larger in zip(subsets, subsets[1:], strict=False):
    assert smaller < larger
  assert subsets[-1] == set(PATIENTS)
  assert subsets == [splits.label_fraction_subset(ids, labels, f, seed=0) for f in LABEL_FRACTIONS]
  assert subsets[2] != splits.label_fraction_subset(ids, labels, 0.3, seed=1)
  assert splits.label_fraction_subset(ids, labels, 0.0, seed=0) == set()
  # Row order does not matter.
  assert subsets[1] == splits.label_fraction_subset(ids[::-1], labels[::-1], 0.2, seed=0)


def test_subsets_are_stratified_within_one():
  ids, labels = _rows()
  label_of = dict(zip(ids, labels, strict=True))
  per_stratum = collections.Counter(label_of.values())
  for fraction in LABEL_FRACTIONS + [0.01, 0.37]:
    subset = splits.label_fraction_subset(ids, labels, fraction, seed=7)
    chosen = collections.Counter(label_of[p] for p in subset)
    for label, n in per_stratum.items():
      assert chosen[label] >= 1
      assert abs(chosen[label] - fraction * n) <= 1, (fraction, label)


def test_subset_without_labels_and_with_mixed_patient_labels():
  assert len(splits.label_fraction_subset(PATIENTS, None, 0.25, seed=0)) == 250
  ids = ["p1", "p1", "p2", "p3"]
  labels = ["a", "b", "a", "a"]  # p1 is its own stratum ('a', 'b'): kept whole, never split.
  chosen = splits.label_fraction_subset(ids, labels, 0.1, seed=0)
  assert "p1" in chosen and len(chosen) == 2
  with pytest.raises(ValueError):
    splits.label_fraction_subset(ids, labels[:2], 0.5, seed=0)
  with pytest.raises(ValueError):
    splits.label_fraction_subset(ids, labels, 1.5, seed=0)


def test_filter_by_ids_in_tf_data():
  ids = ["p1", "p2", "p3", "p2"]
  ds = tf.data.Dataset.from_tensor_slices({"patient_id": ids, "x": [1, 2, 3, 4]})
  kept = [int(e["x"]) for e in splits.filter_by_ids(ds, "patient_id", {"p2", b"p3"})]
  assert kept == [2, 3, 4]
  assert list(splits.filter_by_ids(ds, "patient_id", [])) == []
