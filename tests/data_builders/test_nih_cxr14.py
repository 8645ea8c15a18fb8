"""Tests for the `nih_cxr14` builder: dummy data per config, both CSV releases, bad input."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from data_builders import synthetic
from data_builders.common import DataError
from data_builders.nih_cxr14 import labels, nih_cxr14

DUMMY_DATA = (
  epath.Path(__file__).resolve().parents[2] / "data_builders" / "nih_cxr14" / "dummy_data"
)
V2020 = "Data_Entry_2017_v2020.csv"


class NihCxr14ImagesTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = nih_cxr14.NihCxr14
  BUILDER_CONFIG_NAMES_TO_TEST = ["images"]
  EXAMPLE_DIR = DUMMY_DATA
  SPLITS = {"train": 5, "test": 3}


class NihCxr14PatientsTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = nih_cxr14.NihCxr14
  BUILDER_CONFIG_NAMES_TO_TEST = ["patients"]
  EXAMPLE_DIR = DUMMY_DATA
  SPLITS = {"train": 2, "test": 2}


@pytest.fixture
def manual_dir(tmp_path: epath.Path) -> epath.Path:
  """A writable copy of the dummy data."""
  path = epath.Path(tmp_path) / "manual"
  shutil.copytree(DUMMY_DATA, path)
  return path


def _build(manual: epath.Path, config: str = "images", **kwargs) -> dict[str, list[dict]]:
  builder = nih_cxr14.NihCxr14(config=config, data_dir=str(manual.parent / "out"), **kwargs)
  download_config = tfds.download.DownloadConfig(
    manual_dir=manual, compute_stats=tfds.download.ComputeStatsMode.SKIP
  )
  builder.download_and_prepare(download_config=download_config)
  return {
    split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in builder.info.splits
  }


def _edit_csv(manual: epath.Path, edit: Callable[[list[str]], list[str]], name: str = V2020):
  path = manual / name
  path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))


def test_image_examples(manual_dir):
  examples = {ex["image_id"].decode(): ex for ex in _build(manual_dir)["train"]}
  ex = examples["images_001/images/00000001_002.png"]
  assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 1
  assert ex["case_id"] == ex["patient_id"] == b"1"
  assert (ex["follow_up"], ex["age"], ex["sex"], ex["view"]) == (2, 58, b"M", b"AP")
  expected = np.zeros(14, np.int8)
  expected[[labels.NIH_FINDINGS.index("Cardiomegaly"), labels.NIH_FINDINGS.index("Effusion")]] = 1
  np.testing.assert_array_equal(ex["findings"], expected)
  np.testing.assert_array_equal(ex["chexpert5"], [0, 1, 0, 0, 1])
  assert not examples["images_002/images/00000003_000.png"]["chexpert5"].any()


def test_patient_examples(manual_dir):
  patients = {ex["patient_id"].decode(): ex for ex in _build(manual_dir, "patients")["train"]}
  ex = patients["1"]
  assert ex["num_images"] == 3 == len(ex["images"]) == len(ex["image_ids"])
  assert tf.io.decode_png(ex["images"][0]).shape[-1] == 1
  np.testing.assert_array_equal(ex["follow_up"], [0, 1, 2])
  assert ex["findings"].shape == (3, 14) and ex["chexpert5"].shape == (3, 5)
  np.testing.assert_array_equal(ex["chexpert5"][:, 4], [0, 0, 1])


def test_2017_release_with_crlf_padded_ids_and_age_units(manual_dir):
  rows = (manual_dir / V2020).read_text().splitlines()
  header = rows[0] + ","
  old = []
  for row in rows[1:]:
    cells = row.split(",")
    cells[3] = f"{int(cells[3]):05d}"
    cells[4] = f"{int(cells[4]):03d}Y"
    old.append(",".join(cells))
  old[-1] = old[-1].replace(",082Y,", ",011M,")
  (manual_dir / "Data_Entry_2017.csv").write_bytes(("\r\n".join([header, *old]) + "\r\n").encode())
  (manual_dir / V2020).unlink()
  examples = {ex["image_id"].decode(): ex for ex in _build(manual_dir)["test"]}
  ex = examples["images_002/images/00000004_001.png"]
  assert (ex["patient_id"], ex["case_id"], ex["age"]) == (b"4", b"4", 0)
  assert examples["images_002/images/00000004_000.png"]["age"] == 82


def _replace_line(number: int, old: str, new: str) -> Callable[[list[str]], list[str]]:
  def edit(lines: list[str]) -> list[str]:
    lines[number - 1] = lines[number - 1].replace(old, new)
    return lines

  return edit


def _corrupt(manual: epath.Path) -> None:
  (manual / "images_001/images/00000001_001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _delete(manual: epath.Path) -> None:
  (manual / "images_002/images/00000003_000.png").unlink()


_BAD_CSV = {
  "unknown_finding": (_replace_line(3, "Emphysema", "Emphysma"), r"line 3: .*unknown finding"),
  "renamed_column": (
    _replace_line(1, "Finding Labels", "Findings"),
    r"line 1: missing required column.*Finding Labels",
  ),
  "empty_csv": (lambda lines: [], r"line 1: empty CSV"),
  "header_only": (lambda lines: lines[:1], r"line 1: CSV file has a header but no data rows"),
  "duplicated_image": (
    _replace_line(3, "00000001_001.png", "00000001_000.png"),
    r"line 3: duplicated Image Index '00000001_000.png' \(first on line 2\)",
  ),
  "path_in_image_index": (
    _replace_line(2, "00000001_000.png", "../00000001_000.png"),
    r"line 2: invalid Image Index",
  ),
  "bad_view": (_replace_line(4, ",AP,", ",LL,"), r"line 4: invalid value 'LL'"),
  "bad_age": (_replace_line(5, ",81,", ",eighty,"), r"line 5: invalid Patient Age"),
  "not_in_lists": (
    lambda lines: [*lines, lines[-1].replace("00000004_001", "00000005_000")],
    r"line 10: image '00000005_000.png' is in neither",
  ),
}


@pytest.mark.parametrize("name", sorted(_BAD_CSV))
def test_bad_csv_names_file_and_row(manual_dir, name):
  edit, match = _BAD_CSV[name]
  _edit_csv(manual_dir, edit)
  with pytest.raises(DataError, match=rf"{V2020}, {match}"):
    _build(manual_dir)


@pytest.mark.parametrize(
  "damage, match",
  [
    (_delete, rf"{V2020}, line 6: image file not found: .*00000003_000\.png"),
    (_corrupt, rf"{V2020}, line 3: .*00000001_001\.png: cannot decode image"),
  ],
)
def test_unreadable_image_names_file_and_row(manual_dir, damage, match):
  damage(manual_dir)
  with pytest.raises(DataError, match=match):
    _build(manual_dir)


def test_skip_unreadable_skips_and_counts(manual_dir):
  _delete(manual_dir)
  _corrupt(manual_dir)
  splits = _build(manual_dir, skip_unreadable=True)
  assert (len(splits["train"]), len(splits["test"])) == (3, 3)


def test_patient_in_both_lists(manual_dir):
  train_list, test_list = manual_dir / "train_val_list.txt", manual_dir / "test_list.txt"
  train_list.write_text(train_list.read_text() + "00000004_001.png\n")
  test_list.write_text(test_list.read_text().replace("00000004_001.png\n", ""))
  with pytest.raises(DataError, match=rf"{V2020}, line 9: patient '4' has images in both splits"):
    _build(manual_dir, "patients")


def test_image_listed_twice(manual_dir):
  path = manual_dir / "test_list.txt"
  path.write_text(path.read_text() + "00000001_000.png\n")
  with pytest.raises(DataError, match=r"test_list\.txt, line 4: image '00000001_000\.png'"):
    _build(manual_dir)


def test_to_chexpert5_numpy_and_tf():
  findings = np.stack([labels.parse_findings(t) for t in ("Effusion|Mass", "Edema", "No Finding")])
  expected = np.array([[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], np.int8)
  np.testing.assert_array_equal(labels.to_chexpert5(findings), expected)
  np.testing.assert_array_equal(labels.to_chexpert5(tf.constant(findings)).numpy(), expected)
  ds = tf.data.Dataset.from_tensor_slices(findings).map(labels.to_chexpert5)
  np.testing.assert_array_equal(np.stack(list(ds.as_numpy_iterator())), expected)
  with pytest.raises(ValueError, match="last axis"):
    labels.to_chexpert5(np.zeros(5))


@pytest.mark.parametrize("legacy_csv", [False, True])
def test_synthetic_download_builds(tmp_path, legacy_csv):
  manual = epath.Path(tmp_path) / "manual"
  counts = synthetic.write_nih(
    manual, num_patients=8, image_size=16, images_per_folder=6, legacy_csv=legacy_csv
  )
  splits = _build(manual, "patients")
  assert sum(len(examples) for examples in splits.values()) == counts.patients
  assert sum(ex["num_images"] for ex in splits.get("test", [])) == counts.test_images
  assert sum(ex["num_images"] for examples in splits.values() for ex in examples) == counts.images
