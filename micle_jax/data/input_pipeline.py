"""Pretraining input pipeline: TFDS builder → SimCLR/MICLe pairs → augmented, batched views.

- `simclr` on an image-level dataset: two augmentations of one image. On a case-level dataset:
  one image of the case, sampled, then two augmentations of it.
- `micle` on a case-level dataset: two *distinct* images of the case when it has ≥ 2 (each
  augmented), else two augmentations of its one image; `multi_image` marks which.

Determinism and resumption: every random choice is a stateless function of the config seed, the
epoch and an id: an image's augmentation of f(seed, epoch, image id, view), a case's choice of its
two images of f(seed, epoch, case id). So two images of one patient never share an augmentation
(image-level examples are keyed by `image_id`, never by their `case_id`), and an example's views
do not depend on where in the stream it lands. Epoch e reads this process's shard of the split in file order, shuffles it with a seed
derived from (seed, e), and batches with the remainder dropped, so the stream position of global
step s is `divmod(s, steps_per_epoch)`: a resumed run skips the raw records before that position
(without decoding them) and continues with exactly the batches an uninterrupted run would see.

Budgets: an epoch of pretraining is as many pairs as the split has *images*, whatever the unit
of an example (`count_split`): SimCLR on images and MICLe on the cases holding those images run the
same number of steps and see the same number of views. The data stream itself cycles through
this process's examples (cases for MICLe) at their own epoch length.

View filters (`views`, see `micle_jax.data.views`) drop the images a run should not read before
anything else; a case keeps its images that pass, and a case with none is dropped.

Multi-host: each process reads `tfds.even_splits(split, process_count)[process_index]`, equal in
size, so every example is read by exactly one process per epoch; all processes take the same
number of steps, derived from whole-split counts.
"""

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders import build as data_build
from micle_jax import specs
from micle_jax.data import augment_presets, tasks, views

