"""The notebooks' helpers: reading the sweep CSV (empty cells -> NaN) and seed statistics."""

import math
import re

import numpy as np
import pytest
from test_sweep import write_fake_sweep

from micle_jax.tools import sweep, sweep_report

HEADER = "init,mode,task,label_fraction,seed,eval,dataset,metric,value,ci_low,ci_high,workdir\n"


def _row(seed, value, ci_low, ci_high):
  """A `read_results` row (only the fields `seed_stats` reads)."""
  return {"seed": seed, "value": value, "ci_low": ci_low, "ci_high": ci_high}


def test_nan_mean_leaves_out_nan():
  assert sweep_report.nan_mean([0.5, math.nan, 0.75, 1.0]) == 0.75
  assert sweep_report.nan_mean([0.25]) == 0.25
  assert sweep_report.nan_mean(np.asarray([2.0, 4.0])) == 3.0
  assert isinstance(sweep_report.nan_mean([1, 2]), float)
  assert math.isnan(sweep_report.nan_mean([math.nan, math.nan]))
  assert math.isnan(sweep_report.nan_mean([]))


def test_read_results_parses_numbers_and_empty_cells(tmp_path):
  path = tmp_path / "results.csv"
  path.write_text(
    HEADER
    + "micle,full,chexpert,0.5,1,in_distribution,chexpert:valid,mean_auc,0.75,0.625,0.875,w/a\n"
    + "scratch,full,chexpert,1.0,0,nih,nih:test,auc/Edema,,,,w/b\n"
  )
  rows = sweep_report.read_results(path)
  assert len(rows) == 2
  assert rows[0] == {
    "init": "micle",
    "mode": "full",
    "task": "chexpert",
    "label_fraction": 0.5,
    "seed": 1,
    "eval": "in_distribution",
    "dataset": "chexpert:valid",
    "metric": "mean_auc",
    "value": 0.75,
    "ci_low": 0.625,
    "ci_high": 0.875,
    "workdir": "w/a",
  }
  undefined = rows[1]
  assert undefined["label_fraction"] == 1.0 and undefined["seed"] == 0
  assert isinstance(undefined["seed"], int)
  assert all(math.isnan(undefined[k]) for k in ("value", "ci_low", "ci_high"))
  assert (undefined["metric"], undefined["workdir"]) == ("auc/Edema", "w/b")
  assert sweep_report.read_results(str(path))[0] == rows[0]  # A str path too.


@pytest.mark.parametrize("text", [HEADER, ""], ids=["header_only", "empty_file"])
def test_read_results_of_an_empty_csv_names_the_path(tmp_path, text):
  path = tmp_path / "results.csv"
  path.write_text(text)
  with pytest.raises(ValueError, match=re.escape(f"{path} has no rows")):
    sweep_report.read_results(path)


def test_seed_stats():
  group = [
    _row(2, 0.75, 0.5, 1.0),
    _row(0, 0.25, math.nan, 0.5),
    _row(1, math.nan, math.nan, math.nan),
  ]
  s = sweep_report.seed_stats(group)
  assert set(s) == {"mean", "ci_low", "ci_high", "values", "seeds"}
  assert (s["mean"], s["ci_low"], s["ci_high"]) == (0.5, 0.5, 0.75)
  assert s["values"][:2] == [0.75, 0.25] and math.isnan(s["values"][2])  # In row order.
  assert s["seeds"] == [0, 1, 2]  # Sorted.
  one = sweep_report.seed_stats([_row(0, math.nan, math.nan, math.nan)])
  assert all(math.isnan(one[k]) for k in ("mean", "ci_low", "ci_high"))
  assert one["seeds"] == [0]


def test_default_metric_is_a_main_metric():
  assert sweep_report.DEFAULT_METRIC == {
    "chexpert": "mean_auc",
    "nih": "mean_auc",
    "multiclass": "top1",
  }
  assert set(sweep_report.DEFAULT_METRIC.values()) <= set(sweep_report.MAIN_METRICS)


def test_read_results_of_a_collected_sweep_agrees_with_summarize(tmp_path):
  root = tmp_path / "sweep"
  write_fake_sweep(root)
  collected = sweep.collect(root)
  sweep.write_csv(collected, root / "results.csv")
  rows = sweep_report.read_results(root / "results.csv")
  assert len(rows) == len(collected)
  undefined = [r for r in rows if math.isnan(r["value"])]
  assert undefined and len(undefined) == sum(r["value"] is None for r in collected)
  for (init, eval_name, fraction), summary in sweep_report.summarize(collected).items():
    group = [
      r
      for r in rows
      if (r["init"], r["eval"], r["metric"]) == (init, eval_name, summary["metric"])
      and r["label_fraction"] == fraction
    ]
    s = sweep_report.seed_stats(group)
    assert s["seeds"] == [0, 1] and summary["seeds"] == 2
    for key, ours in (("value", "mean"), ("ci_low", "ci_low"), ("ci_high", "ci_high")):
      assert s[ours] == pytest.approx(summary[key], abs=1e-12)
