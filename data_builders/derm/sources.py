"""Readers for the dermatology sources: a generic case CSV, HAM10000 and PAD-UFES-20.

Each reader streams its metadata CSV from the manual dir and yields one small `DermImage` record
per row (no image bytes), after checking the row: labels against the source's class list, paths
kept under the manual dir, images present in the one-walk index of the image folders, no duplicated
image. Image bytes are read later, when examples are yielded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

from absl import logging
from etils import epath

from data_builders import common

GENERIC_CSV = "cases.csv"
HAM10000_CSV = "HAM10000_metadata.csv"
PAD_UFES20_CSV = "metadata.csv"

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
PAD_UFES20_CLASSES: tuple[str, ...] = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
HAM10000_IMAGE_DIRS: tuple[str, ...] = ("HAM10000_images_part_1", "HAM10000_images_part_2")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# A generic CSV may also name `external`: cases from another clinic, never trained on, for the
# evaluation under distribution shift (same classes, one build).
EXTERNAL = "external"
CSV_SPLITS: tuple[str, ...] = (*SPLITS, EXTERNAL)
UNKNOWN = "unknown"

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_AGE = re.compile(r"^\d+(\.0*)?$")


@dataclasses.dataclass(frozen=True, slots=True)
class DermImage:
  """Metadata of one image, with the CSV row it came from.

  Attributes:
    source: the CSV file.
    line: 1-based line of the row (header = 1).
    image_id: image path relative to the manual dir ('/'-separated).
    case_id: the MICLe case (a lesion for HAM10000 and PAD-UFES-20).
    patient_id: the patient (HAM10000: the lesion, as it has no patient id).
    label: the class name.
    age: age in years, -1 if unknown.
    sex: lower-cased, 'unknown' if blank.
    localization: body site, lower-cased, 'unknown' if blank.
    split: the split named by the CSV's `split` column, or None.
  """

  source: str
  line: int
  image_id: str
  case_id: str
  patient_id: str
  label: str
  age: int
  sex: str
  localization: str
  split: str | None = None


def _text(row: common.CsvRow, column: str) -> str:
  """Returns the lower-cased cell of an optional metadata column, 'unknown' if blank or absent."""
  return row.values.get(column, "").lower() or UNKNOWN


def _age(row: common.CsvRow, column: str) -> int:
  """Parses an age cell ('45', '45.0'); blank or absent -> -1."""
  cell = row.values.get(column, "")
  if not cell:
    return -1
  if not _AGE.match(cell):
    raise row.error(f"invalid age {cell!r} in column {column!r} (expected years, e.g. 45)")
  return int(float(cell))


def _required(row: common.CsvRow, column: str) -> str:
  """Returns a required cell, raising `DataError` if it is blank."""
  cell = row[column]
  if not cell:
    raise row.error(f"empty value in required column {column!r}")
  return cell


def index_images(
  manual_dir: epath.Path,
  folders: Sequence[epath.Path],
  *,
  key_of: Callable[[epath.Path], str] = lambda path: path.name,
) -> dict[str, str]:
  """Indexes the image files under `folders` (recursively) in one walk.

  Args:
    manual_dir: the root that returned paths are relative to.
    folders: directories to walk.
    key_of: maps a file path to its index key (default: the file name).

  Returns:
    key -> image path relative to `manual_dir`.

  Raises:
    DataError: naming both paths, if two image files have the same key.
  """
  index: dict[str, str] = {}
  for folder in folders:
    for root, dirs, files in folder.walk():
      dirs.sort()
      for name in sorted(files):
        path = root / name
        if path.suffix.lower() not in _IMAGE_SUFFIXES:
          continue
        relative = path.relative_to(manual_dir).as_posix()
        first = index.setdefault(key_of(path), relative)
        if first != relative:
          raise common.DataError(
            manual_dir, f"two image files for {key_of(path)!r}: {first}, {relative}"
          )
  logging.info("Indexed %d images under %s", len(index), [str(f) for f in folders])
  return index


def _indexed(index: dict[str, str], key: str, default: str, row: common.CsvRow) -> str:
  """Returns the indexed path of image `key`, else `default` (checked to stay under the manual
  dir), whose absence `common.ImageReader` then reports, naming `row`, or skips."""
  if key in index:
    return index[key]
  return common.resolve_under("", default, source=row.source, line=row.line)


def read_generic(manual_dir: epath.PathLike) -> Iterator[DermImage]:
  """Reads `cases.csv`: `case_id,image_path,label` + optional `split,patient_id,age,sex,...`.

  `image_path` is relative to the manual dir and must stay under it; `patient_id` defaults to the
  case id; the body site is read from `localization` (or `site`).
  """
  manual_dir = epath.Path(manual_dir)
  paths = common.UniqueKeys("image_path")
  for row in common.read_csv(manual_dir / GENERIC_CSV, ("case_id", "image_path", "label")):
    image_id = common.resolve_under(manual_dir, row["image_path"], source=row.source, line=row.line)
    paths.add(image_id, source=row.source, line=row.line)
    split = None
    if "split" in row.values:
      split = row.parse("split", {name: name for name in CSV_SPLITS})
    case_id = _required(row, "case_id")
    site_column = "localization" if "localization" in row.values else "site"
    yield DermImage(
      source=row.source,
      line=row.line,
      image_id=image_id,
      case_id=case_id,
      patient_id=row.values.get("patient_id") or case_id,
      label=_required(row, "label"),
      age=_age(row, "age"),
      sex=_text(row, "sex"),
      localization=_text(row, site_column),
      split=split,
    )


def _ham10000_folders(manual_dir: epath.Path) -> list[epath.Path]:
  """Finds the two HAM10000 image folders, whatever their case.

  When both spellings of a part exist (the Kaggle mirror ships both copies), the canonical
  upper-case one is used and the other ignored (logged).
  """
  wanted = {name.lower(): name for name in HAM10000_IMAGE_DIRS}
  found: dict[str, epath.Path] = {}
  subdirs = sorted(manual_dir.iterdir()) if manual_dir.exists() else []
  for path in subdirs:  # Sorted: upper-case names come first.
    key = path.name.lower()
    if key in wanted and path.is_dir():
      if key in found:
        logging.warning("Ignoring %s: a copy of %s", path, found[key])
        continue
      found[key] = path
  if not found:
    raise common.DataError(manual_dir, f"no image folder {list(HAM10000_IMAGE_DIRS)} (any case)")
  return list(found.values())


def read_ham10000(manual_dir: epath.PathLike) -> Iterator[DermImage]:
  """Reads `HAM10000_metadata.csv` (with or without the newer `dataset` column).

  A case is a lesion; HAM10000 has no patient id, so the patient is the lesion too.
  """
  manual_dir = epath.Path(manual_dir)
  csv_path = manual_dir / HAM10000_CSV
  if not csv_path.exists():
    raise common.DataError(csv_path, "CSV file not found")
  index = index_images(manual_dir, _ham10000_folders(manual_dir), key_of=lambda p: p.stem)
  ids = common.UniqueKeys("image_id")
  columns = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
  classes = {name: name for name in HAM10000_CLASSES}
  for row in common.read_csv(csv_path, columns):
    image_name = _required(row, "image_id")
    ids.add(image_name, source=row.source, line=row.line)
    lesion_id = _required(row, "lesion_id")
    yield DermImage(
      source=row.source,
      line=row.line,
      image_id=_indexed(index, image_name, f"{HAM10000_IMAGE_DIRS[0]}/{image_name}.jpg", row),
      case_id=lesion_id,
      patient_id=lesion_id,
      label=row.parse("dx", classes),
      age=_age(row, "age"),
      sex=_text(row, "sex"),
      localization=_text(row, "localization"),
    )


def read_pad_ufes20(manual_dir: epath.PathLike) -> Iterator[DermImage]:
  """Reads PAD-UFES-20's `metadata.csv`; images anywhere under `images/` (e.g. `imgs_part_1/`).

  A case is a lesion (`lesion_id`), the patient is `patient_id`.
  """
  manual_dir = epath.Path(manual_dir)
  csv_path = manual_dir / PAD_UFES20_CSV
  if not csv_path.exists():
    raise common.DataError(csv_path, "CSV file not found")
  index = index_images(manual_dir, [common.find_subdir(manual_dir, ["images"])])
  ids = common.UniqueKeys("img_id")
  columns = ("patient_id", "lesion_id", "age", "gender", "region", "diagnostic", "img_id")
  classes = {name: name for name in PAD_UFES20_CLASSES}
  for row in common.read_csv(csv_path, columns):
    image_name = _required(row, "img_id")
    ids.add(image_name, source=row.source, line=row.line)
    yield DermImage(
      source=row.source,
      line=row.line,
      image_id=_indexed(index, image_name, f"images/{image_name}", row),
      case_id=_required(row, "lesion_id"),
      patient_id=_required(row, "patient_id"),
      label=row.parse("diagnostic", classes),
      age=_age(row, "age"),
      sex=_text(row, "gender"),
      localization=_text(row, "region"),
    )
