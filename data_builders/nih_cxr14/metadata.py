"""Reads NIH ChestX-ray14's metadata: the data-entry CSV, the official split lists, the image index.

Both releases of the data-entry CSV are accepted: `Data_Entry_2017_v2020.csv` (preferred when both
are present) and the older `Data_Entry_2017.csv` (CRLF line endings, a trailing comma on the
header, zero-padded patient ids, ages like `058Y`). Each row becomes one small `NihImage` record;
image bytes are read only when examples are yielded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np
from absl import logging
from etils import epath

from data_builders import common
from data_builders.nih_cxr14 import labels

CSV_NAMES: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_LISTS: dict[str, str] = {"train_val_list.txt": "train", "test_list.txt": "test"}
IMAGE_GLOBS: tuple[str, ...] = ("images_*/images/*.png", "images/*.png")
REQUIRED_COLUMNS: tuple[str, ...] = (
  "Image Index",
  "Finding Labels",
  "Follow-up #",
  "Patient ID",
  "Patient Age",
  "Patient Gender",
  "View Position",
)
VIEWS: tuple[str, ...] = ("PA", "AP")

_AGE = re.compile(r"^(\d+)([YMD]?)$")
_DAYS_PER_UNIT = {"Y": 365, "M": 30, "D": 1}


@dataclasses.dataclass(frozen=True, slots=True)
class NihImage:
  """Metadata of one image, with the CSV row it came from.

  Attributes:
    source: the CSV file.
    line: 1-based line of the row (header = 1).
    image_id: the image path relative to the manual dir (e.g. `images_001/images/x.png`).
    patient_id: canonical patient id: decimal without zero padding (`00012` -> `12`).
    follow_up: the `Follow-up #`.
    age: age in whole years.
    sex: `M` or `F` as written.
    view: `PA` or `AP`.
    findings: (14,) int8 multi-hot in `labels.NIH_FINDINGS` order.
    split: 'train' (train_val_list.txt) or 'test' (test_list.txt).
  """

  source: str
  line: int
  image_id: str
  patient_id: str
  follow_up: int
  age: int
  sex: str
  view: str
  findings: np.ndarray
  split: str


def canonical_patient_id(cell: str) -> str:
  """Returns the canonical patient id: the decimal number without zero padding.

  Raises:
    ValueError: if `cell` is not a non-negative integer.
  """
  if not cell.isdigit():
    raise ValueError(f"invalid Patient ID {cell!r} (expected digits)")
  return str(int(cell))


def parse_age(cell: str) -> int:
  """Parses `58`, `058Y`, `011M` or `020D` into whole years.

  Raises:
    ValueError: for anything else.
  """
  match = _AGE.match(cell)
  if not match:
    raise ValueError(f"invalid Patient Age {cell!r} (expected e.g. 58 or 058Y)")
  number, unit = int(match.group(1)), match.group(2) or "Y"
  return number if unit == "Y" else number * _DAYS_PER_UNIT[unit] // 365


def find_csv(manual_dir: epath.Path) -> epath.Path:
  """Returns the data-entry CSV in `manual_dir`, preferring the v2020 release."""
  return common.find_subdir(manual_dir, CSV_NAMES)


def read_split_lists(manual_dir: epath.Path) -> dict[str, str]:
  """Returns image file name -> 'train' or 'test', from the two official list files.

  Raises:
    DataError: a missing list file, or an image listed twice (naming the file and line).
  """
  split_of: dict[str, str] = {}
  where: dict[str, str] = {}
  for file_name, split in SPLIT_LISTS.items():
    path = manual_dir / file_name
    for line, name in common.read_lines(path):
      if name in split_of:
        raise common.DataError(path, f"image {name!r} is also listed in {where[name]}", line)
      split_of[name] = split
      where[name] = f"{file_name}, line {line}"
  return split_of


def index_images(manual_dir: epath.Path) -> dict[str, str]:
  """Indexes `images_0NN/images/*.png` (and a flat `images/*.png`): file name -> relative path.

  Raises:
    DataError: if two image files share a name.
  """
  index: dict[str, str] = {}
  for pattern in IMAGE_GLOBS:
    for path in manual_dir.glob(pattern):
      relative = path.relative_to(manual_dir).as_posix()
      first = index.setdefault(path.name, relative)
      if first != relative:
        raise common.DataError(
          manual_dir, f"two image files named {path.name!r}: {first}, {relative}"
        )
  logging.info("Indexed %d images under %s", len(index), manual_dir)
  return index


def _parse_row(row: common.CsvRow, image_id: str, split: str) -> NihImage:
  try:
    patient_id = canonical_patient_id(row["Patient ID"])
    age = parse_age(row["Patient Age"])
    findings = labels.parse_findings(row["Finding Labels"])
  except ValueError as e:
    raise row.error(str(e)) from None
  follow_up = row["Follow-up #"]
  if not follow_up.isdigit():
    raise row.error(f"invalid Follow-up # {follow_up!r} (expected digits)")
  return NihImage(
    source=row.source,
    line=row.line,
    image_id=image_id,
    patient_id=patient_id,
    follow_up=int(follow_up),
    age=age,
    sex=row["Patient Gender"],
    view=row.parse("View Position", {view: view for view in VIEWS}),
    findings=findings,
    split=split,
  )


def read_entries(manual_dir: epath.PathLike) -> Iterator[NihImage]:
  """Streams the checked rows of the data-entry CSV as `NihImage` records.

  Raises:
    DataError: naming the file and line, for a missing column, an empty file, a duplicated or
      malformed image name, an unknown finding, a bad id/age/view, or an image in neither list.
  """
  manual_dir = epath.Path(manual_dir)
  csv_path = find_csv(manual_dir)
  split_of = read_split_lists(manual_dir)
  index = index_images(manual_dir)
  names = common.UniqueKeys("Image Index")
  for row in common.read_csv(csv_path, REQUIRED_COLUMNS):
    name = row["Image Index"]
    if not name or "/" in name or "\\" in name or name.startswith("."):
      raise row.error(f"invalid Image Index {name!r} (expected a file name like 00000001_000.png)")
    names.add(name, source=row.source, line=row.line)
    if name not in split_of:
      raise row.error(f"image {name!r} is in neither {' nor '.join(SPLIT_LISTS)}")
    # A name missing from the index is reported (or skipped) when its bytes are read.
    image_id = index.get(name, f"{IMAGE_GLOBS[0].rsplit('/', 1)[0]}/{name}")
    yield _parse_row(row, image_id, split_of[name])
