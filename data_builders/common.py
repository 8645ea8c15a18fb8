"""Input checks shared by the builders: CSV reading, safe paths, image checks, case grouping.

Every problem with the input raises `DataError`, whose message names the file and the 1-based line
(the header is line 1) or the image. The one exception is the explicit opt-in `skip_unreadable`:
missing or undecodable images are then skipped, each one logged, and `Skipped.report` logs the
count at the end, so nothing is dropped silently.

Builders keep only small per-image metadata records in memory (grouped by case with
`group_by_case`, which does not need the CSV sorted) and read image bytes lazily, one case at a
time, through `ImageReader`; memory stays bounded for CheXpert's 223,414-row train.csv.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import posixpath
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import tensorflow as tf
from absl import logging
from etils import epath

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

LOG_EVERY_ROWS = 50_000
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TF_OP_NOISE = re.compile(r"\{\{function_node [^}]*\}\}|\[Op:\w+\]")
_URL_OR_DRIVE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|[A-Za-z]:)")


class DataError(ValueError):
  """Bad input data; the message names the file and 1-based line (header = 1), or the image."""

  def __init__(self, source: str | epath.PathLike, message: str, line: int | None = None):
    where = f"{source}, line {line}" if line is not None else f"{source}"
    super().__init__(f"{where}: {message}")
    self.source = str(source)
    self.message = message
    self.line = line

  def __reduce__(self):
    return (type(self), (self.source, self.message, self.line))


@dataclasses.dataclass(frozen=True, slots=True)
class CsvRow:
  """One data row of a CSV file, with where it came from.

  Attributes:
    source: the CSV file.
    line: 1-based line number in the file (the header is line 1).
    values: column name -> cell text (whitespace stripped).
  """

  source: str
  line: int
  values: Mapping[str, str]

  def __getitem__(self, column: str) -> str:
    return self.values[column]

  def error(self, message: str) -> DataError:
    """Returns a `DataError` naming this row's file and line."""
    return DataError(self.source, message, self.line)

  def parse(self, column: str, choices: Mapping[str, V]) -> V:
    """Maps the cell of `column` through `choices`; raises `DataError` for any other value."""
    cell = self.values[column]
    if cell not in choices:
      allowed = ", ".join(repr(c) for c in choices)
      raise self.error(f"invalid value {cell!r} in column {column!r} (allowed: {allowed})")
    return choices[cell]


def _text_lines(path: epath.Path) -> Iterator[str]:
  """Yields decoded lines with their endings (so the csv module accepts CRLF); drops a BOM."""
  with path.open("rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason})", number) from None
      yield text.removeprefix("\ufeff") if number == 1 else text


def _read_header(reader, source: str, required: Sequence[str]) -> list[str]:
  """Reads and checks the header (the first non-blank line); tolerates a trailing comma."""
  header: list[str] = []
  for cells in reader:
    header = [name.strip() for name in cells]
    while header and not header[-1]:
      header.pop()
    if header:
      break
  if not header:
    raise DataError(source, "empty CSV file (no header)", 1)
  line = reader.line_num
  missing = [name for name in required if name not in header]
  if missing:
    raise DataError(source, f"missing required column(s) {missing}; columns found: {header}", line)
  duplicated = sorted({name for name in header if header.count(name) > 1})
  if duplicated:
    raise DataError(source, f"duplicated column name(s) {duplicated}", line)
  return header


