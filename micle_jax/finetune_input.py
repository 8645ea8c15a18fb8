"""Fine-tuning and evaluation input: labelled images, label-fraction subsets, padded eval batches.

Tasks (what the labels are, read from an image-level example):
- "chexpert": raw CheXpert `observations` → multi-label targets and a mask, with the label set
  and uncertainty policy of the config (U-Ignore masks the loss).
- "nih": NIH ChestX-ray14's `chexpert5` (the CheXpert competition conditions, Effusion →
  Pleural Effusion) → multi-label targets, all cells valid. For shift evaluation.
- "multiclass": the integer `label` (dermatology, ImageNet).
"""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders import splits
from data_builders.chexpert import labels as chexpert_labels
from micle_jax import augment_presets, input_pipeline

TASKS = ("chexpert", "nih", "multiclass")
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def label_names(task: str, info: input_pipeline.DatasetInfo, label_set: str) -> tuple[str, ...]:
  """Output names of the classifier for `task` on the dataset of `info`."""
  features = info.builder.info.features
  needed = {"chexpert": "observations", "nih": "chexpert5", "multiclass": "label"}[task]
  if needed not in features:
    raise ValueError(
      f"task={task!r} needs the feature `{needed}`; the dataset has {sorted(features)}"
    )
  if task == "chexpert":
    return tuple(chexpert_labels.label_names(label_set))
  if task == "nih":
    return NIH_LABELS
  return tuple(features["label"].names)


def make_label_fn(task: str, *, label_set: str, policy: Any) -> Callable[[dict], dict]:
  """features -> {'label'} or {'targets', 'target_mask'} (float32)."""
  if task not in TASKS:
    raise ValueError(f"task={task!r} not in {TASKS}")

  def label_fn(features):
    if task == "chexpert":
      targets, mask = chexpert_labels.targets_and_mask(
        features["observations"], policy=policy, label_set=label_set
      )
      return {"targets": targets, "target_mask": mask}
    if task == "nih":
      targets = tf.cast(features["chexpert5"], tf.float32)
      return {"targets": targets, "target_mask": tf.ones_like(targets)}
    return {"label": tf.cast(features["label"], tf.int32)}

  return label_fn


def _stratum(example: dict[str, np.ndarray], task: str, label_fn: Callable) -> Any:
  """A label to stratify label-fraction subsets by (multi-label: the first positive, or none)."""
  if task == "multiclass":
    return int(example["label"])
  targets = label_fn(example)["targets"].numpy()
  positive = np.flatnonzero(targets > 0.5)
  return int(positive[0]) if positive.size else -1


def label_fraction_ids(
  info: input_pipeline.DatasetInfo, *, task: str, label_fn: Callable, fraction: float, seed: int
) -> tuple[set[str], int]:
  """The patients of the `fraction` subset of the whole training split (all processes agree).

  Stratified by label, nested across fractions for one seed, and by patient, so no patient is
  split (data_builders.splits). Returns (patient ids, number of training patients).
  """
  ds = info.builder.as_dataset(
    split=info.split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  first_label: dict[str, Any] = {}
  for example in ds:
    patient = example["patient_id"].numpy().decode()
    if patient not in first_label:
      first_label[patient] = _stratum(example, task, label_fn)
  patients = sorted(first_label)
  if fraction >= 1.0:
    return set(patients), len(patients)
  subset = splits.label_fraction_subset(
    patients, [first_label[p] for p in patients], fraction, seed=seed
  )
  return set(subset), len(patients)


def count_examples(examples: tf.data.Dataset) -> int:
  return int(examples.reduce(np.int64(0), lambda n, _: n + 1))


def train_examples(
  info: input_pipeline.DatasetInfo, allowed_patients: set[str] | None
) -> tf.data.Dataset:
  """This process's shard of the training split, restricted to `allowed_patients`."""
  examples = input_pipeline.read_examples(info)
  if allowed_patients is not None:
    examples = splits.filter_by_ids(examples, "patient_id", sorted(allowed_patients))
  return examples


def make_train_fn(
  *, label_fn: Callable, preset: str, image_size: int, seed: int, id_feature: str
) -> Callable[[dict, tf.Tensor], dict]:
  """(example, epoch) -> {'image', labels}: crop + flip (+ light colour for derm)."""

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
  batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `split` (this process's shard) once, centre-cropped, in padded batches.

  Batches carry `valid` (0 for padding) and the host-side `case_id` / `patient_id` strings.
  """
  process_split = input_pipeline.process_split_of(split)
  ds = info.builder.as_dataset(
    split=process_split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )

  def fn(features):
    out = label_fn(features)
    out["image"] = augment_presets.eval_preprocess(features["image"], size=image_size)
    out["case_id"] = features.get("case_id", features[info.id_feature])
    out["patient_id"] = features.get("patient_id", features[info.id_feature])
    return out

  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
  for batch in tfds.as_numpy(ds.prefetch(2)):
    n = len(batch["image"])
    batch["valid"] = np.ones(batch_size, np.float32)
    batch["valid"][n:] = 0.0
    for key, value in batch.items():
      if len(value) < batch_size:
        pad = np.repeat(value[-1:], batch_size - n, axis=0)
        batch[key] = np.concatenate([value, pad])
    yield batch
