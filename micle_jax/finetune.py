r"""Fine-tuning and evaluation: `python -m micle_jax.finetune --config=configs/finetune_cxr.py
--workdir=DIR`.

Restores a pretrained backbone (and the first `model.proj_layers_kept` projection-head layers,
SimCLR's `ft_proj_selector`) from `init_from` (a pretraining workdir, an Orbax checkpoint such as
converted SimCLRv2 weights, or "scratch"), trains on `label_fraction` of the training patients
(full fine-tuning, or a linear head on a frozen backbone with `mode="linear"`), then evaluates on
the in-distribution split and on every shift dataset of the config, zero-shot. Metrics with
bootstrap 95% confidence intervals resampling cases go to `results.json` and TensorBoard.
"""

import functools
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from clu import metric_writers
from etils import epath
from ml_collections import config_flags

from micle_jax import (
  checkpoint,
  distributed,
  eval_metrics,
  finetune_input,
  input_pipeline,
  loop,
  models,
  optim,
  sharding,
  steps,
  train_state,
)

MODES = ("full", "linear")
RESULTS_FILE = "results.json"
TRAIN_PATIENTS_FILE = "train_patients.json"


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any work, naming the key."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} not in {MODES}")
  if config.task not in finetune_input.TASKS:
    raise ValueError(f"config.task={config.task!r} not in {finetune_input.TASKS}")
  if not 0.0 < config.label_fraction <= 1.0:
    raise ValueError(f"config.label_fraction={config.label_fraction} must be in (0, 1]")
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be > 0")
  for name, shift in config.shift.items():
    if shift.task not in finetune_input.TASKS:
      raise ValueError(f"config.shift.{name}.task={shift.task!r} not in {finetune_input.TASKS}")
  loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  models.create_model(loop.config_spec(models.ModelSpec, config.model, "model"))


