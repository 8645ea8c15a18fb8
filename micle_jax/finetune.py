r"""Fine-tuning and evaluation: `python -m micle_jax.finetune --config=configs/finetune_cxr.py
--workdir=DIR`.

Restores a pretrained backbone (and the first `model.proj_layers_kept` projection-head layers,
SimCLR's `ft_proj_selector`) from `init_from` (a pretraining workdir, an Orbax checkpoint such as
converted SimCLRv2 weights, or "scratch"); the supervised head always starts fresh (zeros by
default), since a pretraining checkpoint's monitor head was fitted on every training label.
Trains on `label_fraction` of the training patients (full fine-tuning, or a linear head on a
frozen backbone with `mode="linear"`), then evaluates on the in-distribution split and on every
shift dataset of the config, zero-shot, reading only the images that pass each one's view filter.

Outputs in the workdir: `results.json` (metrics with bootstrap 95% CIs resampling cases or
patients, the steps and images seen, what was restored and left fresh, and the init's
pretraining budget), `predictions/<eval>.npz` (per-image predictions, which the sweep pairs
across inits), `train_patients.json`, `init.json`, `config.json` and TensorBoard events.
"""

import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from clu import metric_writers
from etils import epath
from ml_collections import config_flags

from micle_jax.data import augment_presets, finetune_input, input_pipeline, views
from micle_jax.eval import eval_metrics, evaluation
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, distributed, run_files, sharding
from micle_jax.train import loop, optim, steps, train_state

MODES = ("full", "linear")
RESULTS_FILE = "results.json"
TRAIN_PATIENTS_FILE = "train_patients.json"


def _eval_targets(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """(results key, {name, split, data_dir, task, views}) of every evaluation of `config`."""
  d = config.dataset
  targets = [
    (
      "in_distribution",
      dict(name=d.name, split=d.eval_split, data_dir=d.data_dir, task=config.task, views=d.views),
    )
  ]
  return targets + [(key, shift.to_dict()) for key, shift in config.shift.items()]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any work, naming the key."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} not in {MODES}")
  if not 0.0 < config.label_fraction <= 1.0:
    raise ValueError(f"config.label_fraction={config.label_fraction} must be in (0, 1]")
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be > 0")
  for key, target in _eval_targets(config):
    where = "task" if key == "in_distribution" else f"shift.{key}.task"
    if target["task"] not in finetune_input.TASKS:
      raise ValueError(f"config.{where}={target['task']!r} not in {finetune_input.TASKS}")
    views_key = "dataset.views" if key == "in_distribution" else f"shift.{key}.views"
    views.check(target["views"], views_key)
  evaluation.check_aggregation(steps.task_for_labels(config.task), config.eval_aggregation)
  augment_presets.eval_crop_fraction(config.augment.preset)
  loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  resnet.create_model(loop.config_spec(resnet.ModelSpec, config.model, "model"))


def _optimizer(config, schedule) -> optax.GradientTransformation:
  """The config's optimizer (the head as in SimCLR: no trust ratio); linear mode moves only it."""
  spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  tx = optim.create_optimizer(spec, learning_rate=schedule, trust_scale_head=False)
  if config.mode == "full":
    return tx
  return optax.multi_transform(
    {"train": tx, "freeze": optax.set_to_zero()},
    lambda params: {k: "train" if k == optim.SUPERVISED_HEAD else "freeze" for k in params},
  )


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> resnet.ContrastiveModel:
  """The fine-tuning model of `config` (linear mode: frozen backbone behind a stop-gradient)."""
  spec = loop.config_spec(
    resnet.ModelSpec,
    config.model,
    "model",
    num_classes=num_classes,
    stop_gradient_supervised=config.mode == "linear",
    freeze_backbone=config.mode == "linear",
  )
  return resnet.create_model(spec)


def initial_state(config, model, tx, mngr, mesh) -> tuple[Any, loop.InitInfo]:
  """The starting state: resumed, or the backbone (+ kept projection layers) of `init_from` and a
  fresh supervised head (`checkpoint.finetune_rule`), or scratch."""
  size = config.augment.image_size
  state = train_state.create_train_state(
    model, tx, seed=config.seed, image_shape=(size, size, 3), mesh=mesh
  )
  kept = max(config.model.proj_layers_kept, 0)
  rule = checkpoint.finetune_rule(kept)
  return loop.resume_or_initialize(state, mngr, config.init_from, mesh, rule=rule)


