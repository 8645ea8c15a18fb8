"""Writes synthetic teledermatology cases as a generic case CSV (`derm/generic_*` reads it).

`cases.csv` has one row per photo: `case_id,image_path,label,split,patient_id,age,sex,
localization` (what the builder reads) and `lesion_id,device,clinic,fitzpatrick` (the generative
model's hidden variables, kept for analysis and tests; the builder ignores them). Photos are JPEGs
under `images/<clinic>/<case_id>/<n>.jpg`. The home clinic's patients are split into train,
validation and test; the external clinic's cases all have split `external`, the shift evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np

from data_builders.synthetic import drawing, teledermatology

CSV_NAME = "cases.csv"  # data_builders.derm.sources.GENERIC_CSV (builders import nothing of this)
HEADER = [
  "case_id",
  "image_path",
  "label",
  "split",
  "patient_id",
  "age",
  "sex",
  "localization",
  "lesion_id",
  "device",
  "clinic",
  "fitzpatrick",
]
EXTERNAL = "external"
SPLIT_FRACTIONS: Mapping[str, float] = {"train": 0.6, "validation": 0.1, "test": 0.3}


@dataclasses.dataclass(frozen=True)
class Counts:
  """Cases and photos written, per split."""

  cases: dict[str, int]
  images: dict[str, int]


def _clinic_rows(
  out_dir: pathlib.Path, cases: Iterable[teledermatology.Case], image_size: int
) -> list[list[str]]:
  """Renders and writes every photo of `cases`; returns their CSV rows."""
  rows: list[list[str]] = []
  for case in cases:
    for n, shot in enumerate(case.shots):
      image = teledermatology.render(
        shot.lesion, case.patient, shot.photo, height=image_size, aspect=shot.device.aspect
      )
      path = f"images/{case.clinic}/{case.case_id}/{n}.jpg"
      (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
      (out_dir / path).write_bytes(drawing.encode_jpeg(image, quality=shot.photo.jpeg_quality))
      rows.append(
        [
          case.case_id,
          path,
          case.condition,
          case.split,
          case.patient.patient_id,
          str(case.patient.age),
          case.patient.sex,
          shot.lesion.site,
          f"{case.case_id}-l{shot.lesion_index}",
          shot.device.name,
          case.clinic,
          str(case.patient.fitzpatrick),
        ]
      )
  return rows


def write_teledermatology(
  out_dir: str | pathlib.Path,
  *,
  num_cases: int = 300,
  num_external_cases: int = 100,
  seed: int = 0,
  image_size: int = 64,
  split_fractions: Mapping[str, float] = SPLIT_FRACTIONS,
) -> Counts:
  """Writes `cases.csv` and the photos of `num_cases` home-clinic and `num_external_cases`
  external-clinic cases (generative model: `teledermatology`).

  Args:
    out_dir: the manual dir to write into.
    num_cases: cases of the home clinic, split by patient with `split_fractions`.
    num_external_cases: cases of the external clinic (split `external`; 0: none).
    seed: picks everything; the same seed writes byte-identical files. The external clinic is
      drawn after the home clinic from the same stream, so `num_cases` changes its cases too.
    image_size: photo height in pixels (a device's aspect ratio sets the width).
    split_fractions: train/validation/test fractions of the home clinic's patients.

  Returns:
    Cases and photos per split.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  home = teledermatology.make_clinic("home", rng)
  external = teledermatology.make_clinic(EXTERNAL, rng, external=True)
  names, probs = list(split_fractions), np.array(list(split_fractions.values()), np.float64)
  home_split = lambda r: str(r.choice(names, p=probs / probs.sum()))  # noqa: E731
  home_cases = teledermatology.sample_cases(home, num_cases, rng, home_split)
  rows = _clinic_rows(out_dir, home_cases, image_size)
  external_cases = teledermatology.sample_cases(
    external, num_external_cases, rng, lambda r: EXTERNAL
  )
  rows += _clinic_rows(out_dir, external_cases, image_size)
  with open(out_dir / CSV_NAME, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
  split, case = HEADER.index("split"), HEADER.index("case_id")
  cases: dict[str, set[str]] = {}
  images: dict[str, int] = {}
  for row in rows:
    cases.setdefault(row[split], set()).add(row[case])
    images[row[split]] = images.get(row[split], 0) + 1
  return Counts({k: len(v) for k, v in cases.items()}, images)
