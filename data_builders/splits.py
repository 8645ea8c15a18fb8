"""Patient-level, deterministic splits and nested label-fraction subsets.

Everything is decided per patient (the unit), from a stable hash of (seed, patient id), so a
patient never straddles two splits or subsets, and the result does not depend on row order,
process, machine or Python's hash randomisation.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import tensorflow as tf


def stable_unit(key: str, *, seed: int, salt: str = "") -> float:
  """Maps (salt, seed, key) to a float in [0, 1) with SHA-256: stable across runs and machines."""
  digest = hashlib.sha256(f"{salt}\x00{seed}\x00{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
  if not fractions:
    raise ValueError("fractions is empty")
  negative = {name: f for name, f in fractions.items() if f < 0}
  if negative:
    raise ValueError(f"negative split fractions: {negative}")
  total = sum(fractions.values())
  if not math.isclose(total, 1.0, abs_tol=1e-6):
    raise ValueError(f"split fractions must sum to 1, got {total} from {dict(fractions)}")
  return sorted(fractions.items())


def assign_split(patient_id: str, fractions: Mapping[str, float], *, seed: int) -> str:
  """Returns the split of a patient, e.g. `assign_split(p, {'train': .8, 'test': .2}, seed=0)`.

  Splits are laid out on [0, 1) in sorted name order (so the mapping's order does not matter)
  and the patient falls where its stable hash lands.

  Args:
    patient_id: the unit to assign (all of a patient's images follow it).
    fractions: split name -> fraction, non-negative, summing to 1.
    seed: different seeds give different (independent) assignments.

  Raises:
    ValueError: fractions empty, negative or not summing to 1.
  """
  ordered = _check_fractions(fractions)
  point = stable_unit(patient_id, seed=seed, salt="split")
  cumulative = 0.0
  for name, fraction in ordered:
    cumulative += fraction
    if point < cumulative:
      return name
  return next(name for name, fraction in reversed(ordered) if fraction > 0)


def _strata(patient_ids: Sequence[str], labels: Sequence[Hashable] | None) -> dict:
  """Groups unique patients by stratum: their label, or the sorted tuple of their labels."""
  if labels is not None and len(labels) != len(patient_ids):
    raise ValueError(f"{len(patient_ids)} patient ids but {len(labels)} labels")
  per_patient: dict[str, set] = collections.defaultdict(set)
  for index, patient in enumerate(patient_ids):
    per_patient[patient].add(None if labels is None else labels[index])
  strata: dict = collections.defaultdict(list)
  for patient, found in per_patient.items():
    stratum = next(iter(found)) if len(found) == 1 else tuple(sorted(found, key=repr))
    strata[stratum].append(patient)
  return strata


def label_fraction_subset(
  patient_ids: Sequence[str],
  labels: Sequence[Hashable] | None,
  fraction: float,
  *,
  seed: int,
) -> set[str]:
  """Returns the patients of a label-fraction subset, stratified by label and nested.

  In each stratum, patients are ordered by a seeded stable hash and the first
  max(1, round(fraction × n)) are taken (none if fraction is 0), so for one seed the 10% subset
  is inside the 20% subset, ..., inside the whole set, each stratum is within ±1 of its share,
  and no patient is ever split (the subset is a set of patients).

  Args:
    patient_ids: one entry per row (image or case); a patient may repeat.
    labels: the stratum label of each row (any hashable, e.g. a class name or a tuple of binary
      labels), or None for no stratification. A patient whose rows disagree is stratified by the
      tuple of its distinct labels.
    fraction: in [0, 1].
    seed: different seeds give different subsets.

  Raises:
    ValueError: fraction outside [0, 1], or labels of a different length than patient_ids.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  if fraction == 0.0:
    return set()
  chosen: set[str] = set()
  for patients in _strata(patient_ids, labels).values():
    ordered = sorted(patients, key=lambda p: (stable_unit(p, seed=seed, salt="subset"), p))
    count = max(1, math.floor(fraction * len(ordered) + 0.5))
    chosen.update(ordered[:count])
  return chosen


def filter_by_ids(
  dataset: tf.data.Dataset, key: str, allowed_ids: Iterable[str]
) -> tf.data.Dataset:
  """Keeps the examples whose string feature `key` is in `allowed_ids` (a tf.lookup table).

  Args:
    dataset: a dataset of dicts, e.g. from `tfds.load`.
    key: the feature to look up, e.g. 'patient_id' or 'case_id'.
    allowed_ids: the ids to keep (str or bytes).
  """
  keys = sorted({i.decode() if isinstance(i, bytes) else str(i) for i in allowed_ids})
  if not keys:
    return dataset.filter(lambda example: tf.constant(False))
  table = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(
      tf.constant(keys, tf.string), tf.ones([len(keys)], tf.int32)
    ),
    default_value=0,
  )
  return dataset.filter(lambda example: table.lookup(example[key]) > 0)
