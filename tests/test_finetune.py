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

from configs import finetune_cxr, finetune_derm
from micle_jax import finetune, specs
from micle_jax.data import finetune_input, input_pipeline, tasks
from micle_jax.eval import evaluation
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, restore_rules, sharding
from micle_jax.train import build, loop, optim, train_state

RESULT_KEYS = {
  "init_from",
  "mode",
  "task",
  "label_fraction",
  "seed",
  "step",
  "train_images_seen",
  "num_train_images",
  "num_train_patients",
  "views",
  "eval_aggregation",
  "labels",
  "init",
  "pretraining",
  "eval",
  "init_seed",
  "init_step",
  "provenance",
}
HEAD_VALUE = 123.0  # what the pretraining checkpoint's supervised monitor holds


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


def _plan(config) -> build.Plan:
  """The build plan of a fine-tuning config (5 labels, a short schedule)."""
  return finetune.plan(finetune.validate(config), num_classes=5, total_steps=10, steps_per_epoch=5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """Weights of a pretraining-shaped model (2 projection layers, and a 5-way supervised monitor
  of the fine-tuning head's very shape, as CXR pretraining trains), saved with Orbax."""
  spec = tiny_spec(num_proj_layers=2, proj_out_dim=16, num_classes=5)
  mesh = sharding.create_mesh()
  state = train_state.create_train_state(
    resnet.create_model(spec), optax.sgd(0.1), seed=7, image_shape=(32, 32, 3), mesh=mesh
  )
  params = jax.device_get(state.params)
  # Make every leaf recognisable (not an initialiser's output); the monitor holds HEAD_VALUE.
  params = jax.tree_util.tree_map(lambda x: x + 0.5, params)
  params["head_supervised"] = jax.tree_util.tree_map(
    lambda x: np.full_like(x, HEAD_VALUE), params["head_supervised"]
  )
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
  assert results["step"] == 3 and results["train_images_seen"] == 3 * 8
  init = results["init"]
  assert init["source"] == "init_from" and init["step"] == 0 and init["head"] == "zeros"
  assert "head_supervised/kernel" in init["fresh"] and "head_supervised/kernel" in init["unused"]
  assert not any(p.startswith("head_supervised") for p in init["restored"])
  assert "projection_head/dense_1/kernel" in init["unused"]
  for key in ("in_distribution", "nih"):
    metrics = results["eval"][key]["metrics"]
    assert set(metrics) == {"mean_auc"} | {f"auc/{n}" for n in results["labels"]}
    for value in metrics.values():
      assert {"value", "ci_low", "ci_high", "num_units", "num_bootstrap", "dropped"} <= set(value)
    assert results["eval"][key]["views"] == "frontal"
    preds = evaluation.load_predictions(evaluation.predictions_path(tmp_path, key))
    assert len(preds.image_id) == results["eval"][key]["num_images"]
    # The saved predictions reproduce the reported metric.
    units, fn = evaluation.metrics_fn(preds, results["eval_aggregation"])
    assert fn(np.ones((1, len(units))))["mean_auc"][0] == pytest.approx(
      metrics["mean_auc"]["value"]
    )
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
  # The supervised head started fresh (zeros) and, at lr = 0, stayed there.
  assert not np.any(restored["head_supervised"]["kernel"])


def test_dermatology_scores_cases_in_distribution_and_at_the_external_clinic(
  teledermatology_data_dir, tmp_path
):
  """The paper's dermatology metrics: top-1 and top-3 accuracy of the mean prediction over each
  case's photos, on the test cases and, zero-shot, on the external clinic's."""
  c = finetune_derm.get_config("demo,source=generic,external")
  c.dataset.data_dir = c.shift.external.data_dir = teledermatology_data_dir
  c.update(batch_size=8, eval_batch_size=16, num_steps=2, bootstrap_samples=20)
  c.model.proj_out_dim = 16
  wrong = c.copy_and_resolve_references()
  wrong.shift.external.split = "valid"
  with pytest.raises(specs.ConfigError, match=r"shift.external.split='valid'.*'external'"):
    finetune.train_and_evaluate(wrong, str(tmp_path / "refused"))  # before any training
  assert not (tmp_path / "refused" / "checkpoints").exists()
  results = finetune.train_and_evaluate(c, str(tmp_path))
  assert set(results["eval"]) == {"in_distribution", "external"}
  assert results["eval_aggregation"] == "case"
  builder = tfds.builder("derm/generic_images", data_dir=teledermatology_data_dir)
  for key, split in (("in_distribution", "test"), ("external", "external")):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    label_of = {ex["case_id"].decode(): ex["label"] for ex in examples}
    preds = evaluation.load_predictions(evaluation.predictions_path(tmp_path, key))
    assert len(preds.image_id) == len(examples)
    metrics = results["eval"][key]["metrics"]
    assert set(metrics) == {"top1", "top3"}
    # By hand: average each case's photo probabilities, then rank the classes.
    by_case = collections.defaultdict(list)
    case_of = {ex["image_id"].decode(): ex["case_id"].decode() for ex in examples}
    for image_id, probs in zip(preds.image_id, preds.probs, strict=True):
      by_case[case_of[str(image_id)]].append(np.asarray(probs, np.float64))
    ranks = {case: np.argsort(-np.mean(p, axis=0), kind="stable") for case, p in by_case.items()}
    assert len(by_case) == len(label_of)  # every case scored
    # The bootstrap draws patients: a patient's two cases are drawn or left out together.
    assert metrics["top1"]["num_units"] == len({ex["patient_id"] for ex in examples})
    for k in (1, 3):
      hits = np.mean([label_of[case] in rank[:k] for case, rank in ranks.items()])
      assert metrics[f"top{k}"]["value"] == pytest.approx(hits)


@pytest.mark.parametrize("mode,fraction", [("full", 0.25), ("full", 1.0), ("linear", 0.25)])
def test_a_pretraining_monitor_head_never_reaches_finetuning(
  pretrained, cxr_data_dir, nih_data_dir, tmp_path, mode, fraction
):
  path, params = pretrained
  config = _config(
    cxr_data_dir, nih_data_dir, init_from=str(path), mode=mode, label_fraction=fraction
  )
  spec = finetune.validate(config)
  plan = _plan(config)
  mesh = sharding.create_mesh()
  rule = restore_rules.finetune_rule(max(spec.model.proj_layers_kept, 0))
  state, init = loop.resume_or_initialize(
    build.build(plan, mesh).state,
    checkpoint.manager(tmp_path),
    spec.init_from,
    mesh,
    rule=rule,
    variant=spec.model.variant,
  )
  state = jax.device_get(state)
  np.testing.assert_array_equal(state.params["head_supervised"]["kernel"], 0.0)
  np.testing.assert_array_equal(state.params["head_supervised"]["bias"], 0.0)
  for a, b in zip(
    jax.tree_util.tree_leaves(state.params["backbone"]),
    jax.tree_util.tree_leaves(params["backbone"]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert init.report.restored and all(p.startswith("backbone/") for p in init.report.restored)


def test_finetuning_lars_gives_the_head_plain_momentum_steps():
  config = finetune_cxr.get_config("demo")
  config.unlock()
  config.optimizer.update(name="lars", weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
  rng = np.random.default_rng(0)
  params = {
    "backbone": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}},
    optim.SUPERVISED_HEAD: {
      "kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
      "bias": jnp.zeros(5),
    },
  }
  grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)] * 2
  tx = build.optimizer(_plan(config), optax.constant_schedule(0.1))
  opt_state, p = tx.init(params), params
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, p)
    p = optax.apply_updates(p, updates)
  # Float64 reference: momentum on lr·g for the head (no trust ratio); trust-scaled backbone.
  g_head = np.asarray(grads[0][optim.SUPERVISED_HEAD]["kernel"], np.float64)
  expected_head = np.asarray(params[optim.SUPERVISED_HEAD]["kernel"], np.float64)
  expected_head = expected_head - 0.1 * g_head - (0.9 * 0.1 * g_head + 0.1 * g_head)
  np.testing.assert_allclose(p[optim.SUPERVISED_HEAD]["kernel"], expected_head, rtol=1e-5)
  w = np.asarray(params["backbone"]["conv"]["kernel"], np.float64)
  g = np.asarray(grads[0]["backbone"]["conv"]["kernel"], np.float64)
  step1 = 0.1 * 0.001 * np.linalg.norm(w) / np.linalg.norm(g) * g
  w1 = w - step1
  step2 = 0.9 * step1 + 0.1 * 0.001 * np.linalg.norm(w1) / np.linalg.norm(g) * g
  np.testing.assert_allclose(p["backbone"]["conv"]["kernel"], w1 - step2, rtol=1e-5)


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
  config = _config(cxr_data_dir, "")
  info = input_pipeline.open_dataset(
    config.dataset.name, config.dataset.train_split, cxr_data_dir, specs.LabelSpec()
  )
  label_fn = tasks.get("chexpert").label_fn(specs.from_config(specs.FinetuneSpec, config).labels)

  def patients_of(split):
    examples = tfds.as_numpy(info.builder.as_dataset(split=split))
    return collections.Counter(example["patient_id"].decode() for example in examples)

  images_per_patient = patients_of(config.dataset.train_split)

  def subset(fraction, process_index=0):
    # Every process reads the whole split, so all agree whatever their index.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    return finetune_input.label_fraction_ids(info, label_fn=label_fn, fraction=fraction, seed=0)

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
  tx = build.optimizer(_plan(config), optax.constant_schedule(0.1))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates["backbone"]))
  assert all(np.all(u < 0) for u in jax.tree_util.tree_leaves(updates[optim.SUPERVISED_HEAD]))


