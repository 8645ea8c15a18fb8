"""Fine-tuning and evaluation input: labelled images, label-fraction subsets, padded eval batches.

`training_data(spec)` is what a fine-tuning run trains on: the label-fraction subset of the
training split and this process's examples of it.

Labels are read by a task's label function (`data.tasks`): `{'label'}` for multi-class tasks,
`{'targets', 'target_mask'}` for multi-label ones.
"""

import collections
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders import splits
from micle_jax import specs
from micle_jax.data import augment_presets, input_pipeline, tasks, views
from micle_jax.runtime import sharding

_SCAN_BATCH = 1024  # examples per batch of the label-fraction metadata scan


def _stratum(features: dict[str, tf.Tensor], label_fn: Callable) -> tf.Tensor:
  """A label to stratify label-fraction subsets by (multi-label: the first positive, or -1)."""
  labels = label_fn(features)
  if "label" in labels:
    return tf.cast(labels["label"], tf.int64)
  positive = labels["targets"] > 0.5
  first = tf.argmax(tf.cast(positive, tf.int64), output_type=tf.int64)
  return tf.where(tf.reduce_any(positive), first, tf.constant(-1, tf.int64))


class FractionSubset(NamedTuple):
  """The training patients of a label fraction, and how many images they have in the split."""

  patients: set[str]
  num_patients: int  # in the whole training split
  num_examples: int  # images of `patients` in the whole split (all processes together)


