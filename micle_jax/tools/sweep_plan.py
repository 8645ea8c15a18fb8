"""A sweep's plan: its runs (init × label fraction × seed), their configs and their commands.

Every run of a sweep trains with the same config but for the swept keys (`SWEPT_KEYS`) and, where
an init needs its own fine-tuning hyperparameters (a scratch baseline usually wants a larger
learning rate than a pretrained network), that init's overrides: tuned on data the reported
table does not use, and written into each run's config and command.
"""

import copy
import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from micle_jax import finetune

SCRATCH = "scratch"
# The config keys a sweep sets per run; overriding them for the whole sweep is an error.
SWEPT_KEYS = ("init_from", "label_fraction", "seed", "init_seed")


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tuning run of a sweep: where it writes, and the config it trains with."""

  init: str  # the init's name: the first path component under the sweep root
  init_from: str
  label_fraction: float
  seed: int
  workdir: str
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
  overrides: tuple[tuple[str, Any], ...] = ()  # this init's own config overrides
  init_seed: int | None = None  # the random initialisation's seed, when not `seed`


@dataclasses.dataclass(frozen=True)
class Start:
  """What one level-1 unit of an arm fine-tunes from: a pretraining, or a random initialisation.

  `label` names the unit in the workdir (`ROOT/<init>/<label>/f<fraction>/s<seed>`; "" for a sweep
  with one start per init: `ROOT/<init>/f<fraction>/s<seed>`).
  """

  init_from: str
  label: str = ""
  init_seed: int | None = None


def parse_inits(items: Sequence[str]) -> dict[str, str]:
  """["scratch", "simclr=PATH", ...] -> {name: init_from}; a bare name is allowed for scratch."""
  inits: dict[str, str] = {}
  for item in items:
    name, sep, path = (s.strip() for s in item.partition("="))
    if not sep and name != SCRATCH:
      raise ValueError(f"init {item!r}: expected NAME=PATH (or {SCRATCH!r})")
    if not sep or not path:
      path = SCRATCH
    if not name or "/" in name or name in (".", ".."):
      raise ValueError(f"init {item!r}: the name must be one path component")
    if name in inits:
      raise ValueError(f"init name {name!r} given twice")
    inits[name] = path
  if not inits:
    raise ValueError("no inits given")
  return inits


def parse_fractions(items: Sequence[str]) -> list[float]:
  """["0.1", "1"] -> [0.1, 1.0]; each must be in (0, 1], none twice."""
  fractions = [float(f) for f in items]
  for f in fractions:
    if not 0.0 < f <= 1.0:
      raise ValueError(f"label fraction {f} must be in (0, 1]")
  if len(set(fractions)) != len(fractions) or not fractions:
    raise ValueError(f"label fractions {fractions}: need at least one, none twice")
  return fractions


def parse_seeds(items: Sequence[str]) -> list[int]:
  """["0", "1"] -> [0, 1]; none twice."""
  seeds = [int(s) for s in items]
  if len(set(seeds)) != len(seeds) or not seeds:
    raise ValueError(f"seeds {seeds}: need at least one, none twice")
  return seeds


def run_workdir(
  root: epath.PathLike, init: str, label_fraction: float, seed: int, unit: str = ""
) -> str:
  """`root/<init>[/<unit>]/f<fraction>/s<seed>`, e.g. `root/micle/f0.1/s0`, `root/micle/p1/f0.1/s0`."""
  base = epath.Path(root) / init / unit if unit else epath.Path(root) / init
  return str(base / f"f{float(label_fraction)}" / f"s{int(seed)}")


def plan(
  config: ml_collections.ConfigDict,
  root: epath.PathLike,
  *,
  inits: Mapping[str, str | Sequence[Start]],
  fractions: Sequence[float],
  seeds: Sequence[int],
  init_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Run]:
  """inits × their starts × fractions × seeds (in that order), each with its own validated copy
  of `config`.

  `inits`: {name: init_from} (one start each), or {name: [Start, ...]} (a study's arms: one start
  per pretraining seed, or per initialisation seed for scratch).
  `init_overrides`: {init name: {dotted config key: value}} applied to that init's runs.
  """
  init_overrides = dict(init_overrides or {})
  unknown = sorted(set(init_overrides) - set(inits))
  if unknown:
    raise ValueError(f"init overrides for {unknown}, which are not among the inits {list(inits)}")
  runs = []
  for init, starts in inits.items():
    starts = [Start(starts)] if isinstance(starts, str) else list(starts)
    overrides = tuple(dict(init_overrides.get(init, {})).items())
    for start in starts:
      for fraction in fractions:
        for seed in seeds:
          run_config = copy.deepcopy(config)
          for key, value in overrides:
            set_key(run_config, key, value, where=f"init override {init}.{key}")
          run_config.init_from = start.init_from
          run_config.label_fraction = float(fraction)
          run_config.seed = int(seed)
          if start.init_seed is not None:
            run_config.init_seed = int(start.init_seed)
          finetune.validate(run_config)  # Fails before the first run trains, not hours in.
          runs.append(
            Run(
              init=init,
              init_from=start.init_from,
              label_fraction=float(fraction),
              seed=int(seed),
              workdir=run_workdir(root, init, fraction, seed, start.label),
              config=run_config,
              overrides=overrides,
              init_seed=start.init_seed,
            )
          )
  return runs


def flag_value(value: Any) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def command(
  run_: Run, config_arg: str, overrides: Mapping[str, Any] | None = None, python: str = "python"
) -> str:
  """The shell command (shlex-quoted) that trains `run_` with `python -m micle_jax.finetune`.

  Args:
    run_: the run.
    config_arg: the `--config` value, e.g. "configs/finetune_cxr.py:linear".
    overrides: further `--config.key=value` overrides (not the swept keys), in order.
    python: the interpreter to call.
  """
  overrides = dict(overrides or {})
  clash = sorted(set(overrides) & set(SWEPT_KEYS))
  if clash:
    raise ValueError(f"--config.{clash[0]} is set by the sweep itself; drop the override")
  args = [python, "-m", "micle_jax.finetune", f"--config={config_arg}", f"--workdir={run_.workdir}"]
  args += [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]
  args += [f"--config.{key}={flag_value(value)}" for key, value in run_.overrides]
  args += [
    f"--config.init_from={run_.init_from}",
    f"--config.label_fraction={run_.label_fraction}",
    f"--config.seed={run_.seed}",
  ]
  if run_.init_seed is not None:
    args.append(f"--config.init_seed={run_.init_seed}")
  return shlex.join(args)


def set_key(config: ml_collections.ConfigDict, key: str, value: Any, *, where: str) -> None:
  """Sets the dotted `key` of `config` (which must exist), converting a string to its type."""
  if key.split(".")[0] in SWEPT_KEYS:
    raise ValueError(f"{where}: {key} is set by the sweep itself")
  *sections, name = key.split(".")
  node = config
  try:
    for section in sections:
      node = node[section]
    current = node[name]
  except (KeyError, AttributeError) as e:
    raise ValueError(f"{where}: config has no key {key!r}") from e
  if isinstance(value, str) and not isinstance(current, str):
    value = _parse_like(current, value, where)
  node[name] = value


def _parse_like(current: Any, text: str, where: str) -> Any:
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{where}: {text!r} is not a boolean")
    return text.lower() in ("true", "1")
  try:
    return type(current)(text)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {text!r} is not a {type(current).__name__}") from e


def parse_init_overrides(items: Sequence[str]) -> dict[str, dict[str, str]]:
  """["scratch:optimizer.base_learning_rate=1.0", ...] -> {"scratch": {key: "1.0"}}."""
  out: dict[str, dict[str, str]] = {}
  for item in items:
    init, colon, assignment = item.partition(":")
    key, equals, value = assignment.partition("=")
    if not colon or not equals or not init or not key:
      raise ValueError(f"init override {item!r}: expected INIT:KEY=VALUE")
    out.setdefault(init.strip(), {})[key.strip()] = value.strip()
  return out
