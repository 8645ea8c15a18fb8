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

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from clu import metric_writers
from etils import epath

from micle_jax import app, specs
from micle_jax.data import finetune_input, input_pipeline, tasks
from micle_jax.eval import eval_metrics, evaluation
from micle_jax.runtime import checkpoint, run_files, sharding
from micle_jax.train import build, loop, steps, train_state

RESULTS_FILE = run_files.RESULTS_FILE
TRAIN_PATIENTS_FILE = "train_patients.json"
INIT_FILE = "init.json"


def validate(config: ml_collections.ConfigDict) -> specs.FinetuneSpec:
  """The config's spec, with the checks that need the task registry; fails naming the key."""
  spec = specs.from_config(specs.FinetuneSpec, config)
  loss = tasks.get(spec.labels.task).loss
  try:
    evaluation.check_aggregation(loss, spec.eval_aggregation)
  except ValueError as e:
    raise specs.ConfigError(str(e)) from e
  for key, shift in spec.shift.items():
    if tasks.get(shift.task, f"shift.{key}.task").loss != loss:
      raise specs.ConfigError(
        f"config.shift.{key}.task={shift.task!r} is {tasks.get(shift.task).loss}; the model's "
        f"labels.task={spec.labels.task!r} is {loss}"
      )
  tasks.get(spec.labels.task).label_fn(spec.labels)  # a policy that does not fit fails now
  return spec


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


def model_spec(spec: specs.FinetuneSpec, num_classes: int) -> specs.ModelSpec:
  """The fine-tuning model (linear mode: a frozen backbone behind a stop-gradient)."""
  linear = spec.mode == "linear"
  return dataclasses.replace(
    spec.model,
    num_classes=num_classes,
    stop_gradient_supervised=linear,
    freeze_backbone=linear,
  )


class TrainingData(NamedTuple):
  """The label-fraction subset and this process's examples of it."""

  info: input_pipeline.DatasetInfo
  names: tuple[str, ...]
  label_fn: Any
  subset: finetune_input.FractionSubset
  examples: Any
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
  subset = finetune_input.label_fraction_ids(
    info, label_fn=label_fn, fraction=spec.label_fraction, seed=spec.seed
  )
  if subset.num_examples < spec.batch_size:
    raise ValueError(
      f"config.batch_size={spec.batch_size}: only {subset.num_examples} training "
      f"images at label_fraction={spec.label_fraction}"
    )
  examples = finetune_input.train_examples(info, subset.patients, subset.num_examples)
  local_examples = finetune_input.count_examples(examples)
  if local_examples < sharding.local_batch_size(spec.batch_size):
    raise ValueError(
      f"process {jax.process_index()}: its shard holds {local_examples} of the "
      f"{subset.num_examples} training images at label_fraction={spec.label_fraction}, "
      f"fewer than its share of config.batch_size={spec.batch_size}; use a smaller batch or "
      "a larger label_fraction"
    )
  return TrainingData(info, names, label_fn, subset, examples, local_examples)