def _init_step(config):
  spec = finetune.validate(config)
  return checkpoint.init_step_to_restore(spec.init_from, spec.init_step, "pretraining.json")


def test_an_unfinished_pretraining_is_refused_unless_a_step_is_named(tmp_path):
  from micle_jax.runtime import run_files

  checkpoint.save_weights(tmp_path, {"w": np.zeros(2)}, {}, step=2)
  run_files.write_json(tmp_path / run_files.PRETRAINING_FILE, {"total_steps": 6, "step": 2})
  config = finetune_cxr.get_config("demo")
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="reached step 2 of the 6 it planned.*init_step=N"):
    _init_step(config)
  config.init_step = 2  # named: taken as it is, and recorded (results.json's init_step)
  assert _init_step(config) == 2
  config.init_step = -1
  run_files.write_json(tmp_path / run_files.PRETRAINING_FILE, {"total_steps": 2, "step": 2})
  assert _init_step(config) is None  # finished: its latest step
  config.init_step = 5
  with pytest.raises(FileNotFoundError, match="no checkpoint step 5"):
    checkpoint.load_weights(tmp_path, _init_step(config))


def test_every_projection_layer_kept_must_be_counted():
  config = finetune_cxr.get_config("demo")
  config.model.proj_layers_kept = -1  # would build the head and restore none of it
  with pytest.raises(specs.ConfigError, match="proj_layers_kept=-1"):
    finetune.validate(config)


def test_scratch_initialisation_follows_init_seed():
  config = finetune_cxr.get_config("demo")
  assert finetune.init_seed(finetune.validate(config)) == config.seed
  config.init_seed = 7
  spec = finetune.validate(config)
  assert finetune.init_seed(spec) == 7
  assert finetune.plan(spec, num_classes=5, total_steps=1, steps_per_epoch=1).seed == 7
