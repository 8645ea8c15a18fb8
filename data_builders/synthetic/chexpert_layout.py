"""Writes a synthetic CheXpert-v1.0-small download: train.csv, valid.csv and JPEGs.

The layout (paths, header, cell formats) is exactly the real one, so the real builder reads it.
The structure (patients, studies, views) depends only on the counts, so the documented numbers
hold for every seed; the seed picks appearances, labels and pixels. Same seed -> same bytes.
Which findings a patient's studies show follows `findings.py` (chronic findings persist across a
patient's studies, acute ones do not); the CSV cells then code them as CheXpert does.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

from data_builders.synthetic import cxr, drawing, findings

ROOT = "CheXpert-v1.0-small"
HEADER = (
  "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
  "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
  "Pleural Effusion,Pleural Other,Fracture,Support Devices"
).split(",")
OBSERVATIONS = HEADER[5:]
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_UNDRAWN = ("Lung Lesion", "Pneumonia", "Pneumothorax", "Pleural Other", "Fracture")


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many patients, studies and images `write_chexpert` wrote per split."""

  train_patients: int
  train_studies: int
  train_images: int
  valid_patients: int
  valid_studies: int
  valid_images: int


# The real train.csv's share of studies with a lateral view (16.7% of 187,641) and with two or
# more images (18.1%): a second frontal view in about 1.7% of studies, with or without a lateral.
LATERAL_SHARE = 0.167
SECOND_FRONTAL_SHARE = 0.017
TRUTH_FILE = "truth.csv"
TRUTH_HEADER = ("Path", "cardiothoracic_ratio", "body", "gamma", "gain", "tissue", "air")


def _structure(num_patients: int, study_probs: tuple[float, ...]) -> list[list[tuple[str, ...]]]:
  """Returns, per patient, the views of each study in file order (seed-independent).

  `study_probs[i]` is the probability of i + 1 studies. Every study has a frontal view; a second
  frontal one with probability `SECOND_FRONTAL_SHARE` and a lateral one with `LATERAL_SHARE`.
  """
  rng = np.random.default_rng([0xC4E5, num_patients])
  num_studies = rng.choice(len(study_probs), size=num_patients, p=study_probs) + 1

  def study() -> tuple[str, ...]:
    frontals = 1 + int(rng.uniform() < SECOND_FRONTAL_SHARE)
    return ("frontal",) * frontals + ("lateral",) * int(rng.uniform() < LATERAL_SHARE)

  return [[study() for _ in range(n)] for n in num_studies]


def _study_labels(
  rng: np.random.Generator, shown: dict[str, bool], *, valid: bool
) -> tuple[dict[str, str], dict]:
  """Returns (cell text per observation, finding strengths to draw) for one study showing
  `shown` ({finding: present}, from `findings.sample_study`)."""
  cells, strengths = {}, {}
  for name in COMPETITION + ("Support Devices",):
    positive = shown[name]
    if valid:
      cells[name] = "1.0" if positive else "0.0"
    elif positive:
      cells[name] = "-1.0" if rng.uniform() < 0.2 else "1.0"
    else:
      cells[name] = str(rng.choice(["0.0", "", "", "-1.0"], p=[0.45, 0.25, 0.2, 0.1]))
    strengths[name] = (1.0 if cells[name] == "1.0" else 0.55) if positive else 0.0
  for name in _UNDRAWN:
    options = ["0.0", "1.0"] if valid else ["", "0.0", "1.0", "-1.0"]
    cells[name] = str(rng.choice(options, p=[0.9, 0.1] if valid else [0.8, 0.1, 0.05, 0.05]))
  opacity = any(strengths[n] for n in ("Atelectasis", "Consolidation", "Edema"))
  cells["Lung Opacity"] = "1.0" if opacity else ("0.0" if valid else "")
  cells["Enlarged Cardiomediastinum"] = (
    cells["Cardiomegaly"] if strengths["Cardiomegaly"] else ("0.0" if valid else "")
  )
  abnormal = any(cells[n] in ("1.0", "-1.0") for n in OBSERVATIONS if n != "No Finding")
  cells["No Finding"] = ("0.0" if valid else "") if abnormal else "1.0"
  return cells, strengths


