"""A sweep's results at a glance: a text table and the label-efficiency plot (from `collect` rows).

The notebooks (notebooks/) draw the full figures; this is what the demo and a terminal show. The
notebooks' helpers are here too: `read_results` reads the CSV that `sweep collect` writes, and
`seed_stats` averages a group of its rows over seeds.
"""

import collections
import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

MAIN_METRICS = ("mean_auc", "top1")
# The metric the notebooks show for each task: the main metric of its kind (multi-label or not).
DEFAULT_METRIC = {"chexpert": "mean_auc", "nih": "mean_auc", "multiclass": "top1"}
# The CSV's float columns; an empty cell (an undefined metric) is read as NaN.
_FLOAT_COLUMNS = ("label_fraction", "value", "ci_low", "ci_high")


def _main_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  return [r for r in rows if r["metric"] in MAIN_METRICS and r["value"] not in (None, "")]


def _mean(group: Sequence[Mapping[str, Any]], key: str) -> float | None:
  values = [float(r[key]) for r in group if r.get(key) not in (None, "")]
  return statistics.fmean(values) if values else None


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
  """(init, eval, fraction) -> means over seeds of the main metric, its CI, and the budgets."""
  groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in _main_rows(rows):
    groups[(r["init"], r["eval"], float(r["label_fraction"]))].append(r)
  out = {}
  for key, group in sorted(groups.items()):
    out[key] = {
      "value": _mean(group, "value"),
      "ci_low": _mean(group, "ci_low"),
      "ci_high": _mean(group, "ci_high"),
      "seeds": len(group),
      "metric": group[0]["metric"],
      "train_steps": _mean(group, "train_steps"),
      "pretrain_steps": _mean(group, "pretrain_steps"),
      "pretrain_views_seen": _mean(group, "pretrain_views_seen"),
    }
  return out


def _count(value: float | None) -> str:
  return "-" if value is None else f"{value:,.0f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line per (init, eval dataset, label fraction): metric [95% CI] averaged over seeds, the
  fine-tuning steps, and the init's pretraining steps and views seen."""
  lines = [
    f"{'init':<10} {'eval':<16} {'fraction':>8}  {'metric':<8} {'value':>6}  {'95% CI':<16}"
    f" {'seeds':>5} {'ft steps':>8} {'pretrain steps':>14} {'pretrain views':>14}"
  ]
  for (init, eval_name, fraction), s in summarize(rows).items():
    lines.append(
      f"{init:<10} {eval_name:<16} {fraction:>8.2f}  {s['metric']:<8} "
      f"{s['value']:>6.3f}  [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  {s['seeds']:>5}"
      f" {_count(s['train_steps']):>8} {_count(s['pretrain_steps']):>14}"
      f" {_count(s['pretrain_views_seen']):>14}"
    )
  return "\n".join(lines)


def significant(row: Mapping[str, Any]) -> bool:
  """Whether a difference's 95% CI excludes 0."""
  low, high = row.get("ci_low"), row.get("ci_high")
  if low in (None, "") or high in (None, ""):
    return False
  return float(low) > 0 or float(high) < 0


def differences_table(diffs: Sequence[Mapping[str, Any]]) -> str:
  """The paired differences of the main metric (from `differences.paired_differences` rows)."""
  lines = [
    "Paired differences, init − baseline (mean over seeds; paired-bootstrap 95% CI over the same "
    "cases; * = the CI excludes 0):",
    f"{'eval':<16} {'fraction':>8}  {'metric':<8} {'init':<8} {'baseline':<8} "
    f"{'difference':>10}  {'95% CI':<17} {'seeds':>5}",
  ]
  main = [d for d in diffs if d["metric"] in MAIN_METRICS and d["difference"] not in (None, "")]
  if not main:
    return "\n".join(lines + ["(no pairs: a difference needs two inits with a common seed)"])
  for d in main:
    mark = "*" if significant(d) else " "
    lines.append(
      f"{d['eval']:<16} {float(d['fraction']):>8.2f}  {d['metric']:<8} {d['init']:<8} "
      f"{d['baseline']:<8} {float(d['difference']):>+10.3f}  "
      f"[{float(d['ci_low']):+.3f}, {float(d['ci_high']):+.3f}] {mark} {int(d['seeds']):>4}"
    )
  return "\n".join(lines)


def plot_label_efficiency(rows: Sequence[Mapping[str, Any]], path: epath.PathLike) -> None:
  """In-distribution metric vs label fraction, one curve per init, CI band; saved as PNG."""
  import matplotlib  # Optional dependency (requirements-notebooks.txt).

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = summarize(rows)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for init in sorted({k[0] for k in summary}):
    points = sorted(
      (k[2], v) for k, v in summary.items() if k[0] == init and k[1] == "in_distribution"
    )
    if not points:
      continue
    xs = [p[0] for p in points]
    ax.plot(xs, [p[1]["value"] for p in points], marker="o", label=init)
    ax.fill_between(
      xs, [p[1]["ci_low"] for p in points], [p[1]["ci_high"] for p in points], alpha=0.2
    )
  metric = next(iter(summary.values()))["metric"] if summary else "metric"
  ax.set(
    xlabel="label fraction (of training patients)",
    ylabel=metric,
    title="Label efficiency (in distribution)",
  )
  ax.legend()
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


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


def seed_stats(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """A group of `read_results` rows (one per seed) summarized.

  Args:
    group: the rows, e.g. those of one init, eval dataset, metric and label fraction.

  Returns:
    {"mean", "ci_low", "ci_high"}: the `nan_mean` over the rows of `value`, `ci_low` and `ci_high`
    (undefined ones left out); "values": the rows' values in order; "seeds": their sorted seeds.
  """
  return {
    "mean": nan_mean([r["value"] for r in group]),
    "ci_low": nan_mean([r["ci_low"] for r in group]),
    "ci_high": nan_mean([r["ci_high"] for r in group]),
    "values": [r["value"] for r in group],
    "seeds": sorted(r["seed"] for r in group),
  }
