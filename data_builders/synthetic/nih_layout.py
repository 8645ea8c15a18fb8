"""Writes a synthetic NIH ChestX-ray14 download: Data_Entry CSV, split lists and PNG folders.

NIH images come out square, all the same size, frontal only and with a different intensity
profile from the CheXpert ones (a mild distribution shift, as between the real sets). The five
CheXpert competition conditions follow the same generative model as the CheXpert writer
(`findings.py`: chronic findings persist across a patient's follow-ups, acute ones do not); the
other NIH findings appear independently in 3% of images each.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from data_builders.synthetic import cxr, drawing, findings

HEADER = (
  "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)  # fmt: skip
OTHER_PREVALENCE = 0.03  # each NIH finding outside the five competition conditions
# NIH finding -> what cxr.render draws for it.
_DRAWN_AS = {"Effusion": "Pleural Effusion", "Mass": "Nodule", "Nodule": "Nodule"}
_NIH_NAME = {"Pleural Effusion": "Effusion"}  # findings.py name -> NIH name


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many patients and images `write_nih` wrote, and how many are in the test list."""

  patients: int
  images: int
  test_images: int


def _findings(rng: np.random.Generator, shown: dict[str, bool]) -> tuple[list[str], dict]:
  """(NIH finding labels, strengths to draw) of one image showing `shown` (`findings.py`)."""
  modelled = {_NIH_NAME.get(name, name) for name, present in shown.items() if present}
  found = [
    name
    for name in FINDINGS
    if name in modelled or (name not in _COMPETITION and rng.uniform() < OTHER_PREVALENCE)
  ]
  strengths = {_DRAWN_AS.get(f, f): 1.0 for f in found}
  if shown["Support Devices"]:  # drawn (a tube), but NIH has no label for it
    strengths["Support Devices"] = 1.0
  return found or ["No Finding"], strengths


_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion")


def write_nih(
  out_dir: str | pathlib.Path,
  *,
  num_patients: int = 300,
  seed: int = 0,
  image_size: int = 96,
  images_per_folder: int = 500,
  test_fraction: float = 0.2,
  legacy_csv: bool = False,
) -> Counts:
  """Writes `Data_Entry_2017_v2020.csv`, `train_val_list.txt`, `test_list.txt` and PNGs.

  Images go to `images_001/images/`, `images_002/images/`, ... (`images_per_folder` each). Each
  patient has 1-4 follow-ups; the test list holds all images of ~`test_fraction` of the patients
  (the real split is patient-level too).

  Args:
    out_dir: the manual dir to write into.
    num_patients: number of patients.
    seed: picks findings, appearances and pixels; the same seed writes byte-identical files.
    image_size: side of the square images.
    images_per_folder: images per `images_0NN` folder.
    test_fraction: fraction of patients in `test_list.txt`.
    legacy_csv: write the older `Data_Entry_2017.csv` instead (CRLF line endings, a trailing
      comma on every line, zero-padded patient ids and ages like `058Y`).

  Returns:
    The patient, image and test-image counts.
  """
  out_dir = pathlib.Path(out_dir)
  rng = np.random.default_rng(seed)
  rows, train_val, test = [], [], []
  for patient in range(1, num_patients + 1):
    anatomy = cxr.sample_anatomy(rng)
    chronic = findings.sample_patient(rng)
    age, sex = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
    in_test = rng.uniform() < test_fraction
    shown = None
    for follow_up in range(int(rng.integers(1, 5))):
      name = f"{patient:08d}_{follow_up:03d}.png"
      shown = findings.sample_study(rng, chronic, shown)
      found, strengths = _findings(rng, shown)
      image = cxr.render(
        anatomy, strengths, lateral=False, height=image_size, width=image_size, rng=rng
      )
      image = drawing.to_uint8((image / 255.0) ** 0.8)
      folder = out_dir / f"images_{1 + len(rows) // images_per_folder:03d}" / "images"
      folder.mkdir(parents=True, exist_ok=True)
      (folder / name).write_bytes(drawing.encode_png(image))
      view = str(rng.choice(["PA", "AP"], p=[0.6, 0.4]))
      patient_id, patient_age = (
        (f"{patient:05d}", f"{age:03d}Y") if legacy_csv else (str(patient), str(age))
      )
      rows.append(
        [name, "|".join(found), str(follow_up), patient_id, patient_age, sex, view]
        + [str(image_size), str(image_size), "0.143", "0.143"]
      )
      (test if in_test else train_val).append(name)
  if legacy_csv:
    lines = [HEADER + ","] + [",".join(row) + "," for row in rows]
    (out_dir / "Data_Entry_2017.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
  else:
    lines = [HEADER] + [",".join(row) for row in rows]
    (out_dir / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
  (out_dir / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
  (out_dir / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
  return Counts(patients=num_patients, images=len(rows), test_images=len(test))