def _pretraining_summary(init: loop.InitInfo) -> dict[str, Any] | None:
  """The init's `pretraining.json` (steps, pairs and views seen), when it is a pretraining workdir."""
  if init.source != "init_from":
    return None
  path = epath.Path(init.path) / run_files.PRETRAINING_FILE
  return run_files.read_json(path) if path.exists() else None


def _training_data(config, info, label_fn):
  """(subset, this process's examples and their count), checked against the batch size."""
  subset = finetune_input.label_fraction_ids(
    info, task=config.task, label_fn=label_fn, fraction=config.label_fraction, seed=config.seed
  )
  if subset.num_examples < config.batch_size:
    raise ValueError(
      f"config.batch_size={config.batch_size}: only {subset.num_examples} training "
      f"images at label_fraction={config.label_fraction}"
    )
  examples = finetune_input.train_examples(info, subset.patients, subset.num_examples)
  local_examples = finetune_input.count_examples(examples)
  if local_examples < sharding.local_batch_size(config.batch_size):
    raise ValueError(
      f"process {jax.process_index()}: its shard holds {local_examples} of the "
      f"{subset.num_examples} training images at label_fraction={config.label_fraction}, "
      f"fewer than its share of config.batch_size={config.batch_size}; use a smaller batch or "
      "a larger label_fraction"
    )
  return subset, examples, local_examples


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes and evaluates as `config` says; returns the results written to results.json."""
  validate_config(config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, key="config.batch_size")
  sharding.check_batch_size(config.eval_batch_size, mesh, key="config.eval_batch_size")
  local_batch = sharding.local_batch_size(config.batch_size)

  d = config.dataset
  info = input_pipeline.open_dataset(
    d.name, d.train_split, d.data_dir or None, input_pipeline.LabelSpec(), d.views
  )
  names = finetune_input.label_names(config.task, info, config.labels.label_set)
  label_fn = finetune_input.make_label_fn(
    config.task, label_set=config.labels.label_set, policy=config.labels.uncertainty_policy
  )
  subset, examples, local_examples = _training_data(config, info, label_fn)
  # Steps per epoch for the schedule and the step count come from the whole subset, so that every
  # process runs the same number of steps; each process's shard holds a different number of the
  # subset's images, so its own stream of batches has its own epoch length.
  per_epoch = subset.num_examples // config.batch_size
  total_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * per_epoch
  logging.info(
    "Fine-tuning on %d images (views: %s) of %d/%d patients (fraction %.2f); %d steps",
    subset.num_examples,
    d.views,
    len(subset.patients),
    subset.num_patients,
    config.label_fraction,
    total_steps,
  )

  model = build_model(config, len(names))
  opt_spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  schedule = optim.create_schedule(
    opt_spec, batch_size=config.batch_size, total_steps=total_steps, steps_per_epoch=per_epoch
  )
  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    run_files.check_reusable(workdir, config, what="resume", allow_length_change=True)
  state, init = initial_state(config, model, _optimizer(config, schedule), mngr, mesh)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
    # The exact training patients, for auditing leakage and nesting across label fractions.
    run_files.write_json(workdir / TRAIN_PATIENTS_FILE, sorted(subset.patients))
  train_fn = finetune_input.make_train_fn(
    label_fn=label_fn,
    preset=config.augment.preset,
    image_size=config.augment.image_size,
    seed=config.seed,
    id_feature=info.id_feature,
  )
  batches = input_pipeline.epoch_stream(
    examples,
    map_fn=train_fn,
    local_batch_size=local_batch,
    per_epoch=local_examples // local_batch,
    seed=config.seed,
    shuffle_buffer=d.shuffle_buffer,
    start_step=int(state.step),
  )
  step_fn = steps.compile_finetune_step(
    mesh, task=steps.task_for_labels(config.task), learning_rate_fn=schedule
  )
  state = loop.run(
    config,
    workdir,
    mngr,
    writer,
    state,
    step_fn,
    batches.as_numpy_iterator(),
    mesh,
    int(state.step),
    total_steps,
  )
  mngr.wait_until_finished()
  mngr.close()

  results = {
    "init_from": config.init_from or "scratch",
    "mode": config.mode,
    "task": config.task,
    "label_fraction": config.label_fraction,
    "seed": config.seed,
    "step": int(state.step),
    "train_images_seen": int(state.step) * config.batch_size,
    "num_train_images": subset.num_examples,
    "num_train_patients": len(subset.patients),
    "views": d.views,
    "eval_aggregation": config.eval_aggregation,
    "labels": list(names),
    "init": _init_summary(config, init, workdir),
    "pretraining": _pretraining_summary(init) or _recorded_pretraining(workdir),
    "eval": {},
  }
  for key, target in _eval_targets(config):
    results["eval"][key] = evaluate(config, state, mesh, workdir, key, target, names)
    writer.write_scalars(int(state.step), _scalars(key, results["eval"][key]))
  writer.flush()
  if jax.process_index() == 0:
    run_files.write_json(workdir / RESULTS_FILE, results)
  return results


INIT_FILE = "init.json"


def _init_summary(config, init: loop.InitInfo, workdir: epath.Path) -> dict[str, Any]:
  """What the run started from. A resumed run reports what its first start restored."""
  path = workdir / INIT_FILE
  if init.source == "resume" and path.exists():
    return run_files.read_json(path)
  summary = init.summary()
  summary["head"] = "zeros" if config.model.zero_init_head else "random"
  if jax.process_index() == 0:
    run_files.write_json(path, summary)
    pretraining = _pretraining_summary(init)
    if pretraining is not None:
      run_files.write_json(workdir / run_files.PRETRAINING_FILE, pretraining)
  return summary


def _recorded_pretraining(workdir: epath.Path) -> dict[str, Any] | None:
  """The init's pretraining summary as recorded when the run first started (for resumed runs)."""
  path = workdir / run_files.PRETRAINING_FILE
  return run_files.read_json(path) if path.exists() else None


