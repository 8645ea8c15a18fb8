"""Orbax checkpoints: the training state in a workdir, and weights for `init_from`.

Layout: `<workdir>/checkpoints/<step>/state/` holds one pytree
`{'step', 'params', 'batch_stats', 'opt_state'}` saved with `ocp.args.StandardSave`; a
weights-only checkpoint (converted SimCLRv2 weights, or an export) holds
`{'params', 'batch_stats'}` in the same layout. `load_weights` reads either.

Resume order (as in big_vision): the latest checkpoint in the workdir → `init_from` → scratch.
A workdir's newest checkpoint that cannot be read (truncated or missing files, bad metadata, a
structure that does not fit) is set aside as `<step>.damaged` and the next older one is tried
(`restore_newest_readable`); temporary folders of saves that never committed are removed when a
manager opens the workdir. A named `init_from` checkpoint that cannot be read is an error naming
it, never a silent fall-back to another one.
"""

import gc
import json
import logging as python_logging
import sys
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DAMAGED_SUFFIX = ".damaged"


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint of a workdir could be restored; the message lists each step tried and why."""


def absolute(path: epath.PathLike) -> epath.Path:
  """Orbax needs absolute paths; relative local workdirs are resolved against the cwd."""
  path = epath.Path(path)
  return path if path.is_absolute() else epath.Path(path.absolute())


def manager(
  workdir: epath.PathLike,
  *,
  max_to_keep: int | None = 3,
  save_interval_steps: int = 1,
  async_save: bool = True,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` with one item, `state`."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    save_interval_steps=save_interval_steps,
    enable_async_checkpointing=async_save,
    read_only=read_only,
    create=not read_only,
    # A save killed before it committed leaves `<step>.orbax-checkpoint-tmp*`: never a step,
    # and removed here so that the next save at that step does not collide with it.
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
    absolute(workdir) / CHECKPOINT_DIR, options=options, item_names=(STATE_ITEM,)
  )


def state_to_tree(state: Any) -> dict[str, Any]:
  """The arrays of a TrainState that a checkpoint holds (no functions)."""
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
  }


def save(
  mngr: ocp.CheckpointManager, step: int, tree: dict[str, Any], *, force: bool = False
) -> bool:
  """Saves `tree` at `step` (asynchronously when the manager is async)."""
  return mngr.save(
    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree)}), force=force
  )


def restore(mngr: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> dict[str, Any]:
  """Restores `step` into the structure, shapes and shardings of `target` (abstract or concrete).

  A training-state checkpoint written before the state lost its unused `rng` holds that one array
  more; it is read and dropped, so runs started before the change resume.
  """
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return _restore(mngr, step, abstract)
  except Exception:
    if set(abstract) != {"step", "params", "batch_stats", "opt_state"}:
      raise
    sharding = getattr(abstract["step"], "sharding", None)
    legacy = dict(abstract, rng=jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding))
    try:
      restored = _restore(mngr, step, legacy)
    except Exception:  # noqa: BLE001 -- not the older layout: report the first failure
      pass
    else:
      logging.info("Step %d holds the training state's former rng; it is not needed, dropped", step)
      restored.pop("rng")
      return restored
    raise


def _restore(mngr: ocp.CheckpointManager, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
  restored = mngr.restore(
    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
  )
  return restored[STATE_ITEM]


def reason(error: BaseException, limit: int = 400) -> str:
  """One line saying why a read failed: the error's type and the start of its message."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _is_closed_loop_noise(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_noise() -> None:
  """Silences the echo of a failed restore (installed once, before the first restore).

  When a restore fails, the reads still pending in TensorStore later call back into the asyncio
  loop that Orbax has already closed, and Python prints each as a `RuntimeError: Event loop is
  closed` traceback, and asyncio logs each failed read again as "Future exception was never
  retrieved" (or "Task ..."): dozens of them, after the one line that says what failed. They say
  nothing more, so exactly those are dropped, from whichever hook prints them (on a loaded
  machine a callback can fire before the failure reaches our code, so the filter goes in first);
  every other exception or asyncio log is reported.
  """
  if getattr(sys.unraisablehook, "_drops_closed_loop_noise", False):
    return
  unraisable_hook, thread_hook, except_hook = (
    sys.unraisablehook,
    threading.excepthook,
    sys.excepthook,
  )

  def on_unraisable(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_value):
      unraisable_hook(unraisable)

  def on_thread_exception(args):
    if not _is_closed_loop_noise(args.exc_value):
      thread_hook(args)

  def on_exception(kind, value, traceback):
    if not _is_closed_loop_noise(value):
      except_hook(kind, value, traceback)

  on_unraisable._drops_closed_loop_noise = True
  sys.unraisablehook, threading.excepthook = on_unraisable, on_thread_exception
  sys.excepthook = on_exception
  python_logging.getLogger("asyncio").addFilter(
    lambda record: not record.getMessage().startswith(
      ("Future exception was never retrieved", "Task exception was never retrieved")
    )
  )


