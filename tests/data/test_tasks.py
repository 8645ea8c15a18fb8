"""The task registry: each task's labels, outputs and loss, eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.chexpert import labels as chexpert_labels
from micle_jax import specs
from micle_jax.data import tasks

# CheXpert observation codes of two images (1 positive, 0 negative, -1 uncertain, -2 blank).
OBSERVATIONS = np.array(
  [[1, -2, 1, 0, -2, -1, 0, -2, -1, 0, 1, -2, -2, 1], [-2] * 13 + [1]], np.int8
)


def test_every_task_has_its_loss_and_feature():
  assert {n: (t.feature, t.loss) for n, t in tasks.REGISTRY.items()} == {
    "none": (None, "none"),
    "multiclass": ("label", "multiclass"),
    "chexpert": ("observations", "multilabel"),
    "nih": ("chexpert5", "multilabel"),
  }
  with pytest.raises(ValueError, match=r"config.probe.task='mri' not in \['none', 'multiclass'"):
    tasks.get("mri", "probe.task")


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_chexpert_labels_are_the_builders_definition(policy):
  spec = specs.LabelSpec(task="chexpert", uncertainty_policy=policy)
  label_fn = tasks.get("chexpert").label_fn(spec)
  expected = chexpert_labels.targets_and_mask(
    OBSERVATIONS[0], policy=policy, label_set="competition5"
  )
  eager = label_fn({"observations": tf.constant(OBSERVATIONS[0])})
  np.testing.assert_array_equal(eager["targets"], expected[0])
  np.testing.assert_array_equal(eager["target_mask"], expected[1])
  # A case's per-image observations: `index` picks image 1, in tf.data as eagerly.
  ds = tf.data.Dataset.from_tensors({"observations": OBSERVATIONS}).map(
    lambda f: label_fn(f, tf.constant(1, tf.int64))
  )
  graph = next(iter(tfds.as_numpy(ds)))
  image1 = chexpert_labels.targets_and_mask(
    OBSERVATIONS[1], policy=policy, label_set="competition5"
  )
  np.testing.assert_array_equal(graph["targets"], image1[0])
  np.testing.assert_array_equal(graph["target_mask"], image1[1])


def test_multiclass_nih_and_none_labels():
  spec = specs.LabelSpec()
  multiclass = tasks.get("multiclass").label_fn(spec)
  assert multiclass({"label": tf.constant(3, tf.int64)})["label"].dtype == tf.int32
  per_image = {"label": tf.constant([4, 1, 2], tf.int64)}
  assert int(multiclass(per_image, tf.constant(2))["label"]) == 2
  assert int(multiclass({"label": tf.constant(5, tf.int64)}, tf.constant(0))["label"]) == 5
  nih = tasks.get("nih").label_fn(spec)({"chexpert5": tf.constant([0, 1, 0, 0, 1], tf.int8)})
  np.testing.assert_array_equal(nih["targets"], [0, 1, 0, 0, 1])
  np.testing.assert_array_equal(nih["target_mask"], np.ones(5))
  assert tasks.get("none").label_fn(spec)({"observations": tf.constant(OBSERVATIONS[0])}) == {}


def test_output_names_and_missing_features():
  features = tfds.features.FeaturesDict({"label": tfds.features.ClassLabel(names=["a", "b"])})
  assert tasks.get("multiclass").output_names(features, specs.LabelSpec()) == ("a", "b")
  all14 = specs.LabelSpec(task="chexpert", label_set="all14")
  assert tasks.get("chexpert").output_names(features, all14) == chexpert_labels.OBSERVATIONS
  assert tasks.get("nih").output_names(features, specs.LabelSpec())[-1] == "Pleural Effusion"
  tasks.get("multiclass").check(features, "derm/x")
  with pytest.raises(
    ValueError, match=r"task='chexpert' needs the feature `observations`; 'derm/x'"
  ):
    tasks.get("chexpert").check(features, "derm/x")