def _scalars(prefix: str, result: dict[str, Any]) -> dict[str, float]:
  return {
    f"{prefix}/{k}": v["value"] for k, v in result["metrics"].items() if v["value"] is not None
  }


def predict(config, state, mesh, info, split: str, label_fn, names) -> evaluation.Predictions:
  """Probabilities, labels and ids of every (view-filtered) example of `split`, on every process."""
  task = steps.task_for_labels(config.task)
  predict_fn = steps.compile_predict_step(mesh, task=task)
  parts: dict[str, list[np.ndarray]] = {}
  for batch in finetune_input.eval_batches(
    info,
    split,
    label_fn=label_fn,
    image_size=config.augment.image_size,
    preset=config.augment.preset,
    batch_size=config.eval_batch_size,
    mesh=mesh,
  ):
    images = sharding.make_global_batch(batch.pop("image"), mesh)
    batch["probs"] = sharding.to_host(predict_fn(state, images))
    keep = batch.pop("valid") > 0
    for key, value in batch.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
  out = {k: np.concatenate(v) for k, v in parts.items()}
  for key in ("image_id", "case_id", "patient_id", "study_id"):
    out[key] = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in out[key]])
  return evaluation.Predictions(task=task, names=tuple(names), **out)


def evaluate(config, state, mesh, workdir, key: str, target: dict, names) -> dict[str, Any]:
  """Predicts `target`, saves the predictions, and scores them with bootstrap CIs over units."""
  name, split = target["name"], target["split"]
  info = input_pipeline.open_dataset(
    name,
    split,
    target["data_dir"] or None,
    input_pipeline.LabelSpec(),
    target["views"],
    views_key="dataset.views" if key == "in_distribution" else f"shift.{key}.views",
  )
  eval_names = finetune_input.label_names(target["task"], info, config.labels.label_set)
  if tuple(eval_names) != tuple(names):
    raise ValueError(f"{name}:{split} labels {eval_names} do not match the model's {names}")
  label_fn = finetune_input.make_label_fn(
    target["task"], label_set=config.labels.label_set, policy=config.labels.uncertainty_policy
  )
  preds = predict(config, state, mesh, info, split, label_fn, names)
  if jax.process_index() == 0:
    evaluation.save_predictions(evaluation.predictions_path(workdir, key), preds)
  units, fn = evaluation.metrics_fn(preds, config.eval_aggregation)
  metrics = eval_metrics.metrics_with_ci(
    fn, len(units), num_samples=config.bootstrap_samples, seed=config.seed
  )
  return {
    "dataset": f"{name}:{split}",
    "views": target["views"],
    "num_images": len(preds.image_id),
    "num_cases": len(units),
    "metrics": evaluation.undefined_as_none(metrics),
  }


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not distributed.initialize():
    distributed.split_cpu_into_devices(FLAGS.config.batch_size)
  try:
    results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except checkpoint.UnreadableCheckpointError as e:
    sys.exit(f"error: {e}")  # one line, exit status 1, not a traceback
  for key, result in results["eval"].items():
    summary = ", ".join(
      f"{k}={v['value']} [{v['ci_low']}, {v['ci_high']}]"
      for k, v in result["metrics"].items()
      if "/" not in k
    )
    logging.info("%s (%s): %s", key, result["dataset"], summary)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, events, config and results.json.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