def read_csv(
  path: epath.PathLike,
  required_columns: Sequence[str],
  *,
  log_every: int = LOG_EVERY_ROWS,
) -> Iterator[CsvRow]:
  """Streams the data rows of a CSV file after checking its header.

  CRLF line endings, a UTF-8 byte-order mark and a trailing comma on the header (or trailing empty
  cells on rows) are tolerated; blank lines are skipped. Progress is logged every `log_every` rows.

  Args:
    path: the CSV file.
    required_columns: columns that must be present (others are kept too).
    log_every: log progress every this many rows.

  Yields:
    One `CsvRow` per non-blank data row.

  Raises:
    DataError: empty file, header without data rows, missing required column, or a row with
      a different number of cells than the header.
  """
  path = epath.Path(path)
  source = str(path)
  if not path.exists():
    raise DataError(source, "CSV file not found")
  num_rows = 0
  reader = csv.reader(_text_lines(path))
  header = _read_header(reader, source, required_columns)
  for cells in reader:
    if not cells or (len(cells) == 1 and not cells[0].strip()):
      continue
    cells = [cell.strip() for cell in cells]
    if len(cells) > len(header) and not any(cells[len(header) :]):
      cells = cells[: len(header)]
    if len(cells) != len(header):
      raise DataError(
        source, f"row has {len(cells)} cells but the header has {len(header)}", reader.line_num
      )
    num_rows += 1
    if log_every and num_rows % log_every == 0:
      logging.info("Read %d rows of %s", num_rows, source)
    yield CsvRow(source, reader.line_num, dict(zip(header, cells, strict=True)))
  if num_rows == 0:
    raise DataError(source, "CSV file has a header but no data rows", 1)
  logging.info("Read %d rows of %s", num_rows, source)