def _forget_failed_restore() -> None:
  """Finalizes what a failed restore left behind, now, and silences what it leaves for later.

  A failed restore leaves the reads it had scheduled but not started as coroutine objects in
  reference cycles (Orbax's tasks and the exception's frames). Whenever the garbage collector
  frees them (mid-run, or at interpreter exit after the one-line error), Python warns
  "coroutine '...' was never awaited" for each. Such a read was abandoned on purpose, so from the
  first failed restore on, that warning is ignored for the rest of the process (the program itself
  runs no coroutines; only Orbax does), and the cycles are collected at once, not at exit.
  """
  warnings.filterwarnings(
    "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
  )
  gc.collect()


def set_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  """Renames step `step` to `<step>.damaged` (`.damaged.N` if taken); returns the new path.

  Orbax no longer sees it as a step, so it is neither restored, nor deleted by `max_to_keep`, nor
  in the way of the next save at that step; it stays on disk for inspection.
  """
  root = epath.Path(mngr.directory)
  target = root / f"{step}{DAMAGED_SUFFIX}"
  n = 1
  while target.exists():
    target, n = root / f"{step}{DAMAGED_SUFFIX}.{n}", n + 1
  if jax.process_index() == 0:
    (root / str(step)).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
  mngr.reload()
  return target


def restore_newest_readable(
  mngr: ocp.CheckpointManager, target: dict[str, Any]
) -> tuple[int, dict[str, Any]] | None:
  """(step, tree) of the newest step of `mngr` that restores into `target`; None if it has none.

  Each newer step that fails is logged in one line (step, folder, reason) and set aside once an
  older one has restored. If none restores, nothing is renamed and `UnreadableCheckpointError`
  lists every step tried, so that a rerun fails the same way instead of starting from scratch.
  """
  failed: list[tuple[int, str]] = []
  steps = sorted(mngr.all_steps(), reverse=True)
  if steps:
    _drop_closed_loop_noise()
  for step in steps:
    try:
      tree = restore(mngr, step, target)
    except Exception as e:  # noqa: BLE001 -- whatever a damaged step raises, try the previous one
      failed.append((step, reason(e)))
      tree = None
    if tree is None:  # out of the handler, so that its exception and frames can be freed
      _forget_failed_restore()
      logging.warning(
        "Checkpoint step %d (%s) cannot be restored: %s",
        step,
        epath.Path(mngr.directory) / str(step),
        failed[-1][1],
      )
      continue
    for bad, why in failed:
      aside = set_aside(mngr, bad)
      logging.warning("Skipped step %d (%s); set aside as %s", bad, why, aside)
    if failed:
      logging.warning("Resuming from step %d, the newest readable checkpoint", step)
    return step, tree
  if failed:
    tried = "; ".join(f"step {step}: {why}" for step, why in failed)
    raise UnreadableCheckpointError(f"no checkpoint in {mngr.directory} can be restored ({tried})")
  return None


def save_weights(directory: epath.PathLike, params: Any, batch_stats: Any, step: int = 0) -> None:
  """Writes a weights-only checkpoint (`{'params', 'batch_stats'}`) usable as `init_from`."""
  mngr = manager(directory, max_to_keep=None, async_save=False)
  save(mngr, step, {"params": params, "batch_stats": batch_stats}, force=True)
  mngr.wait_until_finished()
  mngr.close()


