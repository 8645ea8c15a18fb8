"""SimCLR/MICLe pair sampling, determinism, resumption and labels of the pretraining pipeline."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.chexpert import labels as chexpert_labels
from micle_jax import specs
from micle_jax.data import input_pipeline as ip

CHEXPERT = specs.LabelSpec(task="chexpert", label_set="competition5", uncertainty_policy="ones")


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


def _info(data_dir, name="chexpert_micle/patients", label_spec=CHEXPERT, views="all"):
  return ip.open_dataset(name, "train", data_dir, label_spec, views)


def _batches(info, *, method="micle", batch=8, start_step=0, seed=0, n=3):
  it = ip.pretrain_batches(
    info,
    method=method,
    preset="cxr",
    image_size=32,
    local_batch_size=batch,
    per_epoch=ip.count_split(info).examples_per_process // batch,
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
  info = _info(cxr_data_dir)
  examples = ip.count_split(info).examples
  # The count is the split's, read from the data (one example per patient here).
  assert examples == info.builder.info.splits["train"].num_examples > 0
  with pytest.raises(ValueError, match=f"batch_size too large: the shard has {examples} examples"):
    ip.steps_per_epoch(examples, examples + 1, what="the shard")
  assert ip.steps_per_epoch(examples, examples, what="the shard") == 1


def _same_patient_pair(info):
  """Two examples of one patient (the synthetic data has patients with several images)."""
  by_patient = {}
  for example in info.builder.as_dataset(split="train", shuffle_files=False):
    by_patient.setdefault(example["patient_id"].numpy(), []).append(example)
    if len(by_patient[example["patient_id"].numpy()]) == 2:
      return by_patient[example["patient_id"].numpy()]
  raise AssertionError("no patient with two images")


def _identical_pixels(a, b):
  """`b` with `a`'s pixels: any difference between their views then comes from the seed alone."""
  return dict(a), dict(b, image=a["image"])


def test_images_of_one_patient_get_their_own_augmentation(cxr_data_dir):
  # Image-level datasets carry `case_id` too; the seed must be keyed by the image, not the case.
  info = _info(cxr_data_dir, name="chexpert_micle/images")
  assert info.id_feature == "image_id"
  fn = ip.make_pair_fn(
    method="simclr",
    case_level=False,
    id_feature=info.id_feature,
    preset="cxr",
    image_size=32,
    seed=0,
    label_spec=CHEXPERT,
  )
  a, b = _identical_pixels(*_same_patient_pair(info))
  assert a["case_id"].numpy() == b["case_id"].numpy()
  epoch = tf.constant(0, tf.int64)
  out_a, out_b, again = fn(a, epoch), fn(b, epoch), fn(a, epoch)
  for view in ("view1", "view2"):
    assert not np.array_equal(out_a[view].numpy(), out_b[view].numpy())
    np.testing.assert_array_equal(out_a[view].numpy(), again[view].numpy())
  other_epoch = fn(a, tf.constant(1, tf.int64))
  assert not np.array_equal(out_a["view1"].numpy(), other_epoch["view1"].numpy())


def test_finetuning_images_of_one_patient_get_their_own_augmentation(cxr_data_dir):
  from micle_jax.data import finetune_input

  info = _info(cxr_data_dir, name="chexpert_micle/images")
  fn = finetune_input.make_train_fn(
    label_fn=lambda f: {},
    preset="cxr",
    image_size=32,
    seed=0,
    id_feature=info.id_feature,
  )
  a, b = _identical_pixels(*_same_patient_pair(info))
  epoch = tf.constant(3, tf.int64)
  image_a, image_b = fn(a, epoch)["image"].numpy(), fn(b, epoch)["image"].numpy()
  assert not np.array_equal(image_a, image_b)
  np.testing.assert_array_equal(image_a, fn(a, epoch)["image"].numpy())


