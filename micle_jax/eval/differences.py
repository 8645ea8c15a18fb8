"""A study's arms and the differences between them, with hierarchical intervals (`arms.csv`,
`differences.csv`).

The claim a label-efficiency study makes is a difference: MICLe minus scratch, MICLe minus
SimCLR, at one label fraction, on one evaluation set. An *arm* is one init (scratch, simclr,
micle, ...) in one *cell*: the evaluation (its dataset, split and view filter), the label
fraction, and everything else that defines what a run computes (fine-tuning mode, labels task,
training views, aggregation). Its runs are grouped in two levels (`bootstrap.py`): by the network
fine-tuning started from (a pretraining run, identified by its workdir and seed; for scratch, the
seed of the random initialisation) and, within it, by the fine-tuning seed. The arm's value is the
mean over the first level of the mean over the second, and its interval (and a difference's)
resamples both levels and the evaluation units (patients), the units shared by both arms of a
comparison.

Every init is compared with `scratch`, `micle` with `simclr`, and, where the study has the
paper's baseline (`supervised`: fine-tuned from imported supervised ImageNet weights), every
pretrained init with it, when both exist in a cell. Each arm's `chain` says what its networks
were trained from (`chain`): "random init", "simclr", "ImageNet supervised resnet50
(FILE) → micle", ...
Runs that would claim the same place (cell, init, level-1 unit, seed) are refused, naming both
workdirs; so are runs of one arm and cell whose configs differ in anything but their seeds and
init, and runs of one cell that scored different images.
"""

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from micle_jax.eval import bootstrap, evaluation
from micle_jax.runtime import run_files

BASELINE = "scratch"
SUPERVISED = "supervised"  # the paper's baseline: imported supervised ImageNet weights
CELL = ("eval", "dataset", "eval_views", "fraction", "mode", "task", "views", "aggregation")
_INTERVALS = ("ci_low", "ci_high", "ci_low_cases", "ci_high_cases", "scope")
_DESCRIPTION = ("dataset", "mode", "task", "views")
ARM_COLUMNS = (
  ("eval", "fraction", "metric", "init", "value")
  + _INTERVALS
  + ("runs", "units", "sd_runs", "sd_units", "train_steps", "pretrain_steps", "pretrain_views_seen")
  + _DESCRIPTION
  + ("chain",)
)
COLUMNS = (
  ("eval", "fraction", "metric", "init", "baseline", "difference")
  + _INTERVALS
  + ("runs", "baseline_runs", "units", "baseline_units", "per_seed")
  + _DESCRIPTION
)
# Config keys in which two runs of one arm and cell may differ: what makes them replicates.
_REPLICATE_KEYS = ("init_from", "seed", "init_seed", "init_step")


def comparisons(inits: Sequence[str]) -> list[tuple[str, str]]:
  """(init, baseline) pairs: every init against scratch; every MICLe arm (`micle`, or a pair
  policy named `micle_<policy>`, e.g. `micle_study`) against simclr, and each policy against
  `micle`; every pretrained init against the supervised ImageNet baseline."""
  names = set(inits)
  pairs = [(i, BASELINE) for i in sorted(names) if i != BASELINE and BASELINE in names]
  micle = sorted(n for n in names if n == "micle" or n.startswith("micle_"))
  if "simclr" in names:
    pairs += [(m, "simclr") for m in micle]
  if "micle" in names:
    pairs += [(m, "micle") for m in micle if m != "micle"]
  if SUPERVISED in names:
    pairs += [(i, SUPERVISED) for i in sorted(names - {BASELINE, SUPERVISED})]
  return pairs


def _record(folder: str, name: str) -> dict[str, Any] | None:
  """A run file of a checkpoint's folder, or None where it is absent or cannot be reached (a
  table is still written when a remote init is out of reach: the chain then names the folder)."""
  try:
    return run_files.read_json_if_exists(run_files.run_dir(folder) / name)
  except Exception:  # noqa: BLE001 -- e.g. gs:// without credentials
    return None


def describe_weights(path: str) -> str:
  """Imported or converted weights in words (their conversion.json), else the folder's name."""
  report = _record(path, run_files.CONVERSION_FILE)
  if report is not None and report.get("converter") == "import_torch":
    file = epath.Path(report["source"]["file"]).name
    return f"ImageNet supervised {report['architecture']} ({file})"
  if report is not None and "depth" in report:  # SimCLRv2, in its folders' naming (r50_1x_sk0)
    width = report.get("width", 1)
    width = int(width) if float(width).is_integer() else width
    return f"SimCLRv2 r{report['depth']}_{width}x_sk{int(report.get('sk_ratio', 0) > 0)}"
  return epath.Path(path).name


