"""Groups dermatology images into MICLe cases and assigns patient-level splits.

A case (a lesion, or the generic CSV's `case_id`) must have one label, one patient and one split;
a patient's cases all go to the same split. Any disagreement is a `DataError` naming the file and
the rows involved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from data_builders import common, splits
from data_builders.derm.sources import CSV_SPLITS, DermImage

# Patient-level fractions used when the source has no `split` column.
SPLIT_FRACTIONS: Mapping[str, float] = {"train": 0.7, "validation": 0.1, "test": 0.2}


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
  """One MICLe case: images of one lesion (or generic case) of one patient, with one label."""

  case_id: str
  patient_id: str
  label: str
  split: str
  images: tuple[DermImage, ...]


def _single(
  images: Sequence[DermImage], value_of: Callable[[DermImage], str | None], what: str, owner: str
) -> str | None:
  """Returns the one value of `value_of` over `images`; `DataError` naming the rows otherwise."""
  values = {value_of(image) for image in images}
  if len(values) == 1:
    return values.pop()
  first = images[0]
  rows = ", ".join(f"line {image.line}: {value_of(image)!r}" for image in images)
  conflict = next(image for image in images if value_of(image) != value_of(first))
  raise common.DataError(
    first.source, f"{owner} has images with different {what} ({rows})", conflict.line
  )


def make_cases(
  images: Iterable[DermImage],
  *,
  split_seed: int,
  fractions: Mapping[str, float] = SPLIT_FRACTIONS,
) -> list[Case]:
  """Groups `images` by case, checks each case, and assigns every case a split.

  Splits come from the CSV's `split` column when the source has one (the patient-level rule is
  then checked), otherwise from `splits.assign_split(patient_id, fractions, seed=split_seed)`,
  so all cases of a patient land in the same split.

  Args:
    images: per-image records, in CSV order.
    split_seed: seed of the deterministic patient-level split.
    fractions: split name -> fraction of patients, when there is no `split` column.

  Returns:
    The cases, in order of first appearance.

  Raises:
    DataError: a case whose images disagree on label, patient or split, or a patient whose cases
      are in different splits.
  """
  groups = common.group_by_case(images, lambda image: image.case_id, what="images")
  cases = []
  patient_split: dict[str, tuple[str, DermImage]] = {}
  for case_id, case_images in groups.items():
    owner = f"case {case_id!r}"
    label = _single(case_images, lambda image: image.label, "labels", owner)
    patient_id = _single(case_images, lambda image: image.patient_id, "patient ids", owner)
    split = _single(case_images, lambda image: image.split, "splits", owner)
    if split is None:
      split = splits.assign_split(patient_id, fractions, seed=split_seed)
    first_split, first_image = patient_split.setdefault(patient_id, (split, case_images[0]))
    if first_split != split:
      raise common.DataError(
        case_images[0].source,
        f"patient {patient_id!r} is in split {split!r} here but in {first_split!r} on line "
        f"{first_image.line}; all cases of a patient must share a split",
        case_images[0].line,
      )
    if split not in CSV_SPLITS:
      raise ValueError(f"unexpected split {split!r} for patient {patient_id!r}")
    cases.append(Case(case_id, patient_id, label, split, tuple(case_images)))
  return cases


def untrained_labels(cases: Sequence[Case]) -> dict[str, dict[str, int]]:
  """Returns each label that no `train` case has, with its number of cases per split.

  A classifier fine-tuned on such a data set has an output for the label that it never trains,
  so every case of it (often of an `external` clinic) counts against every method alike.
  """
  trained = {case.label for case in cases if case.split == "train"}
  counts: dict[str, dict[str, int]] = {}
  for case in cases:
    if case.label not in trained:
      per_split = counts.setdefault(case.label, {})
      per_split[case.split] = per_split.get(case.split, 0) + 1
  return counts


def class_names(cases: Iterable[Case], known: Sequence[str] | None) -> list[str]:
  """Returns the class names: `known` if given, else the sorted unique labels of `cases`."""
  return list(known) if known is not None else sorted({case.label for case in cases})
