"""Tests for the `derm` builder: dummy data per config, layout variants, bad input."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from data_builders import synthetic
from data_builders.common import DataError
from data_builders.derm import cases as cases_lib
from data_builders.derm import derm

DUMMY_DATA = epath.Path(__file__).resolve().parents[2] / "data_builders" / "derm" / "dummy_data"
HAM_CSV = "HAM10000_metadata.csv"


class _DermTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = derm.Derm


class GenericImagesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["generic_images"]
  EXAMPLE_DIR = DUMMY_DATA / "generic"
  SPLITS = {"train": 4, "validation": 2, "test": 3}


class GenericCasesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["generic_cases"]
  EXAMPLE_DIR = DUMMY_DATA / "generic"
  SPLITS = {"train": 3, "validation": 1, "test": 1}


class Ham10000ImagesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["ham10000_images"]
  EXAMPLE_DIR = DUMMY_DATA / "ham10000"
  SPLITS = {"train": 8, "validation": 2, "test": 2}


class Ham10000CasesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["ham10000_cases"]
  EXAMPLE_DIR = DUMMY_DATA / "ham10000"
  SPLITS = {"train": 4, "validation": 2, "test": 2}


class PadUfes20ImagesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["pad_ufes20_images"]
  EXAMPLE_DIR = DUMMY_DATA / "pad_ufes20"
  SPLITS = {"train": 5, "validation": 1, "test": 2}


class PadUfes20CasesTest(_DermTest):
  BUILDER_CONFIG_NAMES_TO_TEST = ["pad_ufes20_cases"]
  EXAMPLE_DIR = DUMMY_DATA / "pad_ufes20"
  SPLITS = {"train": 4, "validation": 1, "test": 2}


del _DermTest  # Not a test case of its own.


def _copy(tmp_path, source: str) -> epath.Path:
  """A writable copy of one source's dummy data."""
  path = epath.Path(tmp_path) / source
  shutil.copytree(DUMMY_DATA / source, path)
  return path


def _builder(manual: epath.Path, config: str, **kwargs) -> derm.Derm:
  return derm.Derm(config=config, data_dir=str(manual.parent / "out"), **kwargs)


def _build(manual: epath.Path, config: str, **kwargs) -> dict[str, list[dict]]:
  builder = _builder(manual, config, **kwargs)
  download_config = tfds.download.DownloadConfig(
    manual_dir=manual, compute_stats=tfds.download.ComputeStatsMode.SKIP
  )
  builder.download_and_prepare(download_config=download_config)
  return {
    split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in builder.info.splits
  }


def _edit_lines(path: epath.Path, edit: Callable[[list[str]], list[str]]) -> None:
  path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))


def _replace_line(number: int, old: str, new: str) -> Callable[[list[str]], list[str]]:
  def edit(lines: list[str]) -> list[str]:
    assert old in lines[number - 1], (old, lines[number - 1])
    lines[number - 1] = lines[number - 1].replace(old, new)
    return lines

  return edit


def test_generic_class_names_sorted_and_kept_on_reload(tmp_path):
  manual = _copy(tmp_path, "generic")
  splits = _build(manual, "generic_cases")
  names = ["eczema", "melanoma", "psoriasis"]
  assert _builder(manual, "generic_cases").info.features["label"].names == names
  case = {ex["case_id"]: ex for ex in splits["test"]}[b"case_e"]
  assert case["label"] == names.index("eczema") and case["num_images"] == 3
  assert [tf.io.decode_jpeg(data).shape[-1] for data in case["images"]] == [3, 3, 3]
  assert list(case["image_ids"]) == [f"images/case_e_{i}.jpg".encode() for i in (1, 2, 3)]


def test_label_without_train_case_is_named_in_a_warning(tmp_path, caplog):
  manual = _copy(tmp_path, "generic")
  shutil.copy(manual / "images/case_a_1.jpg", manual / "images/case_x_1.jpg")
  with (manual / "cases.csv").open("a") as f:
    f.write("case_x,images/case_x_1.jpg,vitiligo,external,pat_9,50,male,face\n")
  with caplog.at_level(logging.WARNING):
    splits = _build(manual, "generic_cases")
  assert len(splits["external"]) == 1
  assert "label 'vitiligo' has no train case (cases per split: {'external': 1})" in caplog.text
  assert "psoriasis" not in caplog.text  # trained, though also in validation


