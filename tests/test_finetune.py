"""Fine-tuning end to end on 8 devices: restore, label fractions, evaluation, shift, results."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from tiny_models import tiny_spec

from configs import finetune_cxr
from micle_jax import (
  checkpoint,
  finetune,
  finetune_input,
  input_pipeline,
  models,
  optim,
  sharding,
  train_state,
)

RESULT_KEYS = {
  "init_from",
  "mode",
  "task",
  "label_fraction",
  "seed",
  "step",
  "num_train_images",
  "num_train_patients",
  "labels",
  "eval",
}


def _config(cxr_dir, nih_dir, **overrides):
  c = finetune_cxr.get_config("demo")
  c.dataset.data_dir = cxr_dir
  c.shift.nih.data_dir = nih_dir
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_steps = 3
  c.bootstrap_samples = 20
  c.model.proj_out_dim = 16
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """Weights of a pretraining-shaped model (3 head layers), saved as an Orbax checkpoint."""
  spec = tiny_spec(num_proj_layers=2, proj_out_dim=16)
  mesh = sharding.create_mesh()
  state = train_state.create_train_state(
    models.create_model(spec), optax.sgd(0.1), seed=7, image_shape=(32, 32, 3), mesh=mesh
  )
  params = jax.device_get(state.params)
  # Make every leaf recognisable (not an initialiser's output).
  params = jax.tree_util.tree_map(lambda x: x + 0.5, params)
  path = tmp_path_factory.mktemp("pretrained")
  checkpoint.save_weights(path, params, jax.device_get(state.batch_stats))
  return path, params


def test_finetune_from_a_checkpoint_writes_results_with_shift(
  pretrained, cxr_data_dir, nih_data_dir, tmp_path, num_devices
):
  path, params = pretrained
  config = _config(
    cxr_data_dir,
    nih_data_dir,
    init_from=str(path),
    **{
      "model.proj_layers_kept": 1,
      "model.supervised_input_layer": 1,
      "optimizer.base_learning_rate": 0.0,
    },
  )
  results = finetune.train_and_evaluate(config, str(tmp_path))
  assert RESULT_KEYS <= set(results)
  assert json.loads((tmp_path / finetune.RESULTS_FILE).read_text()) == results
  assert set(results["eval"]) == {"in_distribution", "nih"}
  for key in ("in_distribution", "nih"):
    metrics = results["eval"][key]["metrics"]
    assert set(metrics) == {"mean_auc"} | {f"auc/{n}" for n in results["labels"]}
    for value in metrics.values():
      assert {"value", "ci_low", "ci_high", "num_units", "num_bootstrap", "dropped"} <= set(value)
  # lr = 0: the restored backbone and first head layer are exactly the checkpoint's.
  restored, _, _ = checkpoint.load_weights(tmp_path)
  for part in ("backbone",):
    for a, b in zip(
      jax.tree_util.tree_leaves(restored[part]),
      jax.tree_util.tree_leaves(params[part]),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    restored["projection_head"]["dense_0"]["kernel"], params["projection_head"]["dense_0"]["kernel"]
  )
  assert "dense_1" not in restored["projection_head"]  # ft_proj_selector = 1 keeps one layer


def test_mismatched_architecture_lists_the_parameters(
  pretrained, cxr_data_dir, nih_data_dir, tmp_path
):
  path, _ = pretrained
  config = _config(cxr_data_dir, nih_data_dir, init_from=str(path), **{"model.depth": 34})
  with pytest.raises(ValueError, match=r"(?s)mismatched parameters.*block_group_0_block_2"):
    finetune.train_and_evaluate(config, str(tmp_path))


def test_label_fractions_are_nested_leak_free_and_counted_on_the_whole_split(
  cxr_data_dir, monkeypatch
):
  config = _config(cxr_data_dir, None)
  info = input_pipeline.open_dataset(
    config.dataset.name, config.dataset.train_split, cxr_data_dir, input_pipeline.LabelSpec()
  )
  label_fn = finetune_input.make_label_fn(
    "chexpert", label_set=config.labels.label_set, policy=config.labels.uncertainty_policy
  )

  def patients_of(split):
    examples = tfds.as_numpy(info.builder.as_dataset(split=split))
    return collections.Counter(example["patient_id"].decode() for example in examples)

  images_per_patient = patients_of(config.dataset.train_split)

  def subset(fraction, process_index=0):
    # Every process reads the whole split, so all agree whatever their index.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    return finetune_input.label_fraction_ids(
      info, task="chexpert", label_fn=label_fn, fraction=fraction, seed=0
    )

  quarter, half = subset(0.25), subset(0.5)
  assert subset(0.5, process_index=1) == half
  assert quarter.patients < half.patients < set(images_per_patient)
  assert 0 < len(quarter.patients) < len(half.patients) < half.num_patients
  assert half.num_patients == len(images_per_patient)
  assert half.num_examples == sum(images_per_patient[p] for p in half.patients)
  assert not half.patients & set(patients_of(config.dataset.eval_split))


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_linear_mode_moves_only_the_supervised_head(optimizer):
  config = finetune_cxr.get_config("demo,linear")
  config.unlock()
  config.optimizer.name = optimizer
  params = {
    "backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4)}},
    optim.SUPERVISED_HEAD: {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)},
  }
  tx = finetune._optimizer(config, schedule=0.1)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates["backbone"]))
  assert all(np.all(u < 0) for u in jax.tree_util.tree_leaves(updates[optim.SUPERVISED_HEAD]))