def _resolve(path: epath.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
  """Finds (CheckpointManager root, step) for a workdir, a checkpoints dir or a step dir; the
  latest step, or `step` (which must exist)."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from={path}: no such file or directory")
  for root in (path / CHECKPOINT_DIR, path):
    if root.is_dir():
      steps = ocp.utils.checkpoint_steps(root)
      if steps and step is None:
        return root, max(steps)
      if steps:
        if step not in steps:
          raise FileNotFoundError(
            f"init_from={path}: no checkpoint step {step} (it has {sorted(steps)})"
          )
        return root, step
  if path.name.isdigit() and (path / STATE_ITEM).exists():
    if step is not None and step != int(path.name):
      raise FileNotFoundError(f"init_from={path} is step {path.name}, not step {step}")
    return path.parent, int(path.name)
  raise FileNotFoundError(
    f"init_from={path}: no Orbax checkpoint found (looked for {path / CHECKPOINT_DIR}/<step>, "
    f"{path}/<step> and {path / STATE_ITEM})"
  )


def latest_step(path: epath.PathLike) -> int:
  """The step `load_weights(path)` would read (raises FileNotFoundError like it)."""
  return _resolve(path)[1]


def init_step_to_restore(init_from: str, init_step: int, record_name: str) -> int | None:
  """The step of `init_from` to restore: `init_step` when it names one (>= 0), else None for
  the latest, which must then be the last step its run planned where the run recorded it
  (`record_name`, e.g. a pretraining workdir's pretraining.json, holds `total_steps`).

  Raises:
    ValueError: naming init_from and both steps, when its run stopped before its last step.
  """
  if init_step >= 0:
    return init_step
  if init_from in ("", "scratch"):
    return None
  record = epath.Path(init_from) / record_name
  if record.exists():
    planned = json.loads(record.read_text()).get("total_steps")
    latest = latest_step(init_from)
    if planned is not None and latest < planned:
      raise ValueError(
        f"init_from={init_from}: its pretraining reached step {latest} of the {planned} it "
        "planned; finish it (run it again), or name a step with --config.init_step=N"
      )
  return None


def load_weights(
  path: epath.PathLike, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads `(params, batch_stats, step)` as host NumPy arrays from any of our checkpoints.

  Args:
    path: a pretraining/fine-tuning workdir (latest step), its `checkpoints/` directory, a step
      directory inside it, or a weights-only checkpoint written by `save_weights`.
    step: the step to read (it must exist); None: the latest.
  """
  root, step = _resolve(path, step)
  _drop_closed_loop_noise()
  try:
    tree = _read_weights(root, step)
  except Exception as e:  # noqa: BLE001 -- a named checkpoint that cannot be read is an error
    raise ValueError(
      f"init_from={path}: checkpoint step {step} in {root} cannot be read ({reason(e)})"
    ) from e
  logging.info("Loaded weights from %s (step %d)", root, step)
  to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
  return to_host(tree["params"]), to_host(tree.get("batch_stats", {})), step


_READ_ONLY_NOTES = (
  "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0",
  "Given directory is read only=",
)


def _not_a_read_only_note(record: python_logging.LogRecord) -> bool:
  """Orbax's warnings that a manager opened read-only will not save: asked for, not news."""
  return not record.getMessage().startswith(_READ_ONLY_NOTES)


def _read_weights(root: epath.Path, step: int) -> dict[str, Any]:
  for handler in python_logging.getLogger().handlers + python_logging.getLogger("absl").handlers:
    if _not_a_read_only_note not in handler.filters:
      handler.addFilter(_not_a_read_only_note)
  mngr = ocp.CheckpointManager(
    root,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_names=(STATE_ITEM,),
    item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()},
  )
  # Restore onto this process's first device whatever topology wrote it (another process count,
  # a TPU pod): without a target, Orbax would insist on the saved shardings.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) if hasattr(m, "shape") else m,
    mngr.item_metadata(step)[STATE_ITEM],
  )
  restored = mngr.restore(
    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
  )
  mngr.close()
  return restored[STATE_ITEM]
