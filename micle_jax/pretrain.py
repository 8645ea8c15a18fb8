"""Contrastive pretraining (SimCLR / MICLe): `train_and_evaluate(config, workdir) -> TrainState`.

Resume order: the latest checkpoint in `workdir` (only if its `config.json` matches, see
`micle_jax.workdir`) → `config.init_from` (the backbone, and the projection head unless
`init_projection_head=False`; never the supervised monitor; optimizer fresh) → scratch.

Budget: `num_epochs` counts passes over the split's *images*, so SimCLR (pairs of views of one
image) and MICLe (pairs of images of one case) given the same config run the same number of steps
and see the same number of views. `pretraining.json` in the workdir records the plan and what was
done: steps, pairs and views seen, and what was restored from where. Checkpoints are saved every `checkpoint_every_steps`, at
the end, and on SIGTERM; a run killed at any point and restarted with the same command continues
from its last checkpoint and ends with bit-identical parameters on CPU (the input position is
derived from the step; see `input_pipeline`). A non-finite loss or parameter stops the run,
naming the step, without saving over the last good checkpoint.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview
from etils import epath

from micle_jax.data import augment_presets, input_pipeline, views
from micle_jax.eval import probe
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, run_files, sharding
from micle_jax.train import loop, optim, steps, train_state


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any work, naming the config key, on invalid values."""
  if config.method not in input_pipeline.METHODS:
    raise ValueError(f"config.method={config.method!r} not in {input_pipeline.METHODS}")
  if not config.temperature > 0:
    raise ValueError(f"config.temperature={config.temperature} must be > 0")
  if not config.dataset.name:
    raise ValueError("config.dataset.name is empty")
  for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be > 0")
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("config.num_steps or config.num_epochs must be > 0")
  if config.augment.image_size < 8:
    raise ValueError(f"config.augment.image_size={config.augment.image_size} must be >= 8")
  try:
    augment_presets.get_preset(config.augment.preset)
  except ValueError as e:
    raise ValueError(f"config.augment.preset: {e}") from e
  views.check(config.dataset.views, "dataset.views")
  loop.config_spec(probe.ProbeSpec, config.probe, "probe")
  loop.config_spec(input_pipeline.LabelSpec, config.labels, "labels")
  loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  resnet.create_model(loop.config_spec(resnet.ModelSpec, config.model, "model"))


class Budget(NamedTuple):
  """How long a pretraining run is, and what an epoch means for it."""

  info: input_pipeline.DatasetInfo
  counts: input_pipeline.SplitCounts
  steps_per_epoch: int  # of the schedule: global batches in one pass over the split's images
  data_steps_per_epoch: int  # of this process's stream: local batches in a pass over its examples
  total_steps: int


def plan_budget(config: ml_collections.ConfigDict, local_batch: int) -> Budget:
  """The run's length: `num_steps`, or `num_epochs` passes over the split's images.

  Counting images, not examples, is what makes the budget equal between methods: one MICLe
  example is a whole case, and a pass over the cases would be a pass over far fewer pairs.
  """
  label_spec = loop.config_spec(input_pipeline.LabelSpec, config.labels, "labels")
  d = config.dataset
  info = input_pipeline.open_dataset(d.name, d.split, d.data_dir or None, label_spec, d.views)
  counts = input_pipeline.count_split(info)
  per_epoch = input_pipeline.steps_per_epoch(
    counts.images, config.batch_size, what=f"{info.split!r} (images)"
  )
  data_per_epoch = input_pipeline.steps_per_epoch(
    counts.examples_per_process, local_batch, what=f"this process's shard of {info.split!r}"
  )
  total_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * per_epoch
  return Budget(info, counts, per_epoch, data_per_epoch, total_steps)