def _optimizer(config, schedule) -> optax.GradientTransformation:
  """The config's optimizer; in linear mode only the supervised head moves."""
  spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  tx = optim.create_optimizer(spec, learning_rate=schedule)
  if config.mode == "full":
    return tx
  return optax.multi_transform(
    {"train": tx, "freeze": optax.set_to_zero()},
    lambda params: {k: "train" if k == optim.SUPERVISED_HEAD else "freeze" for k in params},
  )


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ContrastiveModel:
  """The fine-tuning model of `config` (linear mode: frozen backbone behind a stop-gradient)."""
  spec = loop.config_spec(
    models.ModelSpec,
    config.model,
    "model",
    num_classes=num_classes,
    stop_gradient_supervised=config.mode == "linear",
    freeze_backbone=config.mode == "linear",
  )
  return models.create_model(spec)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes and evaluates as `config` says; returns the results written to results.json."""
  validate_config(config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, key="config.batch_size")
  sharding.check_batch_size(config.eval_batch_size, mesh, key="config.eval_batch_size")
  local_batch = sharding.local_batch_size(config.batch_size)

  info = input_pipeline.open_dataset(
    config.dataset.name,
    config.dataset.train_split,
    config.dataset.data_dir or None,
    input_pipeline.LabelSpec(),
  )
  names = finetune_input.label_names(config.task, info, config.labels.label_set)
  label_fn = finetune_input.make_label_fn(
    config.task, label_set=config.labels.label_set, policy=config.labels.uncertainty_policy
  )
  allowed, num_patients, num_examples = finetune_input.label_fraction_ids(
    info, task=config.task, label_fn=label_fn, fraction=config.label_fraction, seed=config.seed
  )
  if num_examples < config.batch_size:
    raise ValueError(
      f"config.batch_size={config.batch_size}: only {num_examples} training "
      f"images at label_fraction={config.label_fraction}"
    )
  # Steps per epoch for the schedule and the step count come from the whole subset, so that every
  # process runs the same number of steps; each process's shard holds a different number of the
  # subset's images, so its own stream of batches has its own epoch length.
  per_epoch = num_examples // config.batch_size
  examples = finetune_input.train_examples(info, allowed)
  local_examples = finetune_input.count_examples(examples)
  if local_examples < local_batch:
    raise ValueError(
      f"process {jax.process_index()}: its shard holds {local_examples} of the "
      f"{num_examples} training images at label_fraction={config.label_fraction}, fewer than "
      f"its share of config.batch_size={config.batch_size} ({local_batch}); use a smaller "
      "batch or a larger label_fraction"
    )
  total_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * per_epoch
  logging.info(
    "Fine-tuning on %d images of %d/%d patients (fraction %.2f); %d steps",
    num_examples,
    len(allowed),
    num_patients,
    config.label_fraction,
    total_steps,
  )

  model = build_model(config, len(names))
  opt_spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  schedule = optim.create_schedule(
    opt_spec, batch_size=config.batch_size, total_steps=total_steps, steps_per_epoch=per_epoch
  )
  size = config.augment.image_size
  state = train_state.create_train_state(
    model,
    _optimizer(config, schedule),
    seed=config.seed,
    image_shape=(size, size, 3),
    mesh=mesh,
  )
  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  state = loop.resume_or_initialize(
    state,
    mngr,
    config.init_from,
    mesh,
    required_prefixes=("backbone", "projection_head"),
    exact_prefixes=("backbone",),
  )

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    # The exact training patients, for auditing leakage and nesting across label fractions.
    (workdir / TRAIN_PATIENTS_FILE).write_text(json.dumps(sorted(allowed)))
  train_fn = finetune_input.make_train_fn(
    label_fn=label_fn,
    preset=config.augment.preset,
    image_size=size,
    seed=config.seed,
    id_feature=info.id_feature,
  )
  batches = input_pipeline.epoch_stream(
    examples,
    map_fn=train_fn,
    local_batch_size=local_batch,
    per_epoch=local_examples // local_batch,
    seed=config.seed,
    shuffle_buffer=config.dataset.shuffle_buffer,
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
    "num_train_images": num_examples,
    "num_train_patients": len(allowed),
    "labels": list(names),
    "eval": {},
  }
  targets = [
    (
      "in_distribution",
      config.dataset.name,
      config.dataset.eval_split,
      config.dataset.data_dir,
      config.task,
    )
  ]
  targets += [(key, s.name, s.split, s.data_dir, s.task) for key, s in config.shift.items()]
  for key, name, split, data_dir, task in targets:
    results["eval"][key] = evaluate(
      config, state, mesh, name=name, split=split, data_dir=data_dir, task=task, names=names
    )
    writer.write_scalars(int(state.step), _scalars(key, results["eval"][key]))
  writer.flush()
  if jax.process_index() == 0:
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  return results


def _scalars(prefix: str, result: dict[str, Any]) -> dict[str, float]:
  return {
    f"{prefix}/{k}": v["value"] for k, v in result["metrics"].items() if v["value"] is not None
  }


def _undefined_as_none(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """NaN (e.g. the AUC of a label with one class present) -> None: `null` in results.json."""
  return {
    name: {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in m.items()}
    for name, m in metrics.items()
  }


def predict(config, state, mesh, info, split: str, label_fn) -> dict[str, np.ndarray]:
  """Probabilities, labels and ids of every example of `split`, the same on every process."""
  predict_fn = steps.compile_predict_step(mesh, task=steps.task_for_labels(config.task))
  parts: dict[str, list[np.ndarray]] = {}
  for batch in finetune_input.eval_batches(
    info,
    split,
    label_fn=label_fn,
    image_size=config.augment.image_size,
    batch_size=config.eval_batch_size,
    mesh=mesh,
  ):
    images = sharding.make_global_batch(batch.pop("image"), mesh)
    batch["probs"] = sharding.to_host(predict_fn(state, images))
    keep = batch["valid"] > 0
    for key, value in batch.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(
  config, state, mesh, *, name: str, split: str, data_dir: str, task: str, names: tuple[str, ...]
) -> dict[str, Any]:
  """Metrics with bootstrap CIs over cases (derm: case-level; CXR: patients resampled)."""
  info = input_pipeline.open_dataset(name, split, data_dir or None, input_pipeline.LabelSpec())
  eval_names = finetune_input.label_names(task, info, config.labels.label_set)
  if tuple(eval_names) != tuple(names):
    raise ValueError(f"{name}:{split} labels {eval_names} do not match the model's {names}")
  label_fn = finetune_input.make_label_fn(
    task, label_set=config.labels.label_set, policy=config.labels.uncertainty_policy
  )
  out = predict(config, state, mesh, info, split, label_fn)
  cases = [c.decode() if isinstance(c, bytes) else str(c) for c in out["case_id"]]
  boot = functools.partial(
    eval_metrics.metric_with_ci, num_samples=config.bootstrap_samples, seed=config.seed
  )
  if task == "multiclass":
    case_ids, probs, labels = eval_metrics.aggregate_by_case(cases, out["probs"], out["label"])
    metrics = {
      f"top{k}": boot(
        lambda idx, k=k: eval_metrics.top_k_accuracy(probs[idx], labels[idx], k), len(case_ids)
      )
      for k in (1, 3)
      if k <= len(names)
    }
    return {
      "dataset": f"{name}:{split}",
      "num_images": len(cases),
      "num_cases": len(case_ids),
      "metrics": _undefined_as_none(metrics),
    }
  unit_rows = _rows_by_unit(cases)

  def auc_fn(label: str | None):
    def fn(idx):
      rows = np.concatenate([unit_rows[i] for i in idx])
      per_label = eval_metrics.per_label_auc(
        out["probs"][rows], out["targets"][rows], out["target_mask"][rows], names
      )
      return eval_metrics.mean_auc(per_label) if label is None else per_label[label]

    return fn

  metrics = {"mean_auc": boot(auc_fn(None), len(unit_rows))}
  metrics.update({f"auc/{n}": boot(auc_fn(n), len(unit_rows)) for n in names})
  return {
    "dataset": f"{name}:{split}",
    "num_images": len(cases),
    "num_cases": len(unit_rows),
    "metrics": _undefined_as_none(metrics),
  }


def _rows_by_unit(cases: list[str]) -> list[np.ndarray]:
  """Row indices of each case (patient), in first-appearance order: the bootstrap's units."""
  order: dict[str, list[int]] = {}
  for row, case in enumerate(cases):
    order.setdefault(case, []).append(row)
  return [np.asarray(rows) for rows in order.values()]


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not distributed.initialize():
    distributed.split_cpu_into_devices(FLAGS.config.batch_size)
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
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