def _write_split(
  out_dir: pathlib.Path,
  split: str,
  structure: list[list[tuple[str, ...]]],
  first_patient: int,
  rng: np.random.Generator,
  image_size: int,
) -> list[list[str]]:
  """Writes the JPEGs and the CSV of one split; returns its rows of `TRUTH_FILE`."""
  rows, truth = [], []
  for offset, studies in enumerate(structure):
    patient = f"patient{first_patient + offset:05d}"
    anatomy = cxr.sample_anatomy(rng)
    chronic = findings.sample_patient(rng)
    sex = str(rng.choice(["Male", "Female", "Unknown"], p=[0.55, 0.44, 0.01]))
    age = int(rng.integers(18, 91))
    shown = None
    for study, study_views in enumerate(studies, start=1):
      shown = findings.sample_study(rng, chronic, shown)
      cells, strengths = _study_labels(rng, shown, valid=split == "valid")
      ratio = f"{cxr.cardiothoracic_ratio(anatomy, strengths):.4f}"
      for view, kind in enumerate(study_views, start=1):
        lateral = kind == "lateral"
        height = int(image_size + rng.integers(-14, 15))
        width = int(round(height * rng.uniform(0.78, 0.92)))
        exposure = cxr.sample_exposure(rng)
        image = cxr.render(
          anatomy,
          strengths,
          lateral=lateral,
          height=height,
          width=width,
          rng=rng,
          exposure=exposure,
        )
        relative = f"{ROOT}/{split}/{patient}/study{study}/view{view}_{kind}.jpg"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / relative).write_bytes(drawing.encode_jpeg(image))
        ap_pa = "" if lateral else str(rng.choice(["AP", "PA", "LL"], p=[0.6, 0.39, 0.01]))
        meta = [relative, sex, str(age + study - 1), "Lateral" if lateral else "Frontal", ap_pa]
        rows.append(meta + [cells[name] for name in OBSERVATIONS])
        acquisition = [anatomy.body, exposure.gamma, exposure.gain, exposure.tissue, exposure.air]
        truth.append([relative, "" if lateral else ratio] + [f"{v:.4f}" for v in acquisition])
  _write_csv(out_dir / ROOT / f"{split}.csv", HEADER, rows)
  return truth


def _write_csv(path: pathlib.Path, header, rows: list[list[str]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def write_chexpert(
  out_dir: str | pathlib.Path,
  *,
  num_patients: int = 300,
  seed: int = 0,
  num_valid_patients: int | None = None,
  image_size: int = 96,
) -> Counts:
  """Writes `out_dir/CheXpert-v1.0-small/{train,valid}.csv` and the JPEGs they list.

  Train patients have 1-3 studies (45/35/20%); each study has a frontal view, a second frontal
  one 1.7% of the time and a lateral one 16.7% of the time (the real train.csv's shares). Valid
  patients (numbered after the train ones, as in the real release) have one study and only 0/1
  labels. The images of one study show the same findings, each with its own exposure and pose.
  The default (300 + 30 patients, ~96 px) writes 516 train studies with 609 images and 30 valid
  studies with 37 images, in about 5 s. Findings follow `findings.py`.

  Beside `CheXpert-v1.0-small/`, `truth.csv` (`TRUTH_HEADER`; no builder reads it) records what
  each image was drawn with: the cardiothoracic ratio of a frontal view
  (`cxr.cardiothoracic_ratio`, blank for laterals), the patient's body size (`cxr.Anatomy`: an
  identity cue, useless for diagnosis) and the image's exposure (`cxr.Exposure`: gamma, gain,
  tissue and air brightness), for probing what a representation encodes
  (`python -m micle_jax.probe_attributes`).

  Args:
    out_dir: the folder that will contain `CheXpert-v1.0-small/` (the builder's manual dir).
    num_patients: number of train patients.
    seed: picks anatomy, labels and pixels; the same seed writes byte-identical files.
    num_valid_patients: number of validation patients (default: num_patients // 10, at least 1).
    image_size: typical image height in pixels (heights vary by ±14, widths are ~0.85 × height).

  Returns:
    The patient, study and image counts of each split.
  """
  out_dir = pathlib.Path(out_dir)
  (out_dir / ROOT).mkdir(parents=True, exist_ok=True)
  if num_valid_patients is None:
    num_valid_patients = max(1, num_patients // 10)
  train = _structure(num_patients, (0.45, 0.35, 0.2))
  valid = _structure(num_valid_patients, (1.0,))
  rng = np.random.default_rng(seed)
  train_truth = _write_split(out_dir, "train", train, 1, rng, image_size)
  valid_truth = _write_split(out_dir, "valid", valid, num_patients + 1, rng, image_size)
  _write_csv(out_dir / TRUTH_FILE, TRUTH_HEADER, train_truth + valid_truth)
  return Counts(
    train_patients=num_patients,
    train_studies=sum(len(s) for s in train),
    train_images=len(train_truth),
    valid_patients=num_valid_patients,
    valid_studies=num_valid_patients,
    valid_images=len(valid_truth),
  )