def chain(results: Mapping[str, Any]) -> str:
  """What a fine-tuning run's network was trained from, in order: "random init", the weights it
  was fine-tuned from, or its pretraining's method after that pretraining's own `init_from`."""
  init = results["init_from"]
  if init in ("", "scratch"):
    return "random init"
  method = (results.get("pretraining") or {}).get("method")
  config = _record(init, run_files.CONFIG_FILE) if method else None
  if config is None:
    return method or describe_weights(init)
  upstream = config.get("init_from") or ""
  return f"{describe_weights(upstream)} → {method}" if upstream else method


@dataclasses.dataclass(frozen=True)
class _Place:
  """Where one run's evaluation sits: its cell, arm, level-1 unit and seed."""

  cell: tuple
  init: str
  unit: str  # the level-1 label, e.g. "p0"
  seed: int


def init_unit(results: Mapping[str, Any]) -> tuple[str, str]:
  """(label, identity) of the network a run started from: its pretraining (the seed recorded in
  its pretraining.json, and its workdir), or for scratch the seed of the random initialisation.
  Runs written before `init_seed` existed seeded their initialisation with `seed`."""
  seed = results.get("init_seed")
  if results["init_from"] in ("", "scratch"):
    seed = results["seed"] if seed is None else seed
    return f"p{seed}", f"scratch:{seed}"
  pretraining_seed = (results.get("pretraining") or {}).get("seed")
  label = (
    f"p{pretraining_seed}"
    if pretraining_seed is not None
    else epath.Path(results["init_from"]).name
  )
  return label, str(results["init_from"])


def _place(run: Mapping[str, Any], eval_name: str) -> _Place:
  r = run["results"]
  evaluated = r["eval"][eval_name]
  cell = (
    eval_name,
    evaluated.get("dataset", ""),
    evaluated.get("views", ""),
    float(r["label_fraction"]),
    r.get("mode", ""),
    r.get("task", ""),
    r.get("views", ""),
    r["eval_aggregation"],
  )
  return _Place(cell, run["init"], init_unit(r)[0], int(r["seed"]))


def _check_replicates(first: Mapping[str, Any], other: Mapping[str, Any]) -> None:
  """Raises ValueError unless two runs of one arm and cell differ only in seeds and init."""
  a, b = (epath.Path(r["workdir"]) / run_files.CONFIG_FILE for r in (first, other))
  if not (a.exists() and b.exists()):
    return
  differing = run_files.config_differences(
    run_files.upgrade(run_files.read_json(a)),
    run_files.upgrade(run_files.read_json(b)),
    may_differ=_REPLICATE_KEYS + ("label_fraction",),
  )
  if differing:
    raise ValueError(
      f"{first['workdir']} and {other['workdir']} are runs of one arm ({first['init']}) but "
      f"their configs differ in {differing[:8]}: put them under different roots or inits"
    )


def group_runs(runs: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, dict]]:
  """{cell: {init: {unit label: {seed: run}}}}, refusing runs that claim one place, one unit
  label given to two different networks, and arms whose runs are not replicates."""
  cells: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
  claimed: dict[_Place, Mapping[str, Any]] = {}
  identity: dict[tuple, tuple[str, Mapping[str, Any]]] = {}
  for run in runs:
    for eval_name in run["results"]["eval"]:
      place = _place(run, eval_name)
      if place in claimed:
        raise ValueError(
          f"{claimed[place]['workdir']} and {run['workdir']} both claim {place.init} "
          f"{place.unit} seed {place.seed} of {place.cell}: remove one, or put them under "
          "different roots"
        )
      claimed[place] = run
      key = (place.cell, place.init, place.unit)
      network = init_unit(run["results"])[1]
      if key in identity and identity[key][0] != network:
        raise ValueError(
          f"{identity[key][1]['workdir']} and {run['workdir']}: two different networks "
          f"({identity[key][0]}, {network}) are both {place.init} {place.unit}"
        )
      identity.setdefault(key, (network, run))
      arm = cells[place.cell][place.init]
      if arm:
        _check_replicates(next(iter(next(iter(arm.values())).values())), run)
      arm.setdefault(place.unit, {})[place.seed] = run
  return {cell: dict(inits) for cell, inits in sorted(cells.items())}