def _csv_views(data_dir):
  """(frontal, lateral, AP, PA) image counts and per-patient frontal counts of train.csv."""
  import csv
  import pathlib

  path = pathlib.Path(data_dir).parent / "manual" / "CheXpert-v1.0-small" / "train.csv"
  rows = list(csv.DictReader(path.open()))
  frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
  per_patient = {}
  for r in rows:
    patient = r["Path"].split("/")[2]
    per_patient[patient] = per_patient.get(patient, 0) + (r["Frontal/Lateral"] == "Frontal")
  counts = {
    "frontal": len(frontal),
    "lateral": len(rows) - len(frontal),
    "ap": sum(r["AP/PA"] == "AP" for r in frontal),
    "pa": sum(r["AP/PA"] == "PA" for r in frontal),
  }
  return counts, per_patient


def test_view_filter_counts_match_the_csv(cxr_data_dir):
  expected, per_patient = _csv_views(cxr_data_dir)
  assert expected["lateral"] > 0 and expected["ap"] > 0 and expected["pa"] > 0
  images = {v: _info(cxr_data_dir, "chexpert_micle/images", views=v) for v in ip.views.VIEWS}
  assert ip.count_split(images["all"]).images == expected["frontal"] + expected["lateral"]
  for view in ("frontal", "ap", "pa"):
    counts = ip.count_split(images[view])
    assert counts.examples == counts.images == expected[view], view
    read = list(ip.read_examples(images[view]).as_numpy_iterator())
    assert len(read) == expected[view]
  cases = ip.count_split(_info(cxr_data_dir, views="frontal"))
  assert cases.images == expected["frontal"]
  assert cases.examples == sum(n > 0 for n in per_patient.values())


def test_micle_pairs_only_images_that_pass_the_view_filter(cxr_data_dir):
  _, per_patient = _csv_views(cxr_data_dir)
  info = _info(cxr_data_dir, views="frontal")
  counts = ip.count_split(info)
  (epoch,) = _batches(info, batch=counts.examples, n=1)  # every kept case once
  with_frontal = [n for n in per_patient.values() if n > 0]
  assert epoch["multi_image"].mean() == pytest.approx(np.mean([n >= 2 for n in with_frontal]))


def test_simclr_and_micle_get_the_same_budget(cxr_data_dir):
  from configs import cxr
  from micle_jax import pretrain

  budgets = {}
  for method in ("simclr", "micle"):
    config = cxr.get_config(f"demo,method={method}")
    config.dataset.data_dir = cxr_data_dir
    config.batch_size = 8
    budgets[method] = pretrain.plan_budget(config, local_batch=8)
  simclr, micle = budgets["simclr"], budgets["micle"]
  assert simclr.counts.images == micle.counts.images > micle.counts.examples
  assert simclr.steps_per_epoch == micle.steps_per_epoch == simclr.counts.images // 8
  assert simclr.total_steps == micle.total_steps == config.num_epochs * simclr.steps_per_epoch
  assert micle.data_steps_per_epoch == micle.counts.examples // 8 < micle.steps_per_epoch


def test_a_small_label_fraction_subset_is_cached_without_changing_its_examples(
  cxr_data_dir, monkeypatch
):
  from micle_jax.data import finetune_input

  info = _info(cxr_data_dir, name="chexpert_micle/images")
  patients = {f"patient{i:05d}" for i in (1, 3, 4, 9)}

  def ids(examples):
    return [(e["image_id"], e["image"]) for e in examples.as_numpy_iterator()]

  cached = finetune_input.train_examples(info, patients, num_examples=6)
  monkeypatch.setattr(finetune_input, "MEMORY_CACHE_BYTES", 0)
  plain = finetune_input.train_examples(info, patients, num_examples=6)
  first = ids(cached)
  assert {i.decode().split("/")[2] for i, _ in first} <= patients and len(first) >= 4
  assert first == ids(cached) == ids(plain)  # the second pass (from memory) reads the same
  assert "Cache" in type(cached).__name__ and "Cache" not in type(plain).__name__
