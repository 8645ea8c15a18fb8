"""The task registry: what a config's `labels.task` reads from a dataset, and how it is trained.

One entry per task, used by pretraining (the supervised monitor), fine-tuning, evaluation, the
probe, prediction and the benchmark:

| task         | label feature  | targets                                   | loss         |
|--------------|----------------|-------------------------------------------|--------------|
| `none`       | –              | –                                         | `none`       |
| `multiclass` | `label`        | the integer class (dermatology, ImageNet) | `multiclass` |
| `chexpert`   | `observations` | the label set under the uncertainty policy | `multilabel` |
| `nih`        | `chexpert5`    | NIH findings mapped to CheXpert-5          | `multilabel` |

The dataset-specific definitions (CheXpert's observation codes and policies, NIH's mapping to
CheXpert-5) come from the builders that write those features (`data_builders.chexpert.labels`,
`data_builders.nih_cxr14.labels`); this is the one module that binds them to task names, so the
input pipelines import no dataset's module. The loss kind is what `train.steps` computes.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from data_builders.chexpert import labels as chexpert_labels
from data_builders.nih_cxr14 import labels as nih_labels
from micle_jax import specs

# features -> {"label"} or {"targets", "target_mask"}; `index` picks one image of a case.
LabelFn = Callable[[Mapping[str, tf.Tensor], tf.Tensor | None], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its label feature, how labels become targets, its output names and its loss."""

  name: str
  feature: str | None  # the example feature holding the labels (None: no labels)
  loss: str
  _make_label_fn: Callable[[specs.LabelSpec], Callable[[tf.Tensor], dict[str, tf.Tensor]]]
  _names: Callable[[Any, specs.LabelSpec], tuple[str, ...]]

  def __post_init__(self):
    assert self.loss in specs.LABEL_LOSSES, self.loss

  def check(self, features: Mapping[str, Any], dataset: str) -> None:
    """Raises naming the task and the dataset when the dataset lacks the label feature."""
    if self.feature is not None and self.feature not in features:
      raise ValueError(
        f"task={self.name!r} needs the feature `{self.feature}`; {dataset!r} has {sorted(features)}"
      )

  def output_names(self, features: Mapping[str, Any], spec: specs.LabelSpec) -> tuple[str, ...]:
    """The classifier's outputs for a dataset with TFDS `features` (empty for `none`)."""
    return self._names(features, spec)

  def label_fn(self, spec: specs.LabelSpec) -> LabelFn:
    """The tf.data function of an example's labels; `index` selects an image of a case."""
    if self.feature is None:
      return lambda features, index=None: {}
    to_targets = self._make_label_fn(spec)

    def label_fn(features, index=None):
      value = features[self.feature]
      if index is not None and value.shape.rank > (0 if self.loss == "multiclass" else 1):
        value = tf.gather(value, index)  # per-image labels of a case
      return to_targets(value)

    return label_fn


def _multiclass(spec):
  del spec
  return lambda label: {"label": tf.cast(label, tf.int32)}


def _chexpert(spec):
  # Fails now, naming the condition, on a policy that does not fit the label set.
  chexpert_labels.targets_and_mask(
    np.zeros(len(chexpert_labels.OBSERVATIONS), np.int8),
    policy=spec.uncertainty_policy,
    label_set=spec.label_set,
  )

  def to_targets(observations):
    targets, mask = chexpert_labels.targets_and_mask(
      observations, policy=spec.uncertainty_policy, label_set=spec.label_set
    )
    return {"targets": targets, "target_mask": mask}

  return to_targets


def _nih(spec):
  del spec

  def to_targets(chexpert5):
    targets = tf.cast(chexpert5, tf.float32)
    return {"targets": targets, "target_mask": tf.ones_like(targets)}

  return to_targets


REGISTRY: dict[str, Task] = {
  "none": Task("none", None, "none", lambda spec: None, lambda features, spec: ()),
  "multiclass": Task(
    "multiclass",
    "label",
    "multiclass",
    _multiclass,
    lambda features, spec: tuple(features["label"].names),
  ),
  "chexpert": Task(
    "chexpert",
    "observations",
    "multilabel",
    _chexpert,
    lambda features, spec: tuple(chexpert_labels.label_names(spec.label_set)),
  ),
  "nih": Task(
    "nih", "chexpert5", "multilabel", _nih, lambda features, spec: tuple(nih_labels.CHEXPERT5)
  ),
}
assert tuple(REGISTRY) == specs.TASKS, "the schema's task names are the registry's"
assert set(specs.LABEL_SETS) == set(chexpert_labels.LABEL_SETS)
assert set(specs.UNCERTAINTY_POLICIES) == set(chexpert_labels.POLICIES)


def get(name: str, key: str = "labels.task") -> Task:
  """The task called `name`; `key` is the config key named when there is none."""
  if name not in REGISTRY:
    raise ValueError(f"config.{key}={name!r} not in {list(REGISTRY)}")
  return REGISTRY[name]
