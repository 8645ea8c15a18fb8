"""Contrastive pretraining (SimCLR / MICLe): `train_and_evaluate(config, workdir) -> TrainState`.

Resume order: the latest checkpoint in `workdir` (only if its `config.json` matches, see
`runtime.run_files`) → `config.init_from` (the backbone, and the projection head unless
`init_projection_head=False`; never the supervised monitor; optimizer fresh) → scratch.

Budget: `num_epochs` counts passes over the split's *images*, so SimCLR (pairs of views of one
image) and MICLe (pairs of images of one case) given the same config run the same number of steps
and see the same number of views. `pretraining.json` in the workdir records the plan and what was
done: steps, pairs and views seen, what was restored from where, and the environment
(`runtime.provenance`); `data.json` the fingerprint of the data read (`data.fingerprint`), which a
resume must match. Checkpoints are saved every `checkpoint_every_steps`, at the end, and on SIGTERM; a run killed at any point and restarted with the same command continues
from its last checkpoint and ends with bit-identical parameters on CPU (the input position is
derived from the step; see `input_pipeline`). A non-finite loss or parameter stops the run,
naming the step, without saving over the last good checkpoint.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview
from etils import epath

from micle_jax import specs
from micle_jax.data import fingerprint, input_pipeline, tasks
from micle_jax.eval import probe
from micle_jax.models import native_conv, resnet
from micle_jax.runtime import checkpoint, provenance, restore_rules, run_files, sharding
from micle_jax.train import build, loop, train_state


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
  return _plan_budget(specs.from_config(specs.PretrainSpec, config), local_batch)


def _plan_budget(spec: specs.PretrainSpec, local_batch: int) -> Budget:
  d = spec.dataset
  info = input_pipeline.open_dataset(d.name, d.split, d.data_dir or None, spec.labels, d.views)
  counts = input_pipeline.count_split(info)
  per_epoch = input_pipeline.steps_per_epoch(
    counts.images, spec.batch_size, what=f"{info.split!r} (images)"
  )
  data_per_epoch = input_pipeline.steps_per_epoch(
    counts.examples_per_process, local_batch, what=f"this process's shard of {info.split!r}"
  )
  total_steps = spec.num_steps if spec.num_steps > 0 else spec.num_epochs * per_epoch
  return Budget(info, counts, per_epoch, data_per_epoch, total_steps)


def _summary(spec: specs.PretrainSpec, budget: Budget, step: int, init: loop.InitInfo) -> dict:
  return {
    "method": spec.method,
    "seed": spec.seed,
    "dataset": f"{spec.dataset.name}:{spec.dataset.split}",
    "views": spec.dataset.views,
    "batch_size": spec.batch_size,
    "num_examples": budget.counts.examples,
    "num_images": budget.counts.images,
    "steps_per_epoch": budget.steps_per_epoch,
    "total_steps": budget.total_steps,
    "step": step,
    "pairs_seen": step * spec.batch_size,
    "views_seen": 2 * step * spec.batch_size,
    "init": init.summary(),
    "provenance": provenance.environment(native_conv.describe()),
  }


def plan(
  spec: specs.PretrainSpec, *, num_classes: int, total_steps: int, steps_per_epoch: float
) -> build.Plan:
  """What `build` makes of a pretraining spec, with a monitor head of `num_classes` outputs."""
  return build.Plan(
    kind="pretrain",
    model=dataclasses.replace(spec.model, num_classes=num_classes),
    optimizer=spec.optimizer,
    batch_size=spec.batch_size,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    image_size=spec.augment.image_size,
    seed=spec.seed,
    label_loss=tasks.get(spec.labels.task).loss,
    temperature=spec.temperature,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Pretrains with SimCLR or MICLe as `config` says; returns the final state."""
  spec = specs.from_config(specs.PretrainSpec, config)
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(spec.batch_size, mesh, key="config.batch_size")
  local_batch = sharding.local_batch_size(spec.batch_size)
  budget = _plan_budget(spec, local_batch)
  fingerprints = {"dataset": fingerprint.fingerprint(budget.info.builder)}
  mngr = checkpoint.manager(workdir, max_to_keep=spec.loop.keep_checkpoints)
  if mngr.latest_step() is not None:
    run_files.check_reusable(
      workdir, config, what="resume", allow_length_change=True, data=fingerprints
    )
  run_plan = plan(
    spec,
    num_classes=budget.info.num_classes,
    total_steps=budget.total_steps,
    steps_per_epoch=budget.steps_per_epoch,
  )
  run = build.build(run_plan, mesh)
  rule = restore_rules.pretrain_init_rule(spec.init_projection_head)
  state, init = loop.resume_or_initialize(
    run.state, mngr, spec.init_from, mesh, rule=rule, variant=spec.model.variant
  )
  start_step = int(state.step)
  summary = functools.partial(_summary, spec, budget, init=init)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
    run_files.write_json(workdir / run_files.DATA_FILE, fingerprints)
    run_files.write_json(workdir / run_files.PRETRAINING_FILE, summary(step=start_step))
    _log_start(spec, budget, state, writer, start_step)

  batches = input_pipeline.pretrain_batches(
    budget.info,
    method=spec.method,
    preset=spec.augment.preset,
    image_size=spec.augment.image_size,
    local_batch_size=local_batch,
    per_epoch=budget.data_steps_per_epoch,
    seed=spec.seed,
    start_step=start_step,
    shuffle_buffer=spec.dataset.shuffle_buffer,
    label_spec=spec.labels,
  )
  on_save = _probe_hook(spec, workdir, writer, mesh, start_step, state)
  last_logged: dict[str, Any] = {}
  state = loop.run(
    spec=spec.loop,
    workdir=workdir,
    mngr=mngr,
    writer=writer,
    state=state,
    step_fn=run.step_fn,
    batches=batches,
    mesh=mesh,
    total_steps=budget.total_steps,
    on_save=on_save,
    on_log=lambda step, scalars: last_logged.update(step=step, metrics=scalars),
    label=f"pretrain {spec.method} {run_files.short(workdir)}",
  )
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  if jax.process_index() == 0:
    final = summary(step=int(state.step))
    final["probe"] = on_save.history if on_save is not None else None
    if on_save is not None and on_save.probe is not None:
      final["probe_images"] = on_save.probe.num_images
    final["contrastive"] = contrastive_summary(last_logged, spec.batch_size)
    run_files.write_json(workdir / run_files.PRETRAINING_FILE, final)
  return state


