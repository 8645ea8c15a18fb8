"""The step loop shared by pretraining and fine-tuning: log, checkpoint, stop cleanly, guard NaN."""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from micle_jax import specs
from micle_jax.runtime import checkpoint, preemption, restore_rules, run_files, sharding
from micle_jax.train import metrics, progress


@dataclasses.dataclass(frozen=True)
class InitInfo:
  """Where a run's starting weights came from, for its log and outputs."""

  source: str  # "resume", "init_from" or "scratch"
  path: str = ""
  step: int | None = None  # the checkpoint step restored
  report: restore_rules.RestoreReport | None = None

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {"source": self.source, "path": self.path, "step": self.step}
    if self.report is not None:
      out.update(self.report.summary())
    return out


def resume_or_initialize(
  state: Any,
  mngr: ocp.CheckpointManager,
  init_from: str,
  mesh: jax.sharding.Mesh,
  *,
  rule: restore_rules.RestoreRule,
  variant: str,
  init_step: int | None = None,
) -> tuple[Any, InitInfo]:
  """Resume order: the workdir's newest readable checkpoint → `init_from` (its latest step, or
  `init_step`) → `state` (scratch).

  Newer checkpoints that cannot be restored are set aside (`checkpoint.restore_newest_readable`).

  A workdir's own checkpoint is the run itself and restores whole. From `init_from` (a workdir or
  Orbax checkpoint) only the parameters and BatchNorm statistics that `rule` allows are taken
  (see `restore_rules.restore_allowed`); everything else, the supervised head included, keeps its
  initial value, and step and optimizer state start fresh. `init_from` must record the model
  `variant` of this run where it records one (`run_files.check_init_variant`).
  """
  found = checkpoint.restore_newest_readable(mngr, checkpoint.state_to_tree(state))
  if found is not None:
    step, restored = found
    logging.info("Resuming from %s step %d", mngr.directory, step)
    return state.replace(**restored), InitInfo("resume", str(mngr.directory), step)
  if not init_from or init_from == "scratch":
    logging.info("Training from scratch.")
    return state, InitInfo("scratch")
  run_files.check_init_variant(init_from, variant)
  params, batch_stats, step = checkpoint.load_weights(init_from, init_step)
  source = f"init_from={init_from}"
  params, report = restore_rules.restore_allowed(
    jax.device_get(state.params), params, rule, source=source
  )
  batch_stats, stats_report = restore_rules.restore_allowed(
    jax.device_get(state.batch_stats), batch_stats, rule, source=f"{source} (batch_stats)"
  )
  logging.info(
    "init_from %s (step %d): restored %d parameter and %d BatchNorm arrays under %s; left at "
    "initialisation: %s; in the checkpoint but not used: %s",
    init_from,
    step,
    len(report.restored),
    len(stats_report.restored),
    list(rule.restore),
    _top_level(report.fresh),
    _top_level(report.unused + stats_report.unused),
  )
  state = state.replace(
    params=sharding.replicate(params, mesh),
    batch_stats=sharding.replicate(batch_stats, mesh),
    opt_state=jax.jit(state.tx.init, out_shardings=sharding.replicated(mesh))(params),
  )
  return state, InitInfo("init_from", init_from, step, report)


def _top_level(paths: list[str]) -> list[str]:
  """The distinct module prefixes of `paths` ("projection_head/dense_1"), for a short log line."""
  return sorted({"/".join(p.split("/")[:2]) for p in paths})


def _check_finite(step: int, step_metrics: dict[str, Any], mngr) -> None:
  if not (np.isfinite(step_metrics["loss"]) and step_metrics["params_finite"]):
    mngr.wait_until_finished()
    raise FloatingPointError(
      f"non-finite loss or parameters at step {step} (loss={step_metrics['loss']}); "
      f"stopped without saving; the last good checkpoint is step {mngr.latest_step()}"
    )


def _periodic_actions(spec: specs.LoopSpec, writer, workdir, total_steps: int) -> list[Any]:
  """clu's progress report (steps/s, ETA) and, when asked, a profile of a few steps."""
  actions = [
    periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=spec.log_every_steps
    )
  ]
  if spec.profile_steps > 0 and jax.process_index() == 0:
    actions.append(
      periodic_actions.Profile(num_profile_steps=spec.profile_steps, logdir=str(workdir))
    )
  return actions


def run(
  *,
  spec: specs.LoopSpec,
  workdir: epath.Path,
  mngr: ocp.CheckpointManager,
  writer: metric_writers.MetricWriter,
  state: Any,
  step_fn: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
  batches: Iterator[dict[str, np.ndarray]],
  mesh: jax.sharding.Mesh,
  total_steps: int,
  on_save: Callable[[int, Any], None] | None = None,
  on_log: Callable[[int, dict[str, float]], None] | None = None,
  label: str = "train",
) -> Any:
  """Steps from `state.step` to `total_steps`, logging, checkpointing, and stopping cleanly.

  `spec` says how often to log and save, how many steps this run may take, and what to profile.
  `step_fn(state, global_batch)` must report `loss` and `params_finite`; a
  non-finite step raises `FloatingPointError` before anything after it is saved or logged.
  `on_save(step, state)` runs after each checkpoint is written (e.g. a probe of the state); it
  must not change the state. `on_log(step, scalars)` sees each logged window of averages.
  `label` names the run on its progress line.
  """
  start_step = int(state.step)
  hooks = _periodic_actions(spec, writer, workdir, total_steps)
  window = metrics.WindowAverages()
  last_step = total_steps
  if spec.max_steps_per_run > 0:
    last_step = min(total_steps, start_step + spec.max_steps_per_run)
  # Metrics are read one step late: the host dispatches step n+1 before it waits for step n, so
  # the accelerator always has the next step queued. Steps that log or save read them all.
  pending: list[tuple[int, dict[str, Any]]] = []
  shown = progress.Progress(label, start_step, last_step, enabled=jax.process_index() == 0)

  def read_metrics(keep_newest: bool) -> None:
    while len(pending) > int(keep_newest):
      done_step, device_metrics = pending.pop(0)
      host_metrics = jax.device_get(device_metrics)
      _check_finite(done_step, host_metrics, mngr)
      window.update({k: v for k, v in host_metrics.items() if k != "params_finite"})

  with preemption.StopRequest() as stop:
    for step in range(start_step + 1, last_step + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.make_global_batch(next(batches), mesh)
        state, step_metrics = step_fn(state, batch)
      pending.append((step, step_metrics))
      stopping = stop.should_stop(step)
      log_now = step % spec.log_every_steps == 0 or step == last_step
      save_now = step % spec.checkpoint_every_steps == 0 or step == last_step or stopping
      read_metrics(keep_newest=not (log_now or save_now))
      for hook in hooks:
        hook(step)
      if log_now:
        scalars = window.compute_and_reset()
        writer.write_scalars(step, scalars)
        if on_log is not None:
          on_log(step, scalars)
      if save_now:
        checkpoint.save(mngr, step, checkpoint.state_to_tree(state), force=True)
        if on_save is not None:
          on_save(step, state)
      shown.update(step)
      if stopping:
        logging.warning("Stopped at step %d on request; checkpoint saved.", step)
        break
  return state
