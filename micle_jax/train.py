"""Contrastive pretraining (SimCLR / MICLe): `train_and_evaluate(config, workdir) -> TrainState`.

Resume order: the latest checkpoint in `workdir` → `config.init_from` (backbone and heads
restored, optimizer fresh) → scratch. Checkpoints are saved every `checkpoint_every_steps`, at
the end, and on SIGTERM; a run killed at any point and restarted with the same command continues
from its last checkpoint and ends with bit-identical parameters on CPU (the input position is
derived from the step; see `input_pipeline`). A non-finite loss or parameter stops the run,
naming the step, without saving over the last good checkpoint.
"""

import jax
import ml_collections
from absl import logging
from clu import metric_writers, parameter_overview
from etils import epath

from micle_jax import (
  augment_presets,
  checkpoint,
  input_pipeline,
  loop,
  models,
  optim,
  sharding,
  steps,
  train_state,
)


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
  loop.config_spec(input_pipeline.LabelSpec, config.labels, "labels")
  loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  models.create_model(loop.config_spec(models.ModelSpec, config.model, "model"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Pretrains with SimCLR or MICLe as `config` says; returns the final state."""
  validate_config(config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, key="config.batch_size")
  local_batch = sharding.local_batch_size(config.batch_size)

  label_spec = loop.config_spec(input_pipeline.LabelSpec, config.labels, "labels")
  info = input_pipeline.open_dataset(
    config.dataset.name, config.dataset.split, config.dataset.data_dir or None, label_spec
  )
  per_epoch = input_pipeline.steps_per_epoch(info, local_batch)
  total_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * per_epoch

  model_spec = loop.config_spec(
    models.ModelSpec, config.model, "model", num_classes=info.num_classes
  )
  model = models.create_model(model_spec)
  opt_spec = loop.config_spec(optim.OptimizerSpec, config.optimizer, "optimizer")
  schedule = optim.create_schedule(
    opt_spec, batch_size=config.batch_size, total_steps=total_steps, steps_per_epoch=per_epoch
  )
  tx = optim.create_optimizer(opt_spec, learning_rate=schedule)

  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  image_shape = (config.augment.image_size, config.augment.image_size, 3)
  state = train_state.create_train_state(
    model, tx, seed=config.seed, image_shape=image_shape, mesh=mesh
  )
  state = loop.resume_or_initialize(
    state,
    mngr,
    config.init_from,
    mesh,
    required_prefixes=("backbone",),
    exact_prefixes=("backbone",),
  )
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(
      {
        "num_params": models.count_params(state.params),
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
      }
    )
  logging.info(
    "%s on %s: %d examples, %d steps/epoch, %d total steps, from step %d",
    config.method,
    config.dataset.name,
    info.num_examples,
    per_epoch,
    total_steps,
    start_step,
  )

  batches = input_pipeline.pretrain_batches(
    info,
    method=config.method,
    preset=config.augment.preset,
    image_size=config.augment.image_size,
    local_batch_size=local_batch,
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
  state = loop.run(
    config, workdir, mngr, writer, state, step_fn, batches, mesh, start_step, total_steps
  )
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  return state