def label_fraction_ids(
  info: input_pipeline.DatasetInfo, *, label_fn: Callable, fraction: float, seed: int
) -> FractionSubset:
  """The patients of the `fraction` subset of the whole training split (all processes agree).

  Stratified by label, nested across fractions for one seed, and by patient, so no patient is
  split (data_builders.splits). Only images passing the dataset's view filter count. Every process reads the whole split's metadata (images are not
  decoded) in one parallel tf.data pass, so every process gets the same subset and the same
  global image count, from which all derive the same number of steps per epoch.
  """
  ds = info.builder.as_dataset(
    split=info.split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  if info.views != "all":
    ds = ds.filter(lambda f: views.keep_example(f, info.views, case_level=False))
  ds = ds.map(
    lambda f: {"patient_id": f["patient_id"], "stratum": _stratum(f, label_fn)},
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  first_label: dict[str, int] = {}
  num_images: collections.Counter[str] = collections.Counter()
  for batch in tfds.as_numpy(ds.batch(_SCAN_BATCH).prefetch(2)):
    for patient, stratum in zip(batch["patient_id"], batch["stratum"], strict=True):
      patient = patient.decode()
      first_label.setdefault(patient, int(stratum))
      num_images[patient] += 1
  patients = sorted(first_label)
  if fraction >= 1.0:
    subset = set(patients)
  else:
    subset = set(
      splits.label_fraction_subset(
        patients, [first_label[p] for p in patients], fraction, seed=seed
      )
    )
  return FractionSubset(subset, len(patients), sum(num_images[p] for p in subset))


def count_examples(examples: tf.data.Dataset) -> int:
  return int(examples.reduce(np.int64(0), lambda n, _: n + 1))


# A label-fraction subset whose encoded images fit in this many bytes is cached in memory after
# filtering: each epoch of a small subset would otherwise re-read and re-filter the whole split
# (at 5% of the labels, 19 of every 20 records read are thrown away).
MEMORY_CACHE_BYTES = 256 << 20


def train_examples(
  info: input_pipeline.DatasetInfo, allowed_patients: set[str] | None, num_examples: int = -1
) -> tf.data.Dataset:
  """This process's view-filtered shard of the training split, restricted to `allowed_patients`.

  With `num_examples` (the subset's size over the whole split), a subset small enough
  (`MEMORY_CACHE_BYTES`, estimated from the split's size) is cached after filtering; the order of
  its examples, and so every batch, is the same either way.
  """
  examples = input_pipeline.read_examples(info)
  if allowed_patients is not None:
    examples = splits.filter_by_ids(examples, "patient_id", sorted(allowed_patients))
  split = info.builder.info.splits[info.split]
  if num_examples >= 0 and split.num_examples:
    estimate = split.num_bytes * num_examples / split.num_examples / jax.process_count()
    if estimate <= MEMORY_CACHE_BYTES:
      examples = examples.cache()
  return examples


def make_train_fn(
  *, label_fn: Callable, preset: str, image_size: int, seed: int, id_feature: str
) -> Callable[[dict, tf.Tensor], dict]:
  """(example, epoch) -> {'image', labels}: crop + flip (+ light colour for derm).

  The augmentation seed is f(seed, epoch, the image's own id): `id_feature` must identify the
  image (`DatasetInfo.id_feature` of an image-level dataset does), never its case.
  """

  def fn(features, epoch):
    example_seed = input_pipeline.example_seed(seed, epoch, features[id_feature])
    out = label_fn(features)
    out["image"] = augment_presets.finetune_train(
      features["image"], example_seed, size=image_size, preset=preset
    )
    return out

  return fn


def eval_batches(
  info: input_pipeline.DatasetInfo,
  split: str,
  *,
  label_fn: Callable,
  image_size: int,
  preset: str,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  limit: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `split` passing the view filter once (the first `limit` of them, if given),
  in split order, in global batches of `batch_size` rows, preprocessed with `preset`'s evaluation
  view (`augment_presets.eval_preprocess`).

  Every process reads the labels and ids of the whole split (images undecoded) and decodes the
  images of its own rows only: the rows of each global batch that `sharding.make_global_batch`
  places on this process's devices of `mesh` (`sharding.local_rows`). All processes thus yield the
  same number of batches (no example dropped, none read twice) and can pair the gathered
  predictions of a batch with its ids and labels without exchanging strings.

  Yields:
    {"image": this process's rows, float32 [batch_size / processes, size, size, 3]; the labels,
    "image_id", "case_id", "patient_id", "study_id" (the image's own id where a dataset has no
    studies) and "valid" (0 for the padding of the last batch) of all `batch_size` rows}.
  """
  rows = sharding.local_rows(mesh, batch_size)
  if len(rows) * jax.process_count() != batch_size:
    raise ValueError(f"eval batch size {batch_size} does not split evenly over the processes")
  own_rows = np.zeros(batch_size, bool)
  own_rows[rows] = True
  own_rows = tf.constant(own_rows)
  ds = info.builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
    # TFDS caches a small split as it is read; a read cut short by `limit` would warn that it
    # threw a partial cache away (and caching it would serve nothing: the caller keeps the batches).
    read_config=tfds.ReadConfig(try_autocache=limit is None),
  )
  if info.views != "all":
    ds = ds.filter(lambda f: views.keep_example(f, info.views, case_level=False))
  if limit is not None:
    ds = ds.take(limit)

  def fn(position, features):
    out = label_fn(features)
    out["image"] = tf.cond(
      own_rows[position % batch_size],
      lambda: augment_presets.eval_preprocess(features["image"], size=image_size, preset=preset),
      lambda: tf.zeros([image_size, image_size, 3], tf.float32),
    )
    image_id = features[info.id_feature]
    out["image_id"] = image_id
    out["case_id"] = features.get("case_id", image_id)
    out["patient_id"] = features.get("patient_id", image_id)
    out["study_id"] = features.get("study_id", image_id)
    return out

  ds = ds.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for batch in tfds.as_numpy(ds.batch(batch_size).prefetch(2)):
    n = len(batch["image"])
    batch["valid"] = np.ones(batch_size, np.float32)
    batch["valid"][n:] = 0.0
    for key, value in batch.items():
      if len(value) < batch_size:
        pad = np.repeat(value[-1:], batch_size - n, axis=0)
        batch[key] = np.concatenate([value, pad])
    batch["image"] = batch["image"][rows]
    yield batch


class TrainingData(NamedTuple):
  """The label-fraction subset and this process's examples of it."""

  info: input_pipeline.DatasetInfo
  names: tuple[str, ...]
  label_fn: Callable
  subset: FractionSubset
  examples: tf.data.Dataset
  local_examples: int


def training_data(spec: specs.FinetuneSpec) -> TrainingData:
  """The training split's label-fraction subset, checked against the batch size."""
  d, task = spec.dataset, tasks.get(spec.labels.task)
  info = input_pipeline.open_dataset(
    d.name, d.train_split, d.data_dir or None, specs.LabelSpec(), d.views
  )
  task.check(info.builder.info.features, d.name)
  names = task.output_names(info.builder.info.features, spec.labels)
  label_fn = task.label_fn(spec.labels)
  subset = label_fraction_ids(info, label_fn=label_fn, fraction=spec.label_fraction, seed=spec.seed)
  if subset.num_examples < spec.batch_size:
    raise ValueError(
      f"config.batch_size={spec.batch_size}: only {subset.num_examples} training "
      f"images at label_fraction={spec.label_fraction}"
    )
  examples = train_examples(info, subset.patients, subset.num_examples)
  local_examples = count_examples(examples)
  if local_examples < sharding.local_batch_size(spec.batch_size):
    raise ValueError(
      f"process {jax.process_index()}: its shard holds {local_examples} of the "
      f"{subset.num_examples} training images at label_fraction={spec.label_fraction}, "
      f"fewer than its share of config.batch_size={spec.batch_size}; use a smaller batch or "
      "a larger label_fraction"
    )
  return TrainingData(info, tuple(names), label_fn, subset, examples, local_examples)


class EvalTarget(NamedTuple):
  """One evaluation: its results key, dataset and split, labels task and view filter."""

  key: str
  name: str
  split: str
  data_dir: str
  task: str
  views: str

  @property
  def views_key(self) -> str:
    return "dataset.views" if self.key == "in_distribution" else f"shift.{self.key}.views"


def eval_targets(spec: specs.FinetuneSpec) -> list[EvalTarget]:
  """The in-distribution evaluation, then every shift dataset of the config."""
  d = spec.dataset
  targets = [
    EvalTarget("in_distribution", d.name, d.eval_split, d.data_dir, spec.labels.task, d.views)
  ]
  for key, shift in spec.shift.items():
    targets.append(
      EvalTarget(key, shift.name, shift.split, shift.data_dir, shift.task, shift.views)
    )
  return targets


def check_eval_splits(spec: specs.FinetuneSpec) -> None:
  """Fails, naming the config key, if an evaluation's split is not in its prepared dataset (so a
  run stops before training, not after it)."""
  for target in eval_targets(spec):
    found = sorted(input_pipeline.builder(target.name, target.data_dir).info.splits)
    if target.split not in found:
      key = "dataset.eval_split" if target.key == "in_distribution" else f"shift.{target.key}.split"
      raise specs.ConfigError(
        f"config.{key}={target.split!r}: {target.name} has no such split (it has {found}); a "
        "generic case CSV names cases of another clinic with split `external`"
      )
