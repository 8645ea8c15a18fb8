"""The kNN probe: leave-patient-out neighbours equal a brute-force float64 reference; scores."""

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from tiny_models import tiny_spec

from micle_jax import specs
from micle_jax.eval import eval_metrics, probe
from micle_jax.models import resnet
from micle_jax.runtime import sharding
from micle_jax.train import train_state


def _reference(features, groups, targets, k):
  """Row by row: cosine similarities, other patients only, ties by index, NaN targets skipped."""
  x = np.array(features, np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  out = np.full(targets.shape, np.nan)
  for i in range(len(x)):
    others = [j for j in range(len(x)) if groups[j] != groups[i]]
    others.sort(key=lambda j: (-float(x[i] @ x[j]), j))
    chosen = others[:k]
    for c in range(targets.shape[1]):
      known = [targets[j, c] for j in chosen if np.isfinite(targets[j, c])]
      if known:
        out[i, c] = np.mean(known)
  return out


def test_knn_scores_equal_a_brute_force_reference():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(40, 6)).astype(np.float32)
  groups = rng.integers(0, 12, 40)
  targets = rng.integers(0, 2, (40, 3)).astype(np.float64)
  targets[rng.uniform(size=targets.shape) < 0.2] = np.nan
  got = probe.knn_scores(features, groups, targets, k=5)
  np.testing.assert_allclose(got, _reference(features, groups, targets, 5), rtol=1e-12)


def test_attribute_r2_equals_a_brute_force_reference():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(50, 4))
  groups = rng.integers(0, 15, 50)
  kept = 2.0 * features[:, 0] + 0.1 * rng.normal(size=50)  # an attribute the features hold
  kept[[3, 17]] = np.nan  # unknown: neither scored nor a neighbour's value
  known = np.isfinite(kept)
  y = kept[known]
  predicted = _reference(features[known], groups[known], y[:, None], 5)[:, 0]
  expected = 1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2)
  got = probe.attribute_r2(features, groups, kept, k=5)
  assert got == pytest.approx(expected, abs=1e-12)
  assert got > 0.5
  assert probe.attribute_r2(features, groups, rng.normal(size=50), k=5) < 0.2  # one it does not
  assert np.isnan(probe.attribute_r2(features, groups, np.ones(50), k=5))  # no variance


def test_a_patients_own_images_are_never_its_neighbours():
  # Two patients with identical images and opposite labels: the neighbours are the other patient.
  features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  groups = np.array([7, 7, 9, 9])
  targets = np.array([[1.0], [1.0], [0.0], [0.0]])
  np.testing.assert_array_equal(probe.knn_scores(features, groups, targets, k=1), 1 - targets)


def test_scores_multiclass_and_multilabel():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 10)
  features = np.eye(3)[labels] + 0.05 * rng.normal(size=(30, 3))
  batch = {"label": labels, "patient_id": np.arange(30)}
  assert probe.score(features, batch, task="multiclass", names=("a", "b", "c"), k=3) == {
    "top1": 1.0
  }
  # Multi-label: the first label follows the features, the second is noise.
  targets = np.stack([labels == 0, rng.uniform(size=30) < 0.5], 1).astype(np.float32)
  batch = {"targets": targets, "target_mask": np.ones_like(targets), "patient_id": np.arange(30)}
  scores = probe.score(features, batch, task="chexpert", names=("x", "y"), k=3)
  assert scores["auc/x"] == 1.0
  assert scores["mean_auc"] == pytest.approx((1.0 + scores["auc/y"]) / 2)
  reference = eval_metrics.per_label_auc(
    probe.knn_scores(features, batch["patient_id"], targets, 3), targets, targets > -1, ("x", "y")
  )
  assert scores["auc/y"] == pytest.approx(reference["y"])


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("task", "mri", r"probe.task='mri' not in"),
    ("k", 0, r"probe.k=0 must be > 0"),
    ("max_images", -1, r"probe.max_images=-1 must be > 0"),
    ("views", "oblique", r"config.probe.views='oblique' not in"),
  ],
)
def test_bad_probe_config_is_named(key, value, message):
  with pytest.raises(ValueError, match=message):
    specs.ProbeSpec(dataset="x", **{key: value})


