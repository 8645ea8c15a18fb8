"""A sweep's results at a glance: the arms and differences tables and the label-efficiency plot.

The notebooks (notebooks/) draw the full figures; this is what the demo and a terminal show. The
notebooks' readers are here too: `read_arms` reads `arms.csv` (each arm's value with its interval
over training runs and patients), `read_results` the per-run `results.csv`.
"""

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from micle_jax.eval import bootstrap

# The metrics the tables show: mean AUC (multi-label), top-1 and top-3 accuracy (multi-class, the
# paper's dermatology metrics); the plot shows the first of each kind.
MAIN_METRICS = ("mean_auc", "top1", "top3")
PLOTTED_METRICS = ("mean_auc", "top1")
# The metric the notebooks show for each task: the main metric of its kind (multi-label or not).
DEFAULT_METRIC = {"chexpert": "mean_auc", "nih": "mean_auc", "multiclass": "top1"}
# The CSV's float columns; an empty cell (an undefined metric) is read as NaN.
_FLOAT_COLUMNS = ("label_fraction", "value", "ci_low", "ci_high")


def _main(rows: Sequence[Mapping[str, Any]], value: str) -> list[Mapping[str, Any]]:
  return [r for r in rows if r["metric"] in MAIN_METRICS and r[value] not in (None, "")]


def _count(value: Any) -> str:
  return "-" if value in (None, "") else f"{float(value):,.0f}"


def _interval(row: Mapping[str, Any], sign: str = "") -> str:
  low, high = row.get("ci_low"), row.get("ci_high")
  if low in (None, "") or high in (None, ""):
    return "[undefined]"
  return f"[{float(low):{sign}.3f}, {float(high):{sign}.3f}]"


def _sd(value: Any) -> str:
  return "-" if value in (None, "") else f"{float(value):.3f}"


