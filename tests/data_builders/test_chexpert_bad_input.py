"""Each kind of bad input fails download_and_prepare with a message naming the file and row."""

from __future__ import annotations

import logging
import pathlib
import re
import shutil

import pytest
import tensorflow_datasets as tfds

from data_builders import common
from data_builders.chexpert import chexpert

DUMMY = pathlib.Path(__file__).resolve().parents[2] / "data_builders" / "chexpert" / "dummy_data"
ROOT = "CheXpert-v1.0-small"
# Line 3 of the dummy train.csv (header = line 1).
LINE3_IMAGE = f"{ROOT}/train/patient00002/study1/view1_frontal.jpg"


@pytest.fixture
def manual_dir(tmp_path) -> pathlib.Path:
  shutil.copytree(DUMMY, tmp_path / "manual")
  return tmp_path / "manual"


def _edit_train_csv(manual_dir: pathlib.Path, edit) -> pathlib.Path:
  path = manual_dir / ROOT / "train.csv"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(edit(lines)) + "\n")
  return path


def _build(manual_dir, data_dir, config="images", **kwargs) -> tfds.core.DatasetBuilder:
  builder = chexpert.ChexpertMicle(config=config, data_dir=data_dir, **kwargs)
  download_config = tfds.download.DownloadConfig(
    manual_dir=str(manual_dir), compute_stats=tfds.download.ComputeStatsMode.SKIP
  )
  builder.download_and_prepare(download_config=download_config)
  return builder


def _replace_line3(old: str, new: str):
  def edit(lines):
    lines[2] = lines[2].replace(old, new, 1)
    return lines

  return edit


@pytest.mark.parametrize(
  "edit, message",
  [
    (_replace_line3(LINE3_IMAGE, f"{ROOT}/../../etc/x.jpg"), "escapes the manual dir"),
    (_replace_line3(LINE3_IMAGE, f"/abs/{LINE3_IMAGE}"), "is absolute"),
    (_replace_line3(",1.0,", ",2.0,"), "invalid value '2.0'"),
    (_replace_line3(",1.0,", ",yes,"), "invalid value 'yes'"),
    (_replace_line3(",Frontal,", ",Sideways,"), "invalid value 'Sideways'"),
    (_replace_line3(",46,", ",old,"), "invalid value 'old' in column 'Age'"),
    (_replace_line3(LINE3_IMAGE, LINE3_IMAGE.replace(".jpg", "x.jpg")), "image file not found"),
  ],
  ids=["dotdot", "absolute", "label_2.0", "label_yes", "view", "age", "missing_image"],
)
def test_bad_row_names_file_and_line(manual_dir, tmp_path, edit, message):
  csv_path = _edit_train_csv(manual_dir, edit)
  with pytest.raises(common.DataError, match=re.escape(f"{csv_path}, line 3: ") + ".*" + message):
    _build(manual_dir, tmp_path / "tfds")


def test_duplicated_path(manual_dir, tmp_path):
  csv_path = _edit_train_csv(manual_dir, lambda lines: lines + [lines[2]])
  with pytest.raises(common.DataError, match=re.escape(f"{csv_path}, line 13: duplicated path")):
    _build(manual_dir, tmp_path / "tfds", config="patients")


def test_undecodable_image(manual_dir, tmp_path):
  (manual_dir / LINE3_IMAGE).write_bytes(b"\xff\xd8\xff\xe0 truncated")
  csv_path = manual_dir / ROOT / "train.csv"
  pattern = re.escape(f"{csv_path}, line 3: {manual_dir / LINE3_IMAGE}: cannot decode image")
  with pytest.raises(common.DataError, match=pattern):
    _build(manual_dir, tmp_path / "tfds", config="studies")


@pytest.mark.parametrize("old, new", [("Frontal/Lateral", "View"), (",Edema", "")])
def test_missing_or_renamed_column(manual_dir, tmp_path, old, new):
  def edit(lines):
    lines[0] = lines[0].replace(old, new)
    return lines

  csv_path = _edit_train_csv(manual_dir, edit)
  expected = old.strip(",")
  with pytest.raises(
    common.DataError,
    match=re.escape(f"{csv_path}, line 1: missing required column(s) ['{expected}']"),
  ):
    _build(manual_dir, tmp_path / "tfds")


@pytest.mark.parametrize(
  "keep, message", [(0, "empty CSV file"), (1, "CSV file has a header but no data rows")]
)
def test_empty_csv(manual_dir, tmp_path, keep, message):
  csv_path = _edit_train_csv(manual_dir, lambda lines: lines[:keep])
  with pytest.raises(common.DataError, match=re.escape(f"{csv_path}, line 1: {message}")):
    _build(manual_dir, tmp_path / "tfds")


def test_no_chexpert_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "CheXpert-v1.0-small.zip").write_bytes(b"")
  with pytest.raises(common.DataError, match="CheXpert-v1.0-small.*CheXpert-v1.0"):
    _build(tmp_path / "empty", tmp_path / "tfds")


def test_full_resolution_folder_and_crlf(manual_dir, tmp_path):
  full = manual_dir.parent / "full"
  full.mkdir()
  (manual_dir / ROOT).rename(full / "CheXpert-v1.0")
  for csv_path in (full / "CheXpert-v1.0").glob("*.csv"):
    text = csv_path.read_text().replace(ROOT + "/", "CheXpert-v1.0/")
    csv_path.write_bytes(text.replace("\n", "\r\n").encode())
  builder = _build(full, tmp_path / "tfds", config="studies")
  assert builder.info.splits["train"].num_examples == 9


def test_skip_unreadable_counts_and_logs(manual_dir, tmp_path, caplog):
  (manual_dir / LINE3_IMAGE).unlink()
  (manual_dir / f"{ROOT}/train/patient00004/study1/view1_frontal.jpg").write_bytes(b"not an image")
  with caplog.at_level(logging.INFO):
    builder = _build(manual_dir, tmp_path / "tfds", config="patients", skip_unreadable=True)
  # patient00004 had one image, now unreadable: the case is dropped, with a warning.
  assert builder.info.splits["train"].num_examples == 4
  assert "skipped 2 unreadable image(s)" in caplog.text
  assert LINE3_IMAGE in caplog.text and "patient00004" in caplog.text