_HASH_BUCKETS = 2**62


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What training needs to know about the prepared dataset before reading it."""

  builder: Any
  split: str
  process_split: str
  num_examples: int
  num_examples_per_process: int
  case_level: bool
  id_feature: str
  num_classes: int
  views: str = "all"


class SplitCounts(NamedTuple):
  """What a run reads of a split, after the view filter."""

  examples: int  # in the whole split (images, or cases for a case-level dataset)
  images: int  # images in those examples
  examples_per_process: int  # in this process's shard


def _register(name: str) -> None:
  """Imports our builder package for `name` so TFDS knows it (no-op for TFDS's own datasets)."""
  package = data_build.BUILDERS.get(name.split("/")[0])
  if package:
    importlib.import_module(package)


def not_prepared_message(name: str, data_dir: str | None) -> str:
  where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return (
    f"dataset {name!r} is not prepared in {where}. Prepare it with\n"
    f"  python -m data_builders.build {name} --manual_dir=DIR --data_dir={data_dir or 'DIR'}\n"
    "(see data_builders/README.md for where each download goes), or run the demo on synthetic "
    "data instead:\n  make demo"
  )


def builder(name: str, data_dir: str | None) -> Any:
  """The prepared TFDS builder of `name` ("builder" or "builder/config") in `data_dir`; raises
  FileNotFoundError, saying how to prepare it, when it is not there."""
  _register(name)
  found = tfds.builder(name, data_dir=data_dir or None)
  if not found.is_prepared():
    raise FileNotFoundError(not_prepared_message(name, data_dir))
  return found


def open_dataset(
  name: str,
  split: str,
  data_dir: str | None,
  label_spec: specs.LabelSpec,
  view_filter: str = "all",
  *,
  views_key: str = "dataset.views",
) -> DatasetInfo:
  """Opens a prepared TFDS dataset and works out its shape (image- or case-level, classes).

  The id that keys augmentation randomness is the image's own (`image_id`, or TFDS's
  `file_name`) for image-level datasets and `case_id` for case-level ones.
  """
  prepared = builder(name, data_dir)
  features = prepared.info.features
  case_level = "images" in features
  candidates = ("case_id",) if case_level else ("image_id", "file_name")
  id_feature = next((k for k in candidates if k in features), None)
  if id_feature is None:
    raise ValueError(f"dataset {name!r} has none of the id features {list(candidates)}")
  views.check(view_filter, views_key)
  if not views.supports(features, view_filter, case_level=case_level):
    raise ValueError(
      f"config.{views_key}={view_filter!r}: dataset {name!r} has no view feature; use 'all'"
    )
  task = tasks.get(label_spec.task)
  task.check(features, name)
  num_classes = len(task.output_names(features, label_spec))
  process_split = process_split_of(split)
  total = prepared.info.splits[split].num_examples
  per_process = prepared.info.splits[process_split].num_examples
  return DatasetInfo(
    prepared,
    split,
    process_split,
    total,
    per_process,
    case_level,
    id_feature,
    num_classes,
    view_filter,
  )


def _scan(info: DatasetInfo, split: str) -> tuple[int, int]:
  """(examples, images) of `split` that pass the view filter, reading metadata only."""
  features = info.builder.info.features
  wanted = [k for k in ("num_images", "view", "views", "ap_pa") if k in features]
  if info.case_level and "num_images" not in wanted:
    wanted.append("images")  # `image_mask` needs the number of images
  ds = info.builder.as_dataset(
    split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding(set(wanted))
  )

  def kept(f):
    mask = views.image_mask(f, info.views, case_level=info.case_level)
    count = tf.reduce_sum(tf.cast(mask, tf.int64))
    return {"examples": tf.cast(count > 0, tf.int64), "images": count}

  ds = ds.map(kept, num_parallel_calls=tf.data.AUTOTUNE)
  totals = ds.reduce(
    {"examples": np.int64(0), "images": np.int64(0)},
    lambda acc, x: {k: acc[k] + x[k] for k in acc},
  )
  return int(totals["examples"]), int(totals["images"])


def count_split(info: DatasetInfo) -> SplitCounts:
  """Examples and images of the whole split, and examples of this process's shard, after the view
  filter. Image-level data without a filter is counted from the builder's metadata; otherwise the
  split's metadata is read (images undecoded), once per process."""
  if not info.case_level and info.views == "all":
    return SplitCounts(info.num_examples, info.num_examples, info.num_examples_per_process)
  examples, images = _scan(info, info.split)
  per_process = examples
  if jax.process_count() > 1:
    per_process, _ = _scan(info, info.process_split)
  return SplitCounts(examples, images, per_process)


def process_split_of(split: str) -> str:
  """This process's equal share of `split` (every example read by exactly one process)."""
  return tfds.even_splits(split, n=jax.process_count(), drop_remainder=True)[jax.process_index()]


def example_seed(seed: int, epoch: int | tf.Tensor, example_id: tf.Tensor) -> tf.Tensor:
  """The stateless [2] seed of one example in one epoch: f(seed, epoch, id)."""
  base = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  key = tf.strings.to_hash_bucket_fast(example_id, _HASH_BUCKETS)
  return tf.random.experimental.stateless_fold_in(base, key, alg="philox")


def sample_pair_indices(
  num_images: tf.Tensor, seed: tf.Tensor, distinct: bool
) -> tuple[tf.Tensor, tf.Tensor]:
  """Two image indices of a case: distinct when `distinct` and the case has ≥ 2 images."""
  num_images = tf.cast(num_images, tf.int64)
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  i = tf.random.stateless_uniform([], s1, 0, num_images, dtype=tf.int64)
  if not distinct:
    return i, i
  # j = i + 1 + U[0, n − 1) mod n is uniform over the other images; n = 1 gives j = i.
  other = tf.random.stateless_uniform([], s2, 0, tf.maximum(num_images - 1, 1), dtype=tf.int64)
  j = tf.where(num_images > 1, (i + 1 + other) % num_images, i)
  return i, j


def view_seed(seed: int, epoch: int | tf.Tensor, image_key: tf.Tensor, view: int) -> tf.Tensor:
  """The stateless [2] seed of view `view` (0 or 1) of one image in one epoch."""
  return tf.random.experimental.stateless_fold_in(
    example_seed(seed, epoch, image_key), tf.constant(view, tf.int64), alg="philox"
  )


def _image_key(features: dict[str, tf.Tensor], index: tf.Tensor) -> tf.Tensor:
  """The id of image `index` of a case: its `image_ids` entry, else "<case_id>#<index>"."""
  if "image_ids" in features:
    return tf.gather(features["image_ids"], index)
  return tf.strings.join([features["case_id"], "#", tf.strings.as_string(index)])


def make_pair_fn(
  *,
  method: str,
  case_level: bool,
  id_feature: str,
  preset: Any,
  image_size: int,
  seed: int,
  label_spec: specs.LabelSpec,
  view_filter: str = "all",
) -> Callable[[dict, tf.Tensor], dict]:
  """The tf.data map (example, epoch) -> {view1, view2, multi_image, labels}; no decode before.

  Each view's augmentation seed is `view_seed(seed, epoch, image id, 0 or 1)`; a case's two
  images are drawn, among those passing `view_filter`, with `example_seed(seed, epoch, case id)`.
  """
  if method not in specs.METHODS:
    raise ValueError(f"method={method!r} not in {specs.METHODS}")
  if method == "micle" and not case_level:
    raise ValueError(
      "method='micle' needs a case-level dataset (e.g. chexpert_micle/patients, "
      "derm/ham10000_cases); this one has one image per example"
    )
  view = functools.partial(augment_presets.pretrain_view, preset=preset, size=image_size)
  labels = tasks.get(label_spec.task).label_fn(label_spec)

  def pair(features, epoch):
    if case_level:
      allowed = tf.where(views.image_mask(features, view_filter, case_level=True))[:, 0]
      pick = example_seed(seed, epoch, features[id_feature])
      i, j = sample_pair_indices(tf.size(allowed), pick, distinct=method == "micle")
      i, j = tf.gather(allowed, i), tf.gather(allowed, j)
      image1 = tf.gather(features["images"], i)
      image2 = tf.gather(features["images"], j)
      key1, key2 = _image_key(features, i), _image_key(features, j)
      out = {"multi_image": tf.cast(tf.not_equal(i, j), tf.float32)}
      out.update(labels(features, i))
    else:
      image1 = image2 = features["image"]
      key1 = key2 = features[id_feature]
      out = {"multi_image": tf.constant(0.0)}
      out.update(labels(features))
    out["view1"] = view(image1, view_seed(seed, epoch, key1, 0))
    out["view2"] = view(image2, view_seed(seed, epoch, key2, 1))
    return out

  return pair


def _shuffle_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return (tf.constant(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)) % (2**31 - 1)


def read_examples(info: DatasetInfo) -> tf.data.Dataset:
  """This process's shard in file order, view-filtered, images left encoded (decoded when sampled)."""
  decoders = None if info.case_level else {"image": tfds.decode.SkipDecoding()}
  ds = info.builder.as_dataset(
    split=info.process_split,
    shuffle_files=False,
    decoders=decoders,
    read_config=tfds.ReadConfig(try_autocache=True),
  )
  if info.views != "all":
    ds = ds.filter(lambda f: views.keep_example(f, info.views, case_level=info.case_level))
  return ds


def epoch_stream(
  examples: tf.data.Dataset,
  *,
  map_fn: Callable,
  local_batch_size: int,
  per_epoch: int,
  seed: int,
  shuffle_buffer: int,
  start_step: int,
) -> tf.data.Dataset:
  """Batches from global step `start_step` on, forever; `map_fn(example, epoch)`.

  Epoch e = `examples` shuffled with a seed f(seed, e), mapped, batched with the remainder
  dropped. One dataset graph serves every epoch (the map is traced once); resuming skips the raw
  records of the steps already taken in the first epoch.
  """
  start_epoch, offset = divmod(start_step, per_epoch)

  def epoch_dataset(epoch):
    skip = tf.where(
      epoch == start_epoch,
      tf.constant(offset * local_batch_size, tf.int64),
      tf.constant(0, tf.int64),
    )
    ds = examples.shuffle(
      shuffle_buffer, seed=_shuffle_seed(seed, epoch), reshuffle_each_iteration=False
    ).skip(skip)
    ds = ds.map(
      lambda features: map_fn(features, epoch),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    return ds.batch(local_batch_size, drop_remainder=True)

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_dataset)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(2)


def steps_per_epoch(num_examples: int, batch_size: int, *, what: str) -> int:
  """`num_examples // batch_size`, or a clear error when the batch is larger than the data."""
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(
      f"batch_size too large: {what} has {num_examples} examples < batch {batch_size}"
    )
  return steps


def pretrain_batches(
  info: DatasetInfo,
  *,
  method: str,
  preset: Any,
  image_size: int,
  local_batch_size: int,
  per_epoch: int,
  seed: int,
  start_step: int,
  shuffle_buffer: int,
  label_spec: specs.LabelSpec,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's local NumPy batches from global step `start_step` on, forever.

  `per_epoch`: local batches in one pass over this process's (view-filtered) examples.
  """
  pair_fn = make_pair_fn(
    method=method,
    case_level=info.case_level,
    id_feature=info.id_feature,
    preset=preset,
    image_size=image_size,
    seed=seed,
    label_spec=label_spec,
    view_filter=info.views,
  )
  ds = epoch_stream(
    read_examples(info),
    map_fn=pair_fn,
    local_batch_size=local_batch_size,
    per_epoch=per_epoch,
    seed=seed,
    shuffle_buffer=shuffle_buffer,
    start_step=start_step,
  )
  return ds.as_numpy_iterator()