def test_untrained_labels_counts_cases_per_split():
  def case(label, split):
    return cases_lib.Case(f"{label}_{split}", "p", label, split, ())

  cases = [case("a", "train"), case("a", "test"), case("b", "test"), case("b", "external")]
  cases += [case("c", "external"), case("c", "external")]
  assert cases_lib.untrained_labels(cases) == {
    "b": {"test": 1, "external": 1},
    "c": {"external": 2},
  }


def test_ham10000_lower_case_folders_and_old_header(tmp_path):
  manual = _copy(tmp_path, "ham10000")
  for part in (1, 2):
    (manual / f"HAM10000_images_part_{part}").rename(manual / f"ham10000_images_part_{part}")
  _edit_lines(manual / HAM_CSV, lambda lines: [line.rsplit(",", 1)[0] for line in lines])
  examples = [ex for split in _build(manual, "ham10000_images").values() for ex in split]
  assert len(examples) == 12
  assert {ex["image_id"].split(b"/")[0] for ex in examples} == {
    b"ham10000_images_part_1",
    b"ham10000_images_part_2",
  }
  unknown_age = [ex for ex in examples if ex["age"] == -1]
  assert len(unknown_age) == 1 and unknown_age[0]["sex"] == b"unknown"
  assert all(ex["case_id"] == ex["patient_id"] for ex in examples)


def test_ham10000_copy_in_both_spellings_uses_upper_case(tmp_path):
  manual = _copy(tmp_path, "ham10000")
  shutil.copytree(manual / "HAM10000_images_part_1", manual / "ham10000_images_part_1")
  examples = [ex for split in _build(manual, "ham10000_images").values() for ex in split]
  assert len(examples) == 12
  assert not any(ex["image_id"].startswith(b"ham10000") for ex in examples)


def test_pad_ufes20_patient_level_split_and_nested_images(tmp_path):
  manual = _copy(tmp_path, "pad_ufes20")
  splits = _build(manual, "pad_ufes20_images")
  splits_of_patient: dict[bytes, set[str]] = {}
  cases_of_patient: dict[bytes, set[bytes]] = {}
  for split, examples in splits.items():
    for ex in examples:
      splits_of_patient.setdefault(ex["patient_id"], set()).add(split)
      cases_of_patient.setdefault(ex["patient_id"], set()).add(ex["case_id"])
  assert all(len(found) == 1 for found in splits_of_patient.values())
  assert sorted(len(cases) for cases in cases_of_patient.values()) == [1, 1, 1, 1, 1, 2]
  examples = [ex for split in splits.values() for ex in split]
  assert len(examples) == 8
  folders = {ex["image_id"].rsplit(b"/", 1)[0] for ex in examples}
  assert folders == {b"images", b"images/imgs_part_1", b"images/imgs_part_2", b"images/imgs_part_3"}
  assert {ex["sex"] for ex in examples} == {b"female", b"male", b"unknown"}


# name -> (source, CSV edit, expected message after "CSV_NAME, ").
_BAD_CSV = {
  "generic_escaping_path": (
    "generic",
    _replace_line(3, "images/case_a_2.jpg", "images/../../secret.jpg"),
    r"line 3: image path 'images/../../secret.jpg' escapes the manual dir",
  ),
  "generic_absolute_path": (
    "generic",
    _replace_line(2, "images/case_a_1.jpg", "/etc/passwd"),
    r"line 2: image path '/etc/passwd' is absolute",
  ),
  "generic_renamed_column": (
    "generic",
    _replace_line(1, "label", "diagnosis"),
    r"line 1: missing required column.*'label'",
  ),
  "generic_empty_csv": ("generic", lambda lines: [], r"line 1: empty CSV"),
  "generic_duplicated_path": (
    "generic",
    _replace_line(3, "case_a_2.jpg", "case_a_1.jpg"),
    r"line 3: duplicated image_path 'images/case_a_1.jpg' \(first on line 2\)",
  ),
  "generic_empty_label": ("generic", _replace_line(4, "psoriasis", ""), r"line 4: empty value"),
  "generic_bad_split": (
    "generic",
    _replace_line(5, "train", "dev"),
    r"line 5: invalid value 'dev' in column 'split'",
  ),
  "generic_case_labels_disagree": (
    "generic",
    _replace_line(9, "eczema", "psoriasis"),
    r"line 9: case 'case_e' has images with different labels \(line 8: 'eczema'",
  ),
  "generic_patient_straddles_splits": (
    "generic",
    _replace_line(5, "pat_2", "pat_3"),
    r"line 6: patient 'pat_3' is in split 'validation' here but in 'train' on line 5",
  ),
  "ham_unknown_dx": (
    "ham10000",
    _replace_line(5, ",nv,", ",nevus,"),
    r"line 5: invalid value 'nevus' in column 'dx'",
  ),
  "ham_duplicated_image_id": (
    "ham10000",
    _replace_line(3, "ISIC_0024307", "ISIC_0024306"),
    r"line 3: duplicated image_id 'ISIC_0024306' \(first on line 2\)",
  ),
  "ham_header_only": ("ham10000", lambda lines: lines[:1], r"line 1: .* header but no data"),
  "pad_unknown_diagnostic": (
    "pad_ufes20",
    _replace_line(5, ",ACK,", ",AK,"),
    r"line 5: invalid value 'AK' in column 'diagnostic'",
  ),
  "pad_renamed_column": (
    "pad_ufes20",
    _replace_line(1, "img_id", "image_id"),
    r"line 1: missing required column.*'img_id'",
  ),
}
_CSV_NAME = {"generic": "cases.csv", "ham10000": HAM_CSV, "pad_ufes20": "metadata.csv"}