class _Predictions:
  """Each run's predictions and metrics function for one evaluation, loaded once."""

  def __init__(self):
    self.cache: dict = {}

  def __call__(self, run: Mapping[str, Any], eval_name: str):
    key = (run["workdir"], eval_name)
    if key not in self.cache:
      preds = evaluation.load_predictions(evaluation.predictions_path(run["workdir"], eval_name))
      units, fn = evaluation.metrics_fn(preds, run["results"]["eval_aggregation"])
      self.cache[key] = (preds, units, fn)
    return self.cache[key]


def _arms(cell: tuple, inits: Mapping[str, Mapping[str, Mapping[int, Any]]], loaded):
  """The cell's `bootstrap.Arm`s and its evaluation units, checking every run scored the same
  images."""
  eval_name = cell[0]
  reference = None
  arms = []
  for init, units in sorted(inits.items()):
    groups = {}
    for label, seeds in sorted(units.items()):
      fns = []
      for _, run in sorted(seeds.items()):
        preds, unit_ids, fn = loaded(run, eval_name)
        if reference is None:
          reference = (run, preds, unit_ids)
        elif not evaluation.same_rows(reference[1], preds) or unit_ids != reference[2]:
          raise ValueError(
            f"{reference[0]['workdir']} and {run['workdir']}: {eval_name} predictions cover "
            "different images, so they cannot be compared"
          )
        fns.append(fn)
      groups[label] = fns
    arms.append(bootstrap.Arm(init, groups))
  return arms, len(reference[2])


def _budget(
  inits: Mapping[str, Mapping[str, Mapping[int, Any]]], init: str, chains: Mapping[str, str]
) -> dict[str, Any]:
  """The arm's chain, its fine-tuning steps and its pretraining's steps and views (the mean over
  runs)."""
  arm = [run for seeds in inits[init].values() for run in seeds.values()]
  runs = [run["results"] for run in arm]

  def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None

  pretraining = [r.get("pretraining") or {} for r in runs]
  return {
    "chain": " | ".join(sorted({chains[run["workdir"]] for run in arm})),
    "train_steps": mean([r.get("step") for r in runs]),
    "pretrain_steps": mean([p.get("step") for p in pretraining]),
    "pretrain_views_seen": mean([p.get("views_seen") for p in pretraining]),
  }


def _cell_columns(cell: tuple) -> dict[str, Any]:
  eval_name, dataset, _, fraction, mode, task, views, _ = cell
  return {
    "eval": eval_name,
    "fraction": fraction,
    "dataset": dataset,
    "mode": mode,
    "task": task,
    "views": views,
  }


def compare(
  runs: Sequence[Mapping[str, Any]], *, num_samples: int = 1000, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(arm rows, difference rows) of every cell the runs fill (ARM_COLUMNS, COLUMNS).

  Args:
    runs: {"init", "workdir", "results"} per fine-tuning run (`results` is its results.json).
    num_samples: bootstrap draws.
    seed: the bootstrap's seed.

  Raises:
    ValueError: naming the workdirs, when runs claim one place, are not replicates, or scored
      different images.
    FileNotFoundError: naming a run's missing predictions file.
  """
  loaded = _Predictions()
  chains = {run["workdir"]: chain(run["results"]) for run in runs}  # reads run files once a run
  arm_rows, diff_rows = [], []
  for cell, inits in group_runs(runs).items():
    arms, num_units = _arms(cell, inits, loaded)
    pairs = comparisons(list(inits))
    per_arm, diffs = bootstrap.hierarchical(
      arms, pairs, num_units, num_samples=num_samples, seed=seed
    )
    columns = _cell_columns(cell)
    for init, stats in per_arm.items():
      for metric, m in stats.items():
        row = columns | {"metric": metric, "init": init} | m | _budget(inits, init, chains)
        arm_rows.append({k: row.get(k) for k in ARM_COLUMNS})
    for (init, baseline), stats in diffs.items():
      for metric, m in stats.items():
        per_seed = " ".join(f"{k}:{v:+.3f}" for k, v in sorted(m.pop("per_unit").items()))
        row = columns | {"metric": metric, "init": init, "baseline": baseline} | m
        row["per_seed"] = per_seed
        diff_rows.append({k: row.get(k) for k in COLUMNS})
  return (
    [evaluation.finite_or_none(r) for r in arm_rows],
    [evaluation.finite_or_none(r) for r in diff_rows],
  )
