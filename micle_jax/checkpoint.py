"""Orbax checkpoints: the training state in a workdir, and weights for `init_from`.

Layout: `<workdir>/checkpoints/<step>/state/` holds one pytree
`{'step', 'params', 'batch_stats', 'opt_state', 'rng'}` saved with `ocp.args.StandardSave`; a
weights-only checkpoint (converted SimCLRv2 weights, or an export) holds
`{'params', 'batch_stats'}` in the same layout. `load_weights` reads either.

Resume order (as in big_vision): the latest checkpoint in the workdir → `init_from` → scratch.
"""

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"


def _absolute(path: epath.PathLike) -> epath.Path:
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
  )
  return ocp.CheckpointManager(
    _absolute(workdir) / CHECKPOINT_DIR, options=options, item_names=(STATE_ITEM,)
  )


def state_to_tree(state: Any) -> dict[str, Any]:
  """The arrays of a TrainState that a checkpoint holds (no functions)."""
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
    "rng": state.rng,
  }


def save(
  mngr: ocp.CheckpointManager, step: int, tree: dict[str, Any], *, force: bool = False
) -> bool:
  """Saves `tree` at `step` (asynchronously when the manager is async)."""
  return mngr.save(
    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree)}), force=force
  )


def restore(mngr: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> dict[str, Any]:
  """Restores `step` into the structure, shapes and shardings of `target` (abstract or concrete)."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  restored = mngr.restore(
    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
  )
  return restored[STATE_ITEM]


def save_weights(directory: epath.PathLike, params: Any, batch_stats: Any, step: int = 0) -> None:
  """Writes a weights-only checkpoint (`{'params', 'batch_stats'}`) usable as `init_from`."""
  mngr = manager(directory, max_to_keep=None, async_save=False)
  save(mngr, step, {"params": params, "batch_stats": batch_stats}, force=True)
  mngr.wait_until_finished()
  mngr.close()


def _resolve(path: epath.PathLike) -> tuple[epath.Path, int]:
  """Finds (CheckpointManager root, step) for a workdir, a checkpoints dir or a step dir."""
  path = _absolute(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from={path}: no such file or directory")
  for root in (path / CHECKPOINT_DIR, path):
    if root.is_dir():
      steps = ocp.utils.checkpoint_steps(root)
      if steps:
        return root, max(steps)
  if path.name.isdigit() and (path / STATE_ITEM).exists():
    return path.parent, int(path.name)
  raise FileNotFoundError(
    f"init_from={path}: no Orbax checkpoint found (looked for {path / CHECKPOINT_DIR}/<step>, "
    f"{path}/<step> and {path / STATE_ITEM})"
  )


def load_weights(path: epath.PathLike) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads `(params, batch_stats, step)` as host NumPy arrays from any of our checkpoints.

  Args:
    path: a pretraining/fine-tuning workdir (latest step), its `checkpoints/` directory, a step
      directory inside it, or a weights-only checkpoint written by `save_weights`.
  """
  root, step = _resolve(path)
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
  tree = restored[STATE_ITEM]
  mngr.close()
  logging.info("Loaded weights from %s (step %d)", root, step)
  to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
  return to_host(tree["params"]), to_host(tree.get("batch_stats", {})), step


def merge_pretrained(
  target: dict[str, Any],
  loaded: dict[str, Any],
  *,
  required_prefixes: tuple[str, ...],
  exact_prefixes: tuple[str, ...] = (),
  source: str = "init_from",
) -> tuple[dict[str, Any], list[str], list[str]]:
  """Copies `loaded` leaves into `target` where paths and shapes agree.

  Every target leaf under a `required_prefixes` path (e.g. "backbone") must be present in
  `loaded` with the same shape, and under `exact_prefixes` the checkpoint may hold nothing the
  target lacks (a deeper backbone is not silently truncated); otherwise a ValueError lists every
  mismatch. Other target leaves (a supervised head with another number of classes, say) keep
  their fresh values, and other checkpoint leaves (projection-head layers that fine-tuning drops)
  are left unused.

  Returns:
    (merged tree, restored paths, paths left fresh or unused in `loaded`).
  """
  flat_target = traverse_util.flatten_dict(target, sep="/")
  flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
  merged, restored, fresh, problems = {}, [], [], []
  for path, value in flat_target.items():
    required = any(path.startswith(p) for p in required_prefixes)
    other = flat_loaded.get(path)
    if other is not None and tuple(other.shape) == tuple(value.shape):
      merged[path] = np.asarray(other, dtype=value.dtype)
      restored.append(path)
      continue
    if required:
      found = "none" if other is None else f"shape {tuple(other.shape)}"
      problems.append(f"  {path}: expected shape {tuple(value.shape)}, checkpoint has {found}")
    merged[path] = value
    fresh.append(path)
  unused = [p for p in flat_loaded if p not in flat_target]
  required_unused = [p for p in unused if any(p.startswith(r) for r in exact_prefixes)]
  problems += [f"  {p}: in the checkpoint but not in the model" for p in required_unused]
  if problems:
    raise ValueError(
      f"{source}: the checkpoint's architecture does not match the config "
      f"({len(problems)} mismatched parameters):\n" + "\n".join(problems)
    )
  return traverse_util.unflatten_dict(merged, sep="/"), restored, fresh + unused
