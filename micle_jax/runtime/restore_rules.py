"""Which parameters a restore from `init_from` takes: an explicit allow-list, never "whatever
matches by name and shape".

Fine-tuning takes the backbone and the projection-head layers it keeps (`finetune_rule`), never
`head_supervised`, which a pretraining fitted on the labels of the whole training split;
pretraining from other weights (ImageNet → domain) takes the backbone and optionally the
projection head (`pretrain_init_rule`); prediction takes the whole fine-tuned model
(`WHOLE_MODEL`). `restore_allowed` applies a rule to two trees and lists every mismatch.
Reading the checkpoints is `checkpoint.py`'s concern; this module only compares trees.
"""

import dataclasses
from typing import Any

import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class RestoreRule:
  """Which parameters a restore takes from a checkpoint: an explicit allow-list, never "whatever
  matches".

  Attributes:
    restore: path prefixes ("backbone", "projection_head/dense_0") whose leaves are copied from the
      checkpoint. Every target leaf under one of them must be in the checkpoint with its shape,
      or the restore fails listing each mismatch. "" allows every leaf (a whole fine-tuned model).
    exact: prefixes under which the checkpoint may hold nothing the target lacks (a deeper
      backbone is not silently truncated).
  """

  restore: tuple[str, ...]
  exact: tuple[str, ...] = ()

  def allows(self, path: str) -> bool:
    return any(_under(path, prefix) for prefix in self.restore)


def _under(path: str, prefix: str) -> bool:
  """Whether `path` ("a/b/kernel") lies under `prefix` ("a/b"), whole components only."""
  return not prefix or path == prefix or path.startswith(prefix + "/")


def projection_layer_prefixes(num_layers: int) -> tuple[str, ...]:
  """The parameter prefixes of the first `num_layers` projection-head layers."""
  return tuple(f"projection_head/{part}_{j}" for j in range(num_layers) for part in ("dense", "bn"))


def finetune_rule(proj_layers_kept: int) -> RestoreRule:
  """Fine-tuning restores the backbone and the projection-head layers it keeps; nothing else.

  In particular never `head_supervised`: a pretraining checkpoint's supervised monitor was fitted
  on the labels of the whole training split, and would leak them into a label-fraction run.
  """
  return RestoreRule(
    restore=("backbone",) + projection_layer_prefixes(proj_layers_kept), exact=("backbone",)
  )


def pretrain_init_rule(init_projection_head: bool) -> RestoreRule:
  """Pretraining from `init_from` (e.g. ImageNet SimCLR → domain): the backbone and, when asked,
  the whole projection head (both label-free); never the supervised monitor."""
  heads = ("projection_head",) if init_projection_head else ()
  return RestoreRule(restore=("backbone",) + heads, exact=("backbone",) + heads)


WHOLE_MODEL = RestoreRule(restore=("",), exact=("",))


@dataclasses.dataclass(frozen=True)
class RestoreReport:
  """What a restore took (`restored`), left at initialisation (`fresh`), and did not use."""

  restored: list[str]
  fresh: list[str]
  unused: list[str]

  def summary(self) -> dict[str, Any]:
    return {"restored": self.restored, "fresh": self.fresh, "unused": self.unused}


def restore_allowed(
  target: dict[str, Any], loaded: dict[str, Any], rule: RestoreRule, *, source: str
) -> tuple[dict[str, Any], RestoreReport]:
  """Copies the leaves of `loaded` that `rule` allows into `target`; the rest of `target` stays.

  Raises:
    ValueError: listing every allowed target leaf that the checkpoint lacks or holds with another
      shape, and every checkpoint leaf under `rule.exact` that the target lacks.
  """
  flat_target = traverse_util.flatten_dict(target, sep="/")
  flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
  merged, restored, fresh, problems = {}, [], [], []
  for path, value in flat_target.items():
    if not rule.allows(path):
      merged[path] = value
      fresh.append(path)
      continue
    other = flat_loaded.get(path)
    if other is None or tuple(other.shape) != tuple(value.shape):
      found = "none" if other is None else f"shape {tuple(other.shape)}"
      problems.append(f"  {path}: expected shape {tuple(value.shape)}, checkpoint has {found}")
      continue
    merged[path] = np.asarray(other, dtype=value.dtype)
    restored.append(path)
  taken = set(restored)
  unused = [p for p in flat_loaded if p not in taken]
  problems += [
    f"  {p}: in the checkpoint but not in the model"
    for p in unused
    if p not in flat_target and any(_under(p, e) for e in rule.exact)
  ]
  if problems:
    raise ValueError(
      f"{source}: the checkpoint's architecture does not match the config "
      f"({len(problems)} mismatched parameters):\n" + "\n".join(problems)
    )
  return traverse_util.unflatten_dict(merged, sep="/"), RestoreReport(restored, fresh, unused)