def read_lines(path: epath.PathLike) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, stripped text) for each non-blank line of a text file."""
  path = epath.Path(path)
  if not path.exists():
    raise DataError(path, "file not found")
  for number, text in enumerate(_text_lines(path), start=1):
    text = text.strip()
    if text:
      yield number, text


def find_subdir(manual_dir: epath.PathLike, candidates: Sequence[str]) -> epath.Path:
  """Returns the first of `candidates` (names relative to `manual_dir`) that exists.

  Raises:
    DataError: naming `manual_dir` and every candidate looked for, if none exists.
  """
  manual_dir = epath.Path(manual_dir)
  for name in candidates:
    if (manual_dir / name).exists():
      return manual_dir / name
  listing = sorted(p.name for p in manual_dir.iterdir())[:20] if manual_dir.exists() else []
  raise DataError(
    manual_dir,
    f"found none of {list(candidates)} in the manual dir (it contains: {listing or 'nothing'})",
  )


def resolve_under(root: epath.PathLike, relative: str, *, source: str, line: int) -> str:
  """Normalises a path read from row `line` of `source` and checks it stays under `root`.

  Args:
    root: the directory the path is relative to (usually the manual dir).
    relative: the path as written in the file, '/'-separated.
    source: the file the path was read from (for error messages).
    line: the 1-based line it was read from.

  Returns:
    The normalised relative path (no '.', no '//'); join it to `root` to read the file.

  Raises:
    DataError: empty, absolute (including drive letters and URLs), or escaping `root` via '..'.
  """
  del root  # The check is purely lexical, so it also holds for gs:// roots and symlinks.
  if not relative:
    raise DataError(source, "empty image path", line)
  if relative.startswith(("/", "\\")) or _URL_OR_DRIVE.match(relative):
    raise DataError(
      source, f"image path {relative!r} is absolute; it must be relative to the manual dir", line
    )
  normalised = posixpath.normpath(relative.replace("\\", "/"))
  if normalised == ".." or normalised.startswith("../") or normalised == ".":
    raise DataError(source, f"image path {relative!r} escapes the manual dir", line)
  return normalised


def image_format(data: bytes) -> str | None:
  """Returns 'jpeg' or 'png' from the magic bytes, or None for anything else."""
  if data.startswith(_JPEG_MAGIC):
    return "jpeg"
  if data.startswith(_PNG_MAGIC):
    return "png"
  return None


def check_image(data: bytes, *, where: str) -> tuple[int, int, int]:
  """Checks that `data` is a decodable JPEG or PNG and returns its (height, width, channels).

  Raises:
    DataError: naming `where` (the image path) if the bytes are not a decodable JPEG/PNG.
  """
  if image_format(data) is None:
    raise DataError(where, f"not a JPEG or PNG file (starts with {data[:8]!r})")
  try:
    image = tf.io.decode_image(data, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    reason = _TF_OP_NOISE.sub("", e.message).strip()
    raise DataError(where, f"cannot decode image: {reason}") from None
  height, width, channels = (int(d) for d in image.shape)
  return height, width, channels


class Skipped:
  """Counts and logs images skipped under the explicit `skip_unreadable` opt-in."""

  def __init__(self, what: str):
    """Args: what: a description of what is being read (e.g. 'chexpert_micle train')."""
    self.what = what
    self.count = 0

  def add(self, image: str, reason: str) -> None:
    """Logs one skipped image and counts it."""
    self.count += 1
    logging.warning("skip_unreadable: skipping %s (%s)", image, reason)

  def report(self) -> None:
    """Logs how many images were skipped (a warning if any were)."""
    if self.count:
      logging.warning(
        "skip_unreadable: skipped %d unreadable image(s) in %s", self.count, self.what
      )
    else:
      logging.info("No unreadable images in %s", self.what)


class ImageReader:
  """Reads and checks image files under a root directory, applying the skip policy."""

  def __init__(self, root: epath.PathLike, *, skip_unreadable: bool, what: str):
    """Args: root: directory image paths are relative to; skip_unreadable: skip (and count)
    missing/undecodable images instead of raising; what: description for the final report."""
    self.root = epath.Path(root)
    self.skip_unreadable = skip_unreadable
    self.skipped = Skipped(what)

  def read(self, relative: str, *, source: str, line: int) -> bytes | None:
    """Returns the checked encoded bytes of `root/relative`, or None if skipped.

    Args:
      relative: a path already checked by `resolve_under`.
      source: the file that listed the image (for error messages).
      line: the 1-based line that listed it.

    Raises:
      DataError: naming `source`, `line` and the image, if it is missing or undecodable and
        `skip_unreadable` is off.
    """
    path = self.root / relative
    try:
      data = path.read_bytes()
      check_image(data, where=str(path))
    except FileNotFoundError:
      return self._fail(relative, f"image file not found: {path}", source, line)
    except (OSError, tf.errors.OpError) as e:
      return self._fail(relative, f"cannot read image file {path}: {e}", source, line)
    except DataError as e:
      return self._fail(relative, str(e), source, line)
    return data

  def _fail(self, relative: str, reason: str, source: str, line: int) -> None:
    if not self.skip_unreadable:
      raise DataError(source, f"{reason} (pass skip_unreadable to skip such images)", line)
    self.skipped.add(f"{relative} ({source}, line {line})", reason)
    return None


class UniqueKeys:
  """Detects duplicated keys (e.g. image paths), remembering where each was first seen."""

  def __init__(self, what: str = "path"):
    self.what = what
    self._first_line: dict[str, int] = {}

  def add(self, key: str, *, source: str, line: int) -> None:
    """Records `key`; raises `DataError` naming both lines if it was seen before."""
    first = self._first_line.setdefault(key, line)
    if first != line:
      raise DataError(source, f"duplicated {self.what} {key!r} (first on line {first})", line)


def group_by_case(
  records: Iterable[T],
  case_of: Callable[[T], K],
  *,
  what: str = "records",
  log_every: int = LOG_EVERY_ROWS,
) -> dict[K, list[T]]:
  """Groups small metadata records by case, in order of first appearance (no sorting needed).

  Keep records small (strings and a few numbers, no image bytes): the whole table is held in
  memory, and image bytes are read later, one case at a time.

  Args:
    records: per-image metadata, e.g. parsed CSV rows.
    case_of: returns the case key of a record.
    what: description for progress logs.
    log_every: log progress every this many records.

  Returns:
    case key -> records of that case, both in order of first appearance.
  """
  groups: dict[K, list[T]] = collections.defaultdict(list)
  count = 0
  for count, record in enumerate(records, start=1):
    groups[case_of(record)].append(record)
    if log_every and count % log_every == 0:
      logging.info("Grouped %d %s into %d cases", count, what, len(groups))
  logging.info("Grouped %d %s into %d cases", count, what, len(groups))
  return dict(groups)