def plan(
  spec: specs.FinetuneSpec, *, num_classes: int, total_steps: int, steps_per_epoch: float
) -> build.Plan:
  """What `build` makes of a fine-tuning spec, with a head of `num_classes` outputs."""
  return build.Plan(
    kind="finetune",
    model=model_spec(spec, num_classes),
    optimizer=spec.optimizer,
    batch_size=spec.batch_size,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    image_size=spec.augment.image_size,
    seed=spec.seed,
    label_loss=tasks.get(spec.labels.task).loss,
    linear=spec.mode == "linear",
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes and evaluates as `config` says; returns the results written to results.json."""
  spec = validate(config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(spec.batch_size, mesh, key="config.batch_size")
  sharding.check_batch_size(spec.eval_batch_size, mesh, key="config.eval_batch_size")
  data = training_data(spec)
  # Steps per epoch for the schedule and the step count come from the whole subset, so that every
  # process runs the same number of steps; each process's shard holds a different number of the
  # subset's images, so its own stream of batches has its own epoch length.
  per_epoch = data.subset.num_examples // spec.batch_size
  total_steps = spec.num_steps if spec.num_steps > 0 else spec.num_epochs * per_epoch
  run_plan = plan(
    spec, num_classes=len(data.names), total_steps=total_steps, steps_per_epoch=per_epoch
  )
  logging.info(
    "Fine-tuning on %d images (views: %s) of %d/%d patients (fraction %.2f); %d steps",
    data.subset.num_examples,
    spec.dataset.views,
    len(data.subset.patients),
    data.subset.num_patients,
    spec.label_fraction,
    run_plan.total_steps,
  )
  mngr = checkpoint.manager(workdir, max_to_keep=spec.loop.keep_checkpoints)
  if mngr.latest_step() is not None:
    run_files.check_reusable(workdir, config, what="resume", allow_length_change=True)
  run = build.build(run_plan, mesh)
  rule = checkpoint.finetune_rule(max(spec.model.proj_layers_kept, 0))
  state, init = loop.resume_or_initialize(run.state, mngr, spec.init_from, mesh, rule=rule)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
    # The exact training patients, for auditing leakage and nesting across label fractions.
    run_files.write_json(workdir / TRAIN_PATIENTS_FILE, sorted(data.subset.patients))
  state = _train(spec, data, run, state, mngr, writer, workdir, mesh, total_steps)
  results = _results(spec, data, state, init, workdir)
  for target in eval_targets(spec):
    results["eval"][target.key] = evaluate(spec, state, mesh, workdir, target, data.names)
    writer.write_scalars(int(state.step), _scalars(target.key, results["eval"][target.key]))
  writer.flush()
  if jax.process_index() == 0:
    run_files.write_json(workdir / RESULTS_FILE, results)
  return results


def _train(
  spec, data: TrainingData, run: build.Built, state, mngr, writer, workdir, mesh, total_steps
):
  """Trains from `state` to the plan's last step; returns the final state."""
  local_batch = sharding.local_batch_size(spec.batch_size)
  train_fn = finetune_input.make_train_fn(
    label_fn=data.label_fn,
    preset=spec.augment.preset,
    image_size=spec.augment.image_size,
    seed=spec.seed,
    id_feature=data.info.id_feature,
  )
  batches = input_pipeline.epoch_stream(
    data.examples,
    map_fn=train_fn,
    local_batch_size=local_batch,
    per_epoch=data.local_examples // local_batch,
    seed=spec.seed,
    shuffle_buffer=spec.dataset.shuffle_buffer,
    start_step=int(state.step),
  )
  state = loop.run(
    spec=spec.loop,
    workdir=workdir,
    mngr=mngr,
    writer=writer,
    state=state,
    step_fn=run.step_fn,
    batches=batches.as_numpy_iterator(),
    mesh=mesh,
    total_steps=total_steps,
  )
  mngr.wait_until_finished()
  mngr.close()
  return state


def _results(spec, data: TrainingData, state, init: loop.InitInfo, workdir) -> dict[str, Any]:
  """results.json without the evaluations: what was trained, on what, from what."""
  return {
    "init_from": spec.init_from or "scratch",
    "mode": spec.mode,
    "task": spec.labels.task,
    "label_fraction": spec.label_fraction,
    "seed": spec.seed,
    "step": int(state.step),
    "train_images_seen": int(state.step) * spec.batch_size,
    "num_train_images": data.subset.num_examples,
    "num_train_patients": len(data.subset.patients),
    "views": spec.dataset.views,
    "eval_aggregation": spec.eval_aggregation,
    "labels": list(data.names),
    "init": _init_summary(spec, init, workdir),
    "pretraining": _pretraining_summary(init) or _recorded_pretraining(workdir),
    "eval": {},
  }


def _pretraining_summary(init: loop.InitInfo) -> dict[str, Any] | None:
  """The init's `pretraining.json` (steps, pairs and views seen), when it is a pretraining workdir."""
  if init.source != "init_from":
    return None
  path = epath.Path(init.path) / run_files.PRETRAINING_FILE
  return run_files.read_json(path) if path.exists() else None


def _init_summary(spec, init: loop.InitInfo, workdir: epath.Path) -> dict[str, Any]:
  """What the run started from. A resumed run reports what its first start restored."""
  path = workdir / INIT_FILE
  if init.source == "resume" and path.exists():
    return run_files.read_json(path)
  summary = init.summary()
  summary["head"] = "zeros" if spec.model.zero_init_head else "random"
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


def predict(
  spec: specs.FinetuneSpec,
  state: train_state.TrainState,
  mesh: jax.sharding.Mesh,
  info: input_pipeline.DatasetInfo,
  split: str,
  label_fn: tasks.LabelFn,
  names: tuple[str, ...],
) -> evaluation.Predictions:
  """Probabilities, labels and ids of every (view-filtered) example of `split`, on every process."""
  label_loss = tasks.get(spec.labels.task).loss
  predict_fn = steps.compile_predict_step(mesh, label_loss=label_loss)
  parts: dict[str, list[np.ndarray]] = {}
  for batch in finetune_input.eval_batches(
    info,
    split,
    label_fn=label_fn,
    image_size=spec.augment.image_size,
    preset=spec.augment.preset,
    batch_size=spec.eval_batch_size,
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
  return evaluation.Predictions(task=label_loss, names=tuple(names), **out)


def evaluate(
  spec: specs.FinetuneSpec,
  state: train_state.TrainState,
  mesh: jax.sharding.Mesh,
  workdir: epath.Path,
  target: EvalTarget,
  names: tuple[str, ...],
) -> dict[str, Any]:
  """Predicts `target`, saves the predictions, and scores them with bootstrap CIs over units."""
  info = input_pipeline.open_dataset(
    target.name,
    target.split,
    target.data_dir or None,
    specs.LabelSpec(),
    target.views,
    views_key=target.views_key,
  )
  task = tasks.get(target.task)
  task.check(info.builder.info.features, target.name)
  labels = dataclasses.replace(spec.labels, task=target.task)
  eval_names = task.output_names(info.builder.info.features, labels)
  if tuple(eval_names) != tuple(names):
    raise ValueError(
      f"{target.name}:{target.split} labels {eval_names} do not match the model's {names}"
    )
  preds = predict(spec, state, mesh, info, target.split, task.label_fn(labels), names)
  if jax.process_index() == 0:
    evaluation.save_predictions(evaluation.predictions_path(workdir, target.key), preds)
  units, fn = evaluation.metrics_fn(preds, spec.eval_aggregation)
  metrics = eval_metrics.metrics_with_ci(
    fn, len(units), num_samples=spec.bootstrap_samples, seed=spec.seed
  )
  return {
    "dataset": f"{target.name}:{target.split}",
    "views": target.views,
    "num_images": len(preds.image_id),
    "num_cases": len(units),
    "metrics": evaluation.undefined_as_none(metrics),
  }


FLAGS = flags.FLAGS


def define_flags() -> None:
  app.config_flag("Config file (configs/finetune_*.py[:arg]).")
  flags.DEFINE_string(
    "workdir", None, "Checkpoints, events, config and results.json.", required=True
  )


def main() -> None:
  app.start_devices(FLAGS.config.batch_size)
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  for key, result in results["eval"].items():
    summary = ", ".join(
      f"{k}={v['value']} [{v['ci_low']}, {v['ci_high']}]"
      for k, v in result["metrics"].items()
      if "/" not in k
    )
    logging.info("%s (%s): %s", key, result["dataset"], summary)


if __name__ == "__main__":
  app.run(main, define_flags)
