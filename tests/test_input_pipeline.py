"""SimCLR/MICLe pair sampling, determinism, resumption and labels of the pretraining pipeline."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.chexpert import labels as chexpert_labels
from micle_jax import input_pipeline as ip

CHEXPERT = ip.LabelSpec(task="chexpert", label_set="competition5", uncertainty_policy="ones")


@pytest.mark.parametrize("num_images", [2, 3, 6])
def test_micle_indices_are_distinct_and_cover_the_case(num_images):
  pairs = set()
  for k in range(200):
    i, j = ip.sample_pair_indices(tf.constant(num_images), tf.constant([k, 7], tf.int64), True)
    i, j = int(i), int(j)
    assert i != j and 0 <= i < num_images and 0 <= j < num_images
    pairs.add((i, j))
  assert len(pairs) == num_images * (num_images - 1)  # every ordered pair occurs


def test_single_image_case_falls_back_to_one_image():
  for k in range(20):
    i, j = ip.sample_pair_indices(tf.constant(1), tf.constant([k, 1], tf.int64), True)
    assert int(i) == int(j) == 0


def test_simclr_on_cases_uses_one_image():
  for k in range(20):
    i, j = ip.sample_pair_indices(tf.constant(4), tf.constant([k, 2], tf.int64), False)
    assert int(i) == int(j)


def _info(data_dir, name="chexpert_micle/patients", label_spec=CHEXPERT):
  return ip.open_dataset(name, "train", data_dir, label_spec)


def _batches(info, *, method="micle", batch=8, start_step=0, seed=0, n=3):
  it = ip.pretrain_batches(
    info,
    method=method,
    preset="cxr",
    image_size=32,
    local_batch_size=batch,
    seed=seed,
    start_step=start_step,
    shuffle_buffer=100,
    label_spec=CHEXPERT,
  )
  return [next(it) for _ in range(n)]


def test_multi_image_fraction_matches_the_dataset(cxr_data_dir):
  info = _info(cxr_data_dir)
  cases = list(tfds.as_numpy(info.builder.as_dataset(split="train")))
  expected = np.mean([c["num_images"] >= 2 for c in cases])
  assert 0 < expected < 1  # the synthetic data has single- and multi-image patients
  (epoch,) = _batches(info, batch=len(cases), n=1)  # one batch = every case once
  assert epoch["multi_image"].mean() == pytest.approx(expected)
  assert epoch["view1"].shape == (len(cases), 32, 32, 3) and epoch["view1"].dtype == np.float32
  assert 0.0 <= epoch["view1"].min() and epoch["view1"].max() <= 1.0


def test_micle_views_come_from_distinct_images(cxr_data_dir):
  # With augmentation reduced to a centre crop, views of two distinct images differ and views of
  # a single-image case are identical.
  info = _info(cxr_data_dir)
  identity = ip.augment_presets.ViewPreset(
    crop_area_range=(1.0, 1.0),
    crop_aspect_ratio_range=(1.0, 1.0),
    flip=False,
    jitter_strength=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
  )
  fn = ip.make_pair_fn(
    method="micle",
    case_level=True,
    id_feature="case_id",
    preset=identity,
    image_size=32,
    seed=0,
    label_spec=CHEXPERT,
  )
  for case in info.builder.as_dataset(split="train").take(12):
    out = fn(case, tf.constant(0, tf.int64))
    same = np.array_equal(out["view1"].numpy(), out["view2"].numpy())
    assert same == (int(case["num_images"]) == 1)
    assert float(out["multi_image"]) == float(int(case["num_images"]) >= 2)


def test_stream_is_deterministic_and_resumes_at_the_step(cxr_data_dir):
  info = _info(cxr_data_dir)
  first = _batches(info, n=7)  # 24 patients / 8 = 3 steps per epoch: crosses two epochs
  again = _batches(info, n=7)
  resumed = _batches(info, start_step=4, n=3)
  other_seed = _batches(info, seed=1, n=1)
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[4:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["view1"], other_seed[0]["view1"])
  assert not np.array_equal(first[0]["view1"], first[3]["view1"])  # epochs are reshuffled


def test_chexpert_labels_follow_the_policy(cxr_data_dir):
  info = _info(cxr_data_dir, name="chexpert_micle/images")
  fn = ip.make_pair_fn(
    method="simclr",
    case_level=False,
    id_feature="image_id",
    preset="cxr",
    image_size=32,
    seed=0,
    label_spec=CHEXPERT,
  )
  for example in info.builder.as_dataset(split="train").take(5):
    raw = example["observations"].numpy()
    example = dict(example, image=tf.io.encode_jpeg(example["image"]))
    out = fn(example, tf.constant(0, tf.int64))
    targets, mask = chexpert_labels.targets_and_mask(raw, policy="ones", label_set="competition5")
    np.testing.assert_array_equal(out["targets"].numpy(), targets)
    np.testing.assert_array_equal(out["target_mask"].numpy(), mask)
    assert float(out["multi_image"]) == 0.0
    assert not np.array_equal(out["view1"].numpy(), out["view2"].numpy())


def test_micle_on_an_image_level_dataset_fails_clearly():
  with pytest.raises(ValueError, match="needs a case-level dataset"):
    ip.make_pair_fn(
      method="micle",
      case_level=False,
      id_feature="image_id",
      preset="cxr",
      image_size=32,
      seed=0,
      label_spec=CHEXPERT,
    )


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m data_builders.build chexpert_micle"):
    ip.open_dataset("chexpert_micle/patients", "train", str(tmp_path), CHEXPERT)


def test_batch_larger_than_the_shard_fails_clearly(cxr_data_dir):
  with pytest.raises(ValueError, match="batch_size too large"):
    ip.steps_per_epoch(_info(cxr_data_dir), 1000)
