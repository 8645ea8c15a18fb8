"""A run's workdir files beside its checkpoints, and the rule for reusing a workdir.

Every run writes `config.json` (its full config) when it starts. A workdir is reused — resumed
from its checkpoint, or skipped by a sweep because its results exist — only when the config that
made it matches the current one: "it has a checkpoint" or "it has results" is not enough, since
a run with another label fraction, learning rate or init would otherwise be continued or reported
as if it were this one. Keys that change how a run is operated but not what it computes may
differ (`RUNTIME_KEYS`, and every `data_dir`: data moved elsewhere is the same data); a resumed
run may also change its length (`LENGTH_KEYS`), with a warning, since the schedule then differs
from an uninterrupted run of either length. Anything else fails, naming the keys.

What the data *is* is checked apart from where it lies: each run writes `data.json`, the
fingerprints of the datasets it reads (`data.fingerprint`), and a workdir is reused only when
they match the data the run would read now, whatever its `data_dir`.
"""

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"  # a fine-tuning run's metrics, labels and what it started from
CONVERSION_FILE = "conversion.json"  # a converted SimCLRv2 checkpoint: what was found, `model`
PRETRAINING_FILE = "pretraining.json"  # a pretraining run's budget: steps, pairs and views seen
DATA_FILE = "data.json"  # fingerprints of the datasets a run reads
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
# Keys added since workdirs were first written, with the value every earlier run computed with.
ADDED_KEYS = {("model", "variant"): "simclr"}


def upgrade(stored: Mapping[str, Any]) -> dict[str, Any]:
  """A stored config with its moved keys (`MOVED_KEYS`) where the current schema has them, and
  the keys added since (`ADDED_KEYS`) at the value the run used."""
  out = json.loads(json.dumps(stored))
  for old, (section, key) in MOVED_KEYS.items():
    if old in out and isinstance(out.get(section), dict) and key not in out[section]:
      out[section][key] = out.pop(old)
  for (section, key), value in ADDED_KEYS.items():
    if isinstance(out.get(section), dict):
      out[section].setdefault(key, value)
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
  data: Mapping[str, Any] | None = None,
) -> None:
  """Raises ValueError if `workdir/config.json` was written by another config, or
  `workdir/data.json` by other data.

  Args:
    workdir: the run's workdir (nothing is checked when it has no config.json).
    config: the config about to run.
    what: what reusing means here, for the message ("resume", "skip: results exist").
    allow_length_change: whether `LENGTH_KEYS` may differ (resuming: yes, with a warning).
    data: the fingerprints of the data the run reads now ({role: fingerprint}); compared,
      locations aside, with the workdir's data.json (a workdir without one is reused with a
      warning that its data cannot be checked).
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  if data is not None:
    check_same_data(workdir, data, what=what)
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


def read_json_if_exists(path: epath.PathLike) -> Any | None:
  """`read_json(path)`, or None where there is no such file (a run that has not written it)."""
  path = epath.Path(path)
  return read_json(path) if path.exists() else None


def _without_locations(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _without_locations(v) for k, v in tree.items() if not k.endswith("data_dir")}
  return tree


def check_same_data(workdir: epath.PathLike, data: Mapping[str, Any], *, what: str) -> None:
  """Raises ValueError naming the keys when `workdir/data.json` describes other data than `data`
  (where the data lies may differ); warns when the workdir recorded none."""
  path = epath.Path(workdir) / DATA_FILE
  if not path.exists():
    logging.warning(
      "%s: no %s (written before runs recorded their data): cannot check that it was trained on "
      "the data it would read now; reusing it to %s",
      workdir,
      DATA_FILE,
      what,
    )
    return
  stored = flatten(_without_locations(read_json(path)))
  current = flatten(_without_locations(json.loads(json.dumps(data))))
  differing = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
  if differing:
    raise ValueError(
      f"{workdir}: cannot {what}: it was trained on other data than the config now reads "
      f"(differing: {', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''}). Use a new "
      "workdir, or delete this one to start over."
    )


def short(path: epath.PathLike) -> str:
  """`path` relative to the working directory when it lies below it (for log lines)."""
  text = str(path)
  cwd = os.getcwd().rstrip("/") + "/"
  return text[len(cwd) :] if text.startswith(cwd) else text


def run_dir(path: epath.PathLike) -> epath.Path:
  """The folder holding config.json/conversion.json for a workdir, its `checkpoints/` folder or
  a step folder in it."""
  path = epath.Path(path)
  if path.name == "checkpoints":
    return path.parent
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent
  return path


def recorded_model(path: epath.PathLike) -> tuple[epath.Path, dict[str, Any]] | None:
  """(file, `model` section) that a checkpoint's folder records: a conversion's or import's
  conversion.json, else a run's config.json (upgraded); None where neither is there."""
  folder = run_dir(path)
  for name in (CONVERSION_FILE, CONFIG_FILE):
    file = folder / name
    if file.exists():
      stored = read_json(file)
      model = upgrade(stored).get("model") if name == CONFIG_FILE else stored.get("model")
      return file, dict(model or {})
  return None


def check_init_variant(init_from: str, variant: str) -> None:
  """Raises ValueError when `init_from` records a model variant other than `variant`.

  Weights imported from torchvision compute what they were trained to compute only in the
  `torchvision` variant, and ResNet-50 and deeper have the same parameters in both, so a wrong
  `model.variant` would otherwise load silently and compute something else.
  """
  if not init_from or init_from == "scratch":
    return
  found = recorded_model(init_from)
  if found is None:
    return
  file, model = found
  recorded = model.get("variant", "simclr")
  if recorded != variant:
    raise ValueError(
      f"init_from={init_from}: its weights compute as model.variant={recorded!r} ({file}), "
      f"but this config has model.variant={variant!r}; set --config.model.variant={recorded}"
    )