def _conditional(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  return sorted({r["scope"] for r in rows if r["scope"] != bootstrap.ACROSS_RUNS})


def _given(scope: str) -> str:
  """A conditional scope in words: what the interval holds fixed."""
  names = scope.removeprefix(bootstrap.GIVEN_ONE_RUN).split(", ")
  special = {
    "scratch": "scratch's one initialisation",
    "supervised": "the one set of imported ImageNet weights",
  }
  parts = [special.get(n, f"the one pretraining run of {n}") for n in names]
  return "over patients only, given " + " and ".join(parts)


def _scopes(rows: Sequence[Mapping[str, Any]]) -> str:
  """The footnotes saying what the intervals cover, where some rest on a single run."""
  return "".join(f"\n  ({i + 1}) {_given(s)}" for i, s in enumerate(_conditional(rows)))


def _mark(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
  conditional = _conditional(rows)
  return f"({conditional.index(row['scope']) + 1})" if row["scope"] in conditional else ""


def _with_cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """`rows` with the init named by its cell too ("micle/linear") where the rows hold several
  modes, tasks or views, so that no two printed lines look alike."""
  keys = [k for k in ("mode", "task", "views") if len({r.get(k) for r in rows}) > 1]
  out = []
  for r in rows:
    r = dict(r)
    r["init"] = "/".join([str(r["init"])] + [str(r[k]) for k in keys])
    if "baseline" in r:
      r["baseline"] = "/".join([str(r["baseline"])] + [str(r[k]) for k in keys])
    out.append(r)
  return out


def table(arm_rows: Sequence[Mapping[str, Any]]) -> str:
  """One line per (init, eval dataset, label fraction) of `differences.compare`'s arm rows: the
  main metric with its hierarchical 95% CI, the runs and level-1 units behind it, the SD between
  runs, the fine-tuning steps, and the init's pretraining steps and views seen."""
  rows = sorted(
    _with_cells(_main(arm_rows, "value")),
    key=lambda r: (r["init"], r["eval"], float(r["fraction"])),
  )
  w = max([10] + [len(str(r["init"])) for r in rows])  # the init column fits every name
  lines = [
    "Each arm: the mean over its pretraining runs (scratch: initialisation seeds) of the mean over"
    " their fine-tuning seeds; 95% CI resampling runs and patients:",
    f"{'init':<{w}} {'eval':<16} {'fraction':>8}  {'metric':<8} {'value':>6}  {'95% CI':<16}"
    f" {'runs':>4} {'units':>5} {'sd runs':>7} {'ft steps':>8} {'pretrain steps':>14}"
    f" {'pretrain views':>14}",
  ]
  for r in rows:
    lines.append(
      f"{r['init']:<{w}} {r['eval']:<16} {float(r['fraction']):>8.2f}  {r['metric']:<8} "
      f"{float(r['value']):>6.3f}  {_interval(r):<16} {int(r['runs']):>4} {int(r['units']):>5}"
      f" {_sd(r['sd_runs']):>7} {_count(r['train_steps']):>8} {_count(r['pretrain_steps']):>14}"
      f" {_count(r['pretrain_views_seen']):>14} {_mark(r, rows)}".rstrip()
    )
  return "\n".join(lines) + _scopes(rows) + _chains(rows)


def _chains(rows: Sequence[Mapping[str, Any]]) -> str:
  """What each arm was trained from, where that is more than its name says (imported or
  converted weights)."""
  chains = {str(r["init"]).split("/")[0]: r.get("chain") or "" for r in rows}
  plain = {"scratch": "random init"}
  if all(c in ("", plain.get(i, i)) for i, c in chains.items()):
    return ""
  return "\nChains:" + "".join(f"\n  {i}: {c}" for i, c in sorted(chains.items()) if c)


def significant(row: Mapping[str, Any]) -> bool:
  """Whether a difference's 95% CI excludes 0."""
  low, high = row.get("ci_low"), row.get("ci_high")
  if low in (None, "") or high in (None, ""):
    return False
  return float(low) > 0 or float(high) < 0


def differences_table(diffs: Sequence[Mapping[str, Any]]) -> str:
  """The differences of the main metric (`differences.compare`'s rows), with hierarchical CIs,
  the runs of each arm, and each pretraining seed's own difference."""
  main = _with_cells(_main(diffs, "difference"))
  w = max([8] + [len(str(d[k])) for d in main for k in ("init", "baseline")])  # fits every name
  lines = [
    "Differences, init − baseline (95% CI resampling each arm's runs and the same patients for"
    " both; * = the CI excludes 0; runs = init/baseline):",
    f"{'eval':<16} {'fraction':>8}  {'metric':<8} {'init':<{w}} {'baseline':<{w}} "
    f"{'difference':>10}  {'95% CI':<17}   {'runs':>7}  per pretraining seed",
  ]
  if not main:
    return "\n".join(lines + ["(no pairs: a difference needs two inits in one cell)"])
  for d in main:
    mark = "*" if significant(d) else " "
    runs = f"{int(d['runs'])}/{int(d['baseline_runs'])}"
    lines.append(
      f"{d['eval']:<16} {float(d['fraction']):>8.2f}  {d['metric']:<8} {d['init']:<{w}} "
      f"{d['baseline']:<{w}} {float(d['difference']):>+10.3f}  {_interval(d, '+'):<17} {mark} "
      f"{runs:>7}  {d['per_seed'] or '-'} {_mark(d, main)}".rstrip()
    )
  return "\n".join(lines) + _scopes(main)


def plot_label_efficiency(arm_rows: Sequence[Mapping[str, Any]], path: epath.PathLike) -> None:
  """In-distribution metric vs label fraction, one curve per init with its hierarchical CI band;
  saved as PNG."""
  import matplotlib  # In requirements.txt; a bare install of the package may lack it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [
    r
    for r in _main(arm_rows, "value")
    if r["eval"] == "in_distribution" and r["metric"] in PLOTTED_METRICS
  ]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for init in sorted({r["init"] for r in rows}):
    points = sorted((float(r["fraction"]), r) for r in rows if r["init"] == init)
    xs = [x for x, _ in points]
    ax.plot(xs, [float(r["value"]) for _, r in points], marker="o", label=init)
    ax.fill_between(
      xs, [_float(r["ci_low"]) for _, r in points], [_float(r["ci_high"]) for _, r in points],
      alpha=0.2,
    )  # fmt: skip
  metric = rows[0]["metric"] if rows else "metric"
  ax.set(
    xlabel="label fraction (of training patients)",
    ylabel=metric,
    title="Label efficiency (in distribution; 95% CI over runs and patients)",
  )
  ax.title.set_fontsize("small")
  ax.legend()
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def _float(value: Any) -> float:
  return math.nan if value in (None, "") else float(value)


def read_results(path: epath.PathLike) -> list[dict[str, Any]]:
  """The rows of a sweep's CSV (`sweep collect --out`), numbers parsed.

  Args:
    path: the CSV, local or gs://.

  Returns:
    One dict per row, keyed by the header; `label_fraction`, `value`, `ci_low` and `ci_high` are
    floats (NaN for an empty cell, an undefined metric), `seed` an int, the rest strings.

  Raises:
    ValueError: naming `path` when the CSV has no rows.
  """
  rows = list(csv.DictReader(io.StringIO(epath.Path(path).read_text())))
  if not rows:
    raise ValueError(f"{path} has no rows: has any run of the sweep finished?")
  for row in rows:
    for key in _FLOAT_COLUMNS:
      row[key] = float(row[key]) if row[key] else math.nan
    row["seed"] = int(row["seed"])
  return rows


def nan_mean(values: Sequence[float]) -> float:
  """The mean of the defined (non-NaN) values; NaN if none is."""
  array = np.asarray(values, dtype=float)
  array = array[~np.isnan(array)]
  return float(array.mean()) if array.size else math.nan


def read_arms(path: epath.PathLike) -> list[dict[str, Any]]:
  """The rows of `arms.csv` (`sweep collect`): each arm's value and hierarchical CI per cell.

  `fraction`, `value`, the `ci_*` and `sd_*` columns are floats (NaN when empty); `runs` and
  `units` ints. Raises ValueError naming `path` when it has no rows.
  """
  rows = list(csv.DictReader(io.StringIO(epath.Path(path).read_text())))
  if not rows:
    raise ValueError(f"{path} has no rows: has any run of the sweep finished?")
  for row in rows:
    for key in ("fraction", "value", "ci_low", "ci_high", "ci_low_cases", "ci_high_cases"):
      row[key] = _float(row[key])
    for key in ("sd_runs", "sd_units"):
      row[key] = _float(row[key])
    row["runs"], row["units"] = int(row["runs"]), int(row["units"])
  return rows
