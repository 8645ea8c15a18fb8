"""A sweep's results at a glance: a text table and the label-efficiency plot (from `collect` rows).

The notebooks (notebooks/) draw the full figures; this is what the demo and a terminal show.
"""

import collections
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

MAIN_METRICS = ("mean_auc", "top1")


def _main_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  return [r for r in rows if r["metric"] in MAIN_METRICS and r["value"] not in (None, "")]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, float], dict[str, float]]:
  """(init, eval, fraction) -> mean over seeds of value, ci_low, ci_high of the main metric."""
  groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in _main_rows(rows):
    groups[(r["init"], r["eval"], float(r["label_fraction"]))].append(r)
  out = {}
  for key, group in sorted(groups.items()):
    mean = lambda k, g=group: statistics.fmean(float(r[k]) for r in g if r[k] not in (None, ""))  # noqa: E731
    out[key] = {
      "value": mean("value"),
      "ci_low": mean("ci_low"),
      "ci_high": mean("ci_high"),
      "seeds": len(group),
      "metric": group[0]["metric"],
    }
  return out


def table(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line per (init, eval dataset, label fraction): metric [95% CI], averaged over seeds."""
  lines = [f"{'init':<12} {'eval':<16} {'fraction':>8}  {'metric':<8} {'value':>6}  95% CI"]
  for (init, eval_name, fraction), s in summarize(rows).items():
    lines.append(
      f"{init:<12} {eval_name:<16} {fraction:>8.2f}  {s['metric']:<8} "
      f"{s['value']:>6.3f}  [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  "
      f"({s['seeds']} seed{'s' if s['seeds'] > 1 else ''})"
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