@pytest.mark.parametrize("name", sorted(_BAD_CSV))
def test_bad_csv_names_file_and_row(tmp_path, name):
  source, edit, match = _BAD_CSV[name]
  manual = _copy(tmp_path, source)
  _edit_lines(manual / _CSV_NAME[source], edit)
  with pytest.raises(DataError, match=rf"{_CSV_NAME[source]}, {match}"):
    _build(manual, f"{source}_cases")


def test_pad_lesion_with_two_patients(tmp_path):
  manual = _copy(tmp_path, "pad_ufes20")
  lines = (manual / "metadata.csv").read_text().splitlines()
  other_patient = lines[4].split(",")[0]
  _edit_lines(manual / "metadata.csv", _replace_line(3, lines[2].split(",")[0], other_patient))
  with pytest.raises(DataError, match=r"metadata\.csv, line 3: case '881' has images with "):
    _build(manual, "pad_ufes20_images")


@pytest.mark.parametrize("config", ["ham10000_images", "ham10000_cases"])
def test_missing_and_undecodable_images(tmp_path, config):
  manual = _copy(tmp_path, "ham10000")
  (manual / "HAM10000_images_part_2/ISIC_0024307.jpg").unlink()
  with pytest.raises(DataError, match=rf"{HAM_CSV}, line 3: image file not found: .*ISIC_0024307"):
    _build(manual, config)
  (manual / "HAM10000_images_part_2/ISIC_0024307.jpg").write_bytes(b"\xff\xd8\xff garbage")
  with pytest.raises(DataError, match=rf"{HAM_CSV}, line 3: .*ISIC_0024307.jpg: cannot decode"):
    _build(manual, config)


def test_skip_unreadable_skips_and_counts(tmp_path):
  manual = _copy(tmp_path, "generic")
  (manual / "images/case_a_2.jpg").write_bytes(b"not an image")
  (manual / "images/more/case_c_1.jpg").unlink()
  images = _build(manual, "generic_images", skip_unreadable=True)
  assert {split: len(examples) for split, examples in images.items()} == {
    "train": 2,
    "validation": 2,
    "test": 3,
  }
  cases = _build(manual, "generic_cases", skip_unreadable=True)
  train = {ex["case_id"]: ex["num_images"] for ex in cases["train"]}
  assert train == {b"case_a": 1, b"case_b": 1}  # case_c lost its only image: dropped.
  np.testing.assert_array_equal([len(cases["validation"]), len(cases["test"])], [1, 1])


@pytest.mark.parametrize("with_dataset_column", [False, True])
def test_synthetic_ham10000_builds(tmp_path, with_dataset_column):
  manual = epath.Path(tmp_path) / "manual"
  counts = synthetic.write_ham10000(
    manual, num_lesions=10, image_size=12, with_dataset_column=with_dataset_column
  )
  splits = _build(manual, "ham10000_cases")
  cases = [ex for examples in splits.values() for ex in examples]
  assert len(cases) == counts.lesions
  assert sum(ex["num_images"] for ex in cases) == counts.images
