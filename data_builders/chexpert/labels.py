"""CheXpert observation codes and uncertainty policies, applied when reading (not when building).

The builder stores the raw state of the 14 observations per image, in CSV column order, as int8:
1 positive, 0 negative, -1 uncertain, -2 unmentioned (blank cell). `targets_and_mask` turns them
into training targets for a label set under an uncertainty policy (CheXpert paper: U-Ignore,
U-Zeros, U-Ones; U-Ones works best for Atelectasis and Edema). It works on numpy arrays and on TF
tensors, so it can run inside a tf.data pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

OBSERVATIONS: tuple[str, ...] = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)
COMPETITION_TASKS: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Pleural Effusion",
)
LABEL_SETS: dict[str, tuple[str, ...]] = {
  "competition5": COMPETITION_TASKS,
  "all14": OBSERVATIONS,
}
POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore")

POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED = 1, 0, -1, -2
# Cell text -> code. The real CSVs write '1.0', '0.0', '-1.0' or leave the cell blank.
CELL_CODES: dict[str, int] = {
  "1.0": POSITIVE,
  "1": POSITIVE,
  "0.0": NEGATIVE,
  "0": NEGATIVE,
  "-1.0": UNCERTAIN,
  "-1": UNCERTAIN,
  "": UNMENTIONED,
}

Policy = str | Mapping[str, str]


def label_names(label_set: str) -> tuple[str, ...]:
  """Returns the condition names of `label_set` ('competition5' or 'all14'), in target order."""
  if label_set not in LABEL_SETS:
    raise ValueError(f"unknown label_set {label_set!r}; expected one of {sorted(LABEL_SETS)}")
  return LABEL_SETS[label_set]


def per_condition_policy(
  default: str, overrides: Mapping[str, str] | None = None, *, label_set: str
) -> dict[str, str]:
  """Returns a full condition -> policy dict: `default` everywhere except `overrides`.

  Example: `per_condition_policy('zeros', {'Atelectasis': 'ones', 'Edema': 'ones'},
  label_set='competition5')`.
  """
  policy = {name: default for name in label_names(label_set)}
  policy.update(overrides or {})
  _resolve_policies(policy, label_names(label_set))
  return policy


def _resolve_policies(policy: Policy, names: tuple[str, ...]) -> list[str]:
  """Returns one policy name per condition of `names`; raises ValueError naming bad entries."""
  if isinstance(policy, str):
    per_condition = {name: policy for name in names}
  else:
    unknown = sorted(set(policy) - set(names))
    if unknown:
      raise ValueError(f"policy names condition(s) {unknown} that are not in the label set {names}")
    missing = [name for name in names if name not in policy]
    if missing:
      raise ValueError(f"policy dict has no entry for condition(s) {missing}")
    per_condition = dict(policy)
  bad = sorted({p for p in per_condition.values() if p not in POLICIES})
  if bad:
    raise ValueError(f"unknown uncertainty policy {bad}; expected one of {list(POLICIES)}")
  return [per_condition[name] for name in names]


def targets_and_mask(observations, *, policy: Policy, label_set: str):
  """Maps raw observation codes to (targets, mask) for a label set and uncertainty policy.

  Positive -> target 1; negative and unmentioned -> target 0; uncertain -> target 1 ('ones'),
  target 0 ('zeros') or mask 0 ('ignore'). The mask is 1 everywhere else.

  Args:
    observations: int array or tensor [..., 14] of codes, in `OBSERVATIONS` order; a numpy
      array (or anything `np.asarray` accepts) or a `tf.Tensor`.
    policy: 'ones', 'zeros' or 'ignore' for every condition, or a dict condition -> policy that
      covers every condition of `label_set` (see `per_condition_policy`).
    label_set: 'competition5' (`COMPETITION_TASKS` order) or 'all14' (`OBSERVATIONS` order).

  Returns:
    (targets, mask), float32 [..., K], of the same kind as `observations` (numpy or TF).

  Raises:
    ValueError: an unknown label set, policy, or condition name (the message names it).
  """
  names = label_names(label_set)
  policies = _resolve_policies(policy, names)
  indices = [OBSERVATIONS.index(name) for name in names]
  uncertain_target = np.array([p == "ones" for p in policies], np.float32)
  uncertain_mask = np.array([p != "ignore" for p in policies], np.float32)
  if isinstance(observations, tf.Tensor):
    codes = tf.gather(tf.cast(observations, tf.int32), indices, axis=-1)
    ones = tf.ones_like(codes, tf.float32)
    uncertain = codes == UNCERTAIN
    positive = tf.cast(codes == POSITIVE, tf.float32)
    targets = tf.where(uncertain, uncertain_target * ones, positive)
    mask = tf.where(uncertain, uncertain_mask * ones, ones)
    return targets, mask
  codes = np.take(np.asarray(observations, np.int32), indices, axis=-1)
  uncertain = codes == UNCERTAIN
  targets = np.where(uncertain, uncertain_target, (codes == POSITIVE).astype(np.float32))
  mask = np.where(uncertain, uncertain_mask, np.float32(1.0))
  return targets.astype(np.float32), mask.astype(np.float32)
