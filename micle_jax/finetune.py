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
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from clu import metric_writers
from etils import epath

from micle_jax import app, specs
from micle_jax.data import finetune_input, fingerprint, input_pipeline, tasks
from micle_jax.eval import evaluation, finetune_eval
from micle_jax.models import native_conv
from micle_jax.runtime import checkpoint, provenance, restore_rules, run_files, sharding
from micle_jax.train import build, loop, steps

RESULTS_FILE = run_files.RESULTS_FILE
TRAIN_PATIENTS_FILE = "train_patients.json"
INIT_FILE = "init.json"


def validate(config: ml_collections.ConfigDict) -> specs.FinetuneSpec:
  """The config's spec, with the checks that need the task registry; fails naming the key."""
  return check(specs.from_config(specs.FinetuneSpec, config))


def check(spec: specs.FinetuneSpec) -> specs.FinetuneSpec:
  """`spec`, after the checks that need the task registry (fails naming the key)."""
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


def model_spec(spec: specs.FinetuneSpec, num_classes: int) -> specs.ModelSpec:
  """The fine-tuning model (linear mode: a frozen backbone behind a stop-gradient)."""
  linear = spec.mode == "linear"
  return dataclasses.replace(
    spec.model,
    num_classes=num_classes,
    stop_gradient_supervised=linear,
    freeze_backbone=linear,
  )


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
    seed=init_seed(spec),
    label_loss=tasks.get(spec.labels.task).loss,
    linear=spec.mode == "linear",
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes and evaluates as `config` says; returns the results written to results.json."""
  spec = specs.from_config(specs.FinetuneSpec, config)
  check(spec)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(spec.batch_size, mesh, key="config.batch_size")
  sharding.check_batch_size(spec.eval_batch_size, mesh, key="config.eval_batch_size")
  data = finetune_input.training_data(spec)
  finetune_input.check_eval_splits(spec)
  fingerprints = fingerprint.finetune_data(spec)
  init_step = checkpoint.init_step_to_restore(
    spec.init_from, spec.init_step, run_files.PRETRAINING_FILE
  )
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
    run_files.check_reusable(
      workdir, config, what="resume", allow_length_change=True, data=fingerprints
    )
  run = build.build(run_plan, mesh)
  rule = restore_rules.finetune_rule(spec.model.proj_layers_kept)
  state, init = loop.resume_or_initialize(
    run.state,
    mngr,
    spec.init_from,
    mesh,
    rule=rule,
    variant=spec.model.variant,
    init_step=init_step,
  )
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
    run_files.write_json(workdir / run_files.DATA_FILE, fingerprints)
    # The exact training patients, for auditing leakage and nesting across label fractions.
    run_files.write_json(workdir / TRAIN_PATIENTS_FILE, sorted(data.subset.patients))
  state = _train(spec, data, run, state, mngr, writer, workdir, mesh, total_steps)
  results = _results(spec, data, state, init, workdir)
  predict_fn = steps.compile_predict_step(mesh, label_loss=run_plan.label_loss)
  results["eval"] = finetune_eval.evaluate_all(spec, state, mesh, workdir, data.names, predict_fn)
  for key, result in results["eval"].items():
    writer.write_scalars(int(state.step), _scalars(key, result))
  writer.flush()
  if jax.process_index() == 0:
    run_files.write_json(workdir / RESULTS_FILE, results)
  return results


def init_seed(spec: specs.FinetuneSpec) -> int:
  """The seed of the random initialisation: `init_seed`, or `seed` when it is -1."""
  return spec.seed if spec.init_seed < 0 else spec.init_seed


def _train(
  spec,
  data: finetune_input.TrainingData,
  run: build.Built,
  state,
  mngr,
  writer,
  workdir,
  mesh,
  total_steps,
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
    label=f"fine-tune {run_files.short(workdir)}",
  )
  mngr.wait_until_finished()
  mngr.close()
  return state


def _results(
  spec, data: finetune_input.TrainingData, state, init: loop.InitInfo, workdir
) -> dict[str, Any]:
  """results.json without the evaluations: what was trained, on what, from what."""
  return {
    "init_from": spec.init_from or "scratch",
    "init_step": spec.init_step,
    "init_seed": init_seed(spec),
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
    "provenance": provenance.environment(native_conv.describe()),
    "eval": {},
  }


def _pretraining_summary(init: loop.InitInfo) -> dict[str, Any] | None:
  """The init's `pretraining.json` (steps, pairs and views seen), when it is a pretraining workdir."""
  if init.source != "init_from":
    return None
  return run_files.read_json_if_exists(epath.Path(init.path) / run_files.PRETRAINING_FILE)


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
  return run_files.read_json_if_exists(workdir / run_files.PRETRAINING_FILE)


def _scalars(prefix: str, result: dict[str, Any]) -> dict[str, float]:
  return {
    f"{prefix}/{k}": v["value"] for k, v in result["metrics"].items() if v["value"] is not None
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
