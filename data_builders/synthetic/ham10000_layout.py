"""Writes a synthetic HAM10000 download: HAM10000_metadata.csv and the two image folders."""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

from data_builders.synthetic import derm, drawing

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
# Roughly the real class frequencies (nv dominates), flattened so every class appears.
DX_PROBS = {
  "akiec": 0.08,
  "bcc": 0.1,
  "bkl": 0.14,
  "df": 0.05,
  "mel": 0.14,
  "nv": 0.44,
  "vasc": 0.05,
}
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest")


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many lesions (cases) and images `write_ham10000` wrote."""

  lesions: int
  images: int


def write_ham10000(
  out_dir: str | pathlib.Path,
  *,
  num_lesions: int = 300,
  seed: int = 0,
  image_size: int = 96,
  with_dataset_column: bool = False,
) -> Counts:
  """Writes `HAM10000_metadata.csv` and `HAM10000_images_part_{1,2}/ISIC_NNNNNNN.jpg`.

  Each lesion (the MICLe case) has 1-6 images (most have 1-2, as in the real set); the first
  half of the images go to part_1, the rest to part_2. Ages are multiples of 5 or blank.

  Args:
    out_dir: the manual dir to write into.
    num_lesions: number of lesions (cases).
    seed: picks classes, appearances and pixels; the same seed writes byte-identical files.
    image_size: image height in pixels; width is 4/3 of it, as in the real 600x450 photos.
    with_dataset_column: add the `dataset` column of newer releases.

  Returns:
    The lesion and image counts.
  """
  out_dir = pathlib.Path(out_dir)
  rng = np.random.default_rng(seed)
  rows, images = [], []
  for lesion_index in range(num_lesions):
    dx = str(rng.choice(list(DX_PROBS), p=list(DX_PROBS.values())))
    lesion = derm.sample_lesion(dx, rng)
    num_images = int(rng.choice(np.arange(1, 7), p=[0.45, 0.3, 0.1, 0.07, 0.05, 0.03]))
    age = "" if rng.uniform() < 0.03 else f"{5 * rng.integers(1, 18)}.0"
    sex = str(rng.choice(["male", "female", "unknown"], p=[0.52, 0.46, 0.02]))
    where = str(rng.choice(LOCALIZATIONS))
    dx_type = (
      "histo"
      if dx in ("mel", "bcc", "akiec")
      else str(rng.choice(["follow_up", "consensus", "histo"]))
    )
    for _ in range(num_images):
      image_id = f"ISIC_{24306 + len(images):07d}"
      image = derm.render(lesion, height=image_size, width=image_size * 4 // 3, rng=rng)
      images.append((image_id, drawing.encode_jpeg(image)))
      row = [f"HAM_{lesion_index:07d}", image_id, dx, dx_type, age, sex, where]
      rows.append(row + (["vidir_modern"] if with_dataset_column else []))
  for index, (image_id, data) in enumerate(images):
    folder = out_dir / f"HAM10000_images_part_{1 if index < len(images) // 2 else 2}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{image_id}.jpg").write_bytes(data)
  with open(out_dir / "HAM10000_metadata.csv", "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(HEADER + (["dataset"] if with_dataset_column else []))
    writer.writerows(rows)
  return Counts(lesions=num_lesions, images=len(images))
