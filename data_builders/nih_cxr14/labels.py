"""NIH ChestX-ray14 finding names, their multi-hot encoding, and the mapping to CheXpert-5.

`NIH_FINDINGS` fixes the order of the 14-dimensional `findings` vector (alphabetical, as in the
NIH release notes); `No Finding` is the all-zero vector. `CHEXPERT5` is the order of the CheXpert
competition conditions used by the paper's CXR evaluation; NIH's `Effusion` is CheXpert's
`Pleural Effusion`.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import tensorflow as tf

NIH_FINDINGS: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Effusion",
  "Emphysema",
  "Fibrosis",
  "Hernia",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pleural_Thickening",
  "Pneumonia",
  "Pneumothorax",
)
NO_FINDING = "No Finding"
CHEXPERT5: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Pleural Effusion",
)
# NIH name of each CheXpert-5 condition, in CHEXPERT5 order.
_NIH_NAME_OF_CHEXPERT5 = {"Pleural Effusion": "Effusion"}
CHEXPERT5_INDICES: tuple[int, ...] = tuple(
  NIH_FINDINGS.index(_NIH_NAME_OF_CHEXPERT5.get(name, name)) for name in CHEXPERT5
)

ArrayT = TypeVar("ArrayT", np.ndarray, tf.Tensor)


def parse_findings(text: str) -> np.ndarray:
  """Parses a `Finding Labels` cell (`|`-separated names) into a (14,) int8 0/1 vector.

  Args:
    text: e.g. `Effusion|Mass`, or `No Finding`.

  Returns:
    The multi-hot vector in `NIH_FINDINGS` order (all zero for `No Finding`).

  Raises:
    ValueError: an empty cell, an unknown or repeated name, or `No Finding` with other names.
  """
  names = [name.strip() for name in text.split("|")]
  if not text.strip() or any(not name for name in names):
    raise ValueError(f"empty finding name in {text!r}")
  if NO_FINDING in names:
    if len(names) > 1:
      raise ValueError(f"{NO_FINDING!r} combined with other findings in {text!r}")
    return np.zeros(len(NIH_FINDINGS), np.int8)
  unknown = [name for name in names if name not in NIH_FINDINGS]
  if unknown:
    raise ValueError(f"unknown finding(s) {unknown} in {text!r} (known: {list(NIH_FINDINGS)})")
  if len(set(names)) != len(names):
    raise ValueError(f"repeated finding in {text!r}")
  findings = np.zeros(len(NIH_FINDINGS), np.int8)
  findings[[NIH_FINDINGS.index(name) for name in names]] = 1
  return findings


def to_chexpert5(findings: ArrayT) -> ArrayT:
  """Maps NIH findings [..., 14] (`NIH_FINDINGS` order) to CheXpert-5 [..., 5] (`CHEXPERT5` order).

  Works on NumPy arrays and lists (returns NumPy) and on TF tensors (returns a tensor, usable
  inside `tf.data`); the dtype is kept. Effusion becomes Pleural Effusion; the other nine NIH
  findings are dropped.

  Args:
    findings: multi-hot (or probability) vectors whose last axis has 14 entries.

  Returns:
    The 5 CheXpert competition conditions, last axis in `CHEXPERT5` order.
  """
  if tf.is_tensor(findings):
    last = findings.shape[-1] if findings.shape.rank else None
    if last is not None and last != len(NIH_FINDINGS):
      raise ValueError(f"expected a last axis of {len(NIH_FINDINGS)}, got shape {findings.shape}")
    return tf.gather(findings, CHEXPERT5_INDICES, axis=-1)
  findings = np.asarray(findings)
  if findings.shape[-1:] != (len(NIH_FINDINGS),):
    raise ValueError(f"expected a last axis of {len(NIH_FINDINGS)}, got shape {findings.shape}")
  return np.take(findings, CHEXPERT5_INDICES, axis=-1)
