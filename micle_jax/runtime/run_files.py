"""A run's workdir files beside its checkpoints, and the rule for reusing a workdir.

Every run writes `config.json` (its full config) when it starts. A workdir is reused — resumed
from its checkpoint, or skipped by a sweep because its results exist — only when the config that
made it matches the current one: "it has a checkpoint" or "it has results" is not enough, since
a run with another label fraction, learning rate or init would otherwise be continued or reported
as if it were this one. Keys that change how a run is operated but not what it computes may
differ (`RUNTIME_KEYS`, and every `data_dir`: data moved elsewhere is the same data); a resumed
run may also change its length (`LENGTH_KEYS`), with a warning, since the schedule then differs
from an uninterrupted run of either length. Anything else fails, naming the keys.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"  # a fine-tuning run's metrics, labels and what it started from
CONVERSION_FILE = "conversion.json"  # a converted SimCLRv2 checkpoint: what was found, `model`
PRETRAINING_FILE = "pretraining.json"  # a pretraining run's budget: steps, pairs and views seen
RUNTIME_KEYS = (
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "max_steps_per_run",
  "profile_steps",
)
LENGTH_KEYS = ("num_steps", "num_epochs")
# Keys that moved since workdirs were first written: such a config.json still describes its run.
# (Fine-tuning's top-level `task` joined the `labels` section that pretraining already had.)
MOVED_KEYS = {"task": ("labels", "task")}


def upgrade(stored: Mapping[str, Any]) -> dict[str, Any]:
  """A stored config with its moved keys (`MOVED_KEYS`) where the current schema has them."""
  out = json.loads(json.dumps(stored))
  for old, (section, key) in MOVED_KEYS.items():
    if old in out and isinstance(out.get(section), dict) and key not in out[section]:
      out[section][key] = out.pop(old)
  return out


def flatten(
  tree: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = ""
) -> dict[str, Any]:
  """{"optimizer": {"base_learning_rate": 1.0}} -> {"optimizer.base_learning_rate": 1.0}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping | ml_collections.ConfigDict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as the plain JSON values `config.json` holds."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def config_differences(
  stored: Mapping[str, Any], current: Mapping[str, Any], *, may_differ: Iterable[str] = ()
) -> list[str]:
  """Dotted keys whose values differ (or exist on one side only), except the allowed ones."""
  allowed = set(RUNTIME_KEYS) | set(may_differ)
  a, b = flatten(stored), flatten(current)
  keys = sorted(set(a) | set(b))
  return [
    k
    for k in keys
    if a.get(k, "<absent>") != b.get(k, "<absent>")
    and k not in allowed
    and not k.endswith("data_dir")
  ]


def check_reusable(
  workdir: epath.PathLike,
  config: ml_collections.ConfigDict,
  *,
  what: str,
  allow_length_change: bool,
) -> None:
  """Raises ValueError if `workdir/config.json` was written by another config.

  Args:
    workdir: the run's workdir (nothing is checked when it has no config.json).
    config: the config about to run.
    what: what reusing means here, for the message ("resume", "skip: results exist").
    allow_length_change: whether `LENGTH_KEYS` may differ (resuming: yes, with a warning).
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  stored = upgrade(json.loads(path.read_text()))
  current = config_dict(config)
  length = LENGTH_KEYS if allow_length_change else ()
  differing = config_differences(stored, current, may_differ=length)
  if differing:
    flat_stored, flat_current = flatten(stored), flatten(current)
    shown = ", ".join(
      f"{k}: {flat_stored.get(k, '<absent>')!r} -> {flat_current.get(k, '<absent>')!r}"
      for k in differing[:8]
    )
    more = f" and {len(differing) - 8} more" if len(differing) > 8 else ""
    raise ValueError(
      f"{workdir}: cannot {what}: its {CONFIG_FILE} was written by a different config "
      f"({shown}{more}). Use a new workdir, or delete this one to start over."
    )
  changed = config_differences(stored, current)
  if changed:
    logging.warning(
      "%s: %s with a changed run length (%s); the learning-rate schedule now differs from an "
      "uninterrupted run of either length",
      workdir,
      what,
      ", ".join(changed),
    )


def write_json(path: epath.PathLike, value: Any) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2))


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())