def test_the_probe_scores_a_network_trained_on_its_labels_above_its_initialisation(cxr_data_dir):
  mesh = sharding.create_mesh()
  spec = specs.ProbeSpec(
    dataset="chexpert_micle/images", data_dir=cxr_data_dir, max_images=64, k=5, batch_size=16
  )
  labels = specs.LabelSpec(label_set="competition5", uncertainty_policy="ones")
  the_probe = probe.Probe(spec, preset="cxr_small", image_size=32, labels=labels, mesh=mesh)
  assert the_probe.num_images > 30
  state = train_state.create_train_state(
    resnet.create_model(tiny_spec()), optax.sgd(0.0), seed=0, image_shape=(32, 32, 3), mesh=mesh
  )
  before = the_probe(state)["mean_auc"]
  # Where a better probe score is known to hold: train the backbone (and a linear head of our own)
  # on the probe's very labels; its features then separate the labels for the neighbours too.
  images = np.concatenate([b["image"] for b in the_probe.batches])[the_probe.keep]
  targets, mask = the_probe.labels["targets"], the_probe.labels["target_mask"]
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  variables = {"params": params, "batch_stats": batch_stats}
  width = state.apply_fn(variables, images[:1], train=False)["features"].shape[1]
  head = {"w": np.zeros((width, targets.shape[1]), np.float32), "b": np.zeros(5, np.float32)}
  tx = optax.adam(3e-3)
  trainable = (params, head)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, batch_stats):
    def loss_fn(trainable):
      params, head = trainable
      out, updates = state.apply_fn(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      logits = out["features"] @ head["w"] + head["b"]
      loss = optax.sigmoid_binary_cross_entropy(logits, targets) * mask
      return loss.sum() / mask.sum(), updates["batch_stats"]

    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, batch_stats

  for _ in range(40):  # on the fixture's data, 25 steps left it at 0.52 and 40 reach 0.82
    trainable, opt_state, batch_stats = step(trainable, opt_state, batch_stats)
  trained = state.replace(params=trainable[0], batch_stats=batch_stats)
  after = the_probe(trained)["mean_auc"]
  assert after > before + 0.1, (before, after)
  # Scoring reads the state and changes nothing in it: no buffer of it is donated (deleted), and
  # BatchNorm runs in inference mode, so a second score is the same.
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(trained.params))
  assert the_probe(trained)["mean_auc"] == after


def test_a_split_smaller_than_max_images_is_read_whole(cxr_data_dir):
  spec = specs.ProbeSpec(dataset="chexpert_micle/images", data_dir=cxr_data_dir, max_images=10_000)
  labels = specs.LabelSpec(label_set="competition5", uncertainty_policy="ones")
  the_probe = probe.Probe(
    spec, preset="cxr_small", image_size=32, labels=labels, mesh=sharding.create_mesh()
  )
  split = tfds.builder("chexpert_micle/images", data_dir=cxr_data_dir).info.splits["train"]
  assert the_probe.num_images == split.num_examples > 0


def test_the_probe_set_is_the_first_images_that_pass_the_view_filter(cxr_data_dir, monkeypatch):
  """max_images counts images after the view filter, not before it; the read, cut short, does not
  fill TFDS's automatic cache (which warns, on TensorFlow's C++ log, when it throws a partial one
  away)."""
  read_configs = []
  as_dataset = tfds.core.DatasetBuilder.as_dataset

  def spy(self, *args, read_config=None, **kwargs):
    read_configs.append(read_config)
    return as_dataset(self, *args, read_config=read_config, **kwargs)

  builder = tfds.builder("chexpert_micle/images", data_dir=cxr_data_dir)
  first = tfds.as_numpy(builder.as_dataset(split="train[:12]", shuffle_files=False))
  frontal_in_first = sum(f["view"].decode().lower().startswith("frontal") for f in first)
  assert frontal_in_first < 12  # a probe that sliced before filtering would see fewer
  spec = specs.ProbeSpec(
    dataset="chexpert_micle/images", data_dir=cxr_data_dir, max_images=12, views="frontal"
  )
  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", spy)
  labels = specs.LabelSpec(label_set="competition5", uncertainty_policy="ones")
  the_probe = probe.Probe(
    spec, preset="cxr_small", image_size=32, labels=labels, mesh=sharding.create_mesh()
  )
  assert the_probe.num_images == 12
  assert [c is not None and not c.try_autocache for c in read_configs] == [True]
