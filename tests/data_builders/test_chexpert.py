"""Tests of the chexpert_micle builder: configs on dummy_data, uncertainty policies, bad input."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.chexpert import chexpert, labels

DUMMY = pathlib.Path(__file__).resolve().parents[2] / "data_builders" / "chexpert" / "dummy_data"
TRAIN_CSV = "CheXpert-v1.0-small/train.csv"


class ImagesTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = chexpert.ChexpertMicle
  BUILDER_CONFIG_NAMES_TO_TEST = ["images"]
  SPLITS = {"train": 11, "validation": 4}


class PatientsTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = chexpert.ChexpertMicle
  BUILDER_CONFIG_NAMES_TO_TEST = ["patients"]
  SPLITS = {"train": 5, "validation": 2}


class StudiesTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = chexpert.ChexpertMicle
  BUILDER_CONFIG_NAMES_TO_TEST = ["studies"]
  SPLITS = {"train": 9, "validation": 2}


def _build(manual_dir, data_dir, config="images", **kwargs) -> tfds.core.DatasetBuilder:
  builder = chexpert.ChexpertMicle(config=config, data_dir=data_dir, **kwargs)
  download_config = tfds.download.DownloadConfig(
    manual_dir=str(manual_dir), compute_stats=tfds.download.ComputeStatsMode.SKIP
  )
  builder.download_and_prepare(download_config=download_config)
  return builder


def test_patient_case_groups_unsorted_rows(tmp_path):
  builder = _build(DUMMY, tmp_path, config="patients")
  cases = {ex["case_id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
  case = cases["patient00003"]
  # The study1 row is the last line of train.csv, after other patients' rows.
  assert case["num_images"] == 3
  assert sorted(i.decode().split("/")[3] for i in case["image_ids"]) == [
    "study1",
    "study2",
    "study2",
  ]
  assert case["observations"].shape == (3, 14)
  assert [tf.io.decode_jpeg(i).shape[-1] for i in case["images"]] == [1, 1, 1]
  assert [v.decode() for v in case["views"]].count("lateral") == 1


def test_image_features_match_csv(tmp_path):
  builder = _build(DUMMY, tmp_path)
  examples = {e["image_id"].decode(): e for e in tfds.as_numpy(builder.as_dataset(split="train"))}
  lateral = examples["CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg"]
  assert (lateral["view"], lateral["ap_pa"], lateral["sex"]) == (b"lateral", b"", b"Female")
  assert lateral["case_id"] == lateral["patient_id"] == b"patient00002"
  assert lateral["study_id"] == b"patient00002/study2"
  assert lateral["age"] == 47 and lateral["image"].shape[-1] == 1
  first = examples["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
  # No Finding blank, EC 1.0, ..., Pleural Other -1.0 (CSV order).
  expected = [-2, 1, 1, 1, -2, 0, 1, -2, 1, -2, 0, -1, -1, 1]
  np.testing.assert_array_equal(first["observations"], expected)


# Observation rows in CSV order; competition5 columns are indices 8, 2, 6, 5, 10.
_ROWS = np.array(
  [
    # Atel=-1, Card=1, Cons=-2 (blank), Edema=-1, Eff=0
    [-2, 1, 1, 1, -2, -1, -2, -2, -1, -2, 0, -2, -2, -2],
    # Atel=0, Card=-1, Cons=1, Edema=-2, Eff=-1
    [0, 0, -1, 1, 0, -2, 1, 0, 0, 0, -1, 0, 0, 0],
  ],
  np.int8,
)


@pytest.mark.parametrize(
  "policy, targets, mask",
  [
    ("ones", [[1, 1, 0, 1, 0], [0, 1, 1, 0, 1]], [[1] * 5, [1] * 5]),
    ("zeros", [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], [[1] * 5, [1] * 5]),
    ("ignore", [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], [[0, 1, 1, 0, 1], [1, 0, 1, 1, 0]]),
    (
      labels.per_condition_policy(
        "zeros", {"Atelectasis": "ones", "Edema": "ones"}, label_set="competition5"
      ),
      [[1, 1, 0, 1, 0], [0, 0, 1, 0, 0]],
      [[1] * 5, [1] * 5],
    ),
  ],
)
def test_policies_numpy_and_tf_agree(policy, targets, mask):
  np_targets, np_mask = labels.targets_and_mask(_ROWS, policy=policy, label_set="competition5")
  np.testing.assert_array_equal(np_targets, targets)
  np.testing.assert_array_equal(np_mask, mask)
  assert np_targets.dtype == np_mask.dtype == np.float32

  ds = tf.data.Dataset.from_tensor_slices(_ROWS).map(
    lambda obs: labels.targets_and_mask(obs, policy=policy, label_set="competition5")
  )
  tf_targets, tf_mask = (np.stack(x) for x in zip(*tfds.as_numpy(ds), strict=True))
  np.testing.assert_array_equal(tf_targets, np_targets)
  np.testing.assert_array_equal(tf_mask, np_mask)


def test_all14_policy_and_errors():
  targets, mask = labels.targets_and_mask(_ROWS[0], policy="ignore", label_set="all14")
  assert targets.shape == mask.shape == (14,)
  np.testing.assert_array_equal(mask, _ROWS[0] != -1)
  with pytest.raises(ValueError, match="'maybe'"):
    labels.targets_and_mask(_ROWS, policy="maybe", label_set="all14")
  with pytest.raises(ValueError, match="Atelactasis"):
    labels.targets_and_mask(_ROWS, policy={"Atelactasis": "ones"}, label_set="competition5")
  with pytest.raises(ValueError, match="Edema"):
    labels.targets_and_mask(
      _ROWS, policy={n: "ones" for n in labels.COMPETITION_TASKS[:3]}, label_set="competition5"
    )
  with pytest.raises(ValueError, match="'top3'"):
    labels.targets_and_mask(_ROWS, policy="ones", label_set="top3")