def contrastive_summary(last_logged: dict[str, Any], batch_size: int) -> dict[str, Any] | None:
  """How far the contrastive task got: its accuracy and loss over the last logged window, beside
  their values at chance (uniform logits over the 2B − 1 candidates of each row, both directions
  summed, as `losses.nt_xent`). A loss not below chance means the pretraining learned nothing
  (e.g. it diverged); None if this run logged no step."""
  if not last_logged:
    return None
  scalars = {k: float(v) for k, v in last_logged["metrics"].items()}
  candidates = 2 * batch_size - 1
  return {
    "step": int(last_logged["step"]),
    "accuracy": scalars.get("contrast_acc"),
    "loss": scalars.get("contrast_loss"),
    "chance_accuracy": 1.0 / candidates,
    "chance_loss": 2.0 * math.log(candidates),
  }


def _log_start(spec: specs.PretrainSpec, budget: Budget, state, writer, start_step: int) -> None:
  counts, per_epoch, total_steps = budget.counts, budget.steps_per_epoch, budget.total_steps
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
    spec.method,
    spec.dataset.name,
    spec.dataset.views,
    counts.examples,
    counts.images,
    per_epoch,
    total_steps,
    total_steps * spec.batch_size,
    start_step,
  )


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


def _probe_hook(
  spec: specs.PretrainSpec, workdir, writer, mesh, start_step: int, state
) -> _ProbeHook | None:
  """The probe of `spec.probe` (None when off), scored now if the run starts at step 0."""
  if not spec.probe.dataset:
    return None
  # The probe set lives beside the pretraining data unless the config says otherwise, so one
  # --config.dataset.data_dir moves both.
  probe_spec = dataclasses.replace(
    spec.probe, data_dir=spec.probe.data_dir or spec.dataset.data_dir
  )
  make_probe = functools.partial(
    probe.Probe,
    probe_spec,
    preset=spec.augment.preset,
    image_size=spec.augment.image_size,
    labels=spec.labels,
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