def _summary(config, budget: Budget, step: int, init: loop.InitInfo) -> dict:
  return {
    "method": config.method,
    "dataset": f"{config.dataset.name}:{config.dataset.split}",
    "views": config.dataset.views,
    "batch_size": config.batch_size,
    "num_examples": budget.counts.examples,
    "num_images": budget.counts.images,
    "steps_per_epoch": budget.steps_per_epoch,
    "total_steps": budget.total_steps,
    "step": step,
    "pairs_seen": step * config.batch_size,
    "views_seen": 2 * step * config.batch_size,
    "init": init.summary(),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Pretrains with SimCLR or MICLe as `config` says; returns the final state."""
  validate_config(config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, key="config.batch_size")
  local_batch = sharding.local_batch_size(config.batch_size)
  label_spec = loop.config_spec(input_pipeline.LabelSpec, config.labels, "labels")
  budget = plan_budget(config, local_batch)
  info, counts, per_epoch, total_steps = (
    budget.info,
    budget.counts,
    budget.steps_per_epoch,
    budget.total_steps,
  )

  model_spec = loop.config_spec(
    resnet.ModelSpec, config.model, "model", num_classes=info.num_classes
  )
  model = resnet.create_model(model_spec)
  opt_spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  schedule = optim.create_schedule(
    opt_spec, batch_size=config.batch_size, total_steps=total_steps, steps_per_epoch=per_epoch
  )
  tx = optim.create_optimizer(opt_spec, learning_rate=schedule, trust_scale_head=True)

  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    run_files.check_reusable(workdir, config, what="resume", allow_length_change=True)
  image_shape = (config.augment.image_size, config.augment.image_size, 3)
  state = train_state.create_train_state(
    model, tx, seed=config.seed, image_shape=image_shape, mesh=mesh
  )
  state, init = loop.resume_or_initialize(
    state,
    mngr,
    config.init_from,
    mesh,
    rule=checkpoint.pretrain_init_rule(config.init_projection_head),
  )
  start_step = int(state.step)
  summary = functools.partial(_summary, config, budget, init=init)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
    run_files.write_json(workdir / run_files.PRETRAINING_FILE, summary(step=start_step))
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(
      {
        "num_params": resnet.count_params(state.params),
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
        "num_images": counts.images,
      }
    )
  logging.info(
    "%s on %s (views: %s): %d examples holding %d images; %d steps per epoch (of images), %d "
    "total steps = %d pairs, from step %d",
    config.method,
    config.dataset.name,
    config.dataset.views,
    counts.examples,
    counts.images,
    per_epoch,
    total_steps,
    total_steps * config.batch_size,
    start_step,
  )

  batches = input_pipeline.pretrain_batches(
    info,
    method=config.method,
    preset=config.augment.preset,
    image_size=config.augment.image_size,
    local_batch_size=local_batch,
    per_epoch=budget.data_steps_per_epoch,
    seed=config.seed,
    start_step=start_step,
    shuffle_buffer=config.dataset.shuffle_buffer,
    label_spec=label_spec,
  )
  step_fn = steps.compile_pretrain_step(
    mesh,
    temperature=config.temperature,
    task=steps.task_for_labels(label_spec.task),
    learning_rate_fn=schedule,
  )
  on_save = _probe_hook(config, workdir, writer, mesh, start_step, state)
  state = loop.run(
    config,
    workdir,
    mngr,
    writer,
    state,
    step_fn,
    batches,
    mesh,
    start_step,
    total_steps,
    on_save=on_save,
  )
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  if jax.process_index() == 0:
    final = summary(step=int(state.step))
    final["probe"] = on_save.history if on_save is not None else None
    run_files.write_json(workdir / run_files.PRETRAINING_FILE, final)
  return state


class _ProbeHook:
  """Scores the probe on a state and logs it as `probe/*`, keeping the history by step.

  The probe set is read on the first score, so a finished run that is started again (and trains
  no step) reads nothing.
  """

  def __init__(self, make_probe, writer, history: dict[str, Any]):
    self.make_probe, self.writer, self.history = make_probe, writer, history
    self.probe: probe.Probe | None = None

  def __call__(self, step: int, state: Any) -> None:
    if self.probe is None:
      self.probe = self.make_probe()
    scores = self.probe(state)
    self.history[str(step)] = scores
    self.writer.write_scalars(step, {f"probe/{k}": v for k, v in scores.items() if np.isfinite(v)})
    logging.info("probe at step %d: %s", step, scores)


def _probe_hook(config, workdir, writer, mesh, start_step: int, state) -> _ProbeHook | None:
  """The probe of `config.probe` (None when off), scored now if the run starts at step 0."""
  spec = loop.config_spec(probe.ProbeSpec, config.probe, "probe")
  if not spec.dataset:
    return None
  # The probe set lives beside the pretraining data unless the config says otherwise, so one
  # --config.dataset.data_dir moves both.
  spec = dataclasses.replace(spec, data_dir=spec.data_dir or config.dataset.data_dir)
  make_probe = functools.partial(
    probe.Probe,
    spec,
    preset=config.augment.preset,
    image_size=config.augment.image_size,
    labels=config.labels,
    mesh=mesh,
  )
  history = {}
  path = workdir / run_files.PRETRAINING_FILE
  if start_step > 0 and path.exists():
    history = dict(run_files.read_json(path).get("probe") or {})
  hook = _ProbeHook(make_probe, writer, history)
  if start_step == 0:
    hook(0, state)  # the architecture at initialisation (or as restored from init_from)
  return hook
