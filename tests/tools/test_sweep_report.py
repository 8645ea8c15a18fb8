"""The notebooks' readers: the per-run results CSV and the arms CSV (empty cells -> NaN)."""

import math
import re

import numpy as np
import pytest
from test_sweep import write_fake_sweep

from micle_jax.tools import sweep, sweep_report

HEADER = "init,mode,task,label_fraction,seed,eval,dataset,metric,value,ci_low,ci_high,workdir\n"


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


def test_default_metric_is_a_main_metric():
  assert sweep_report.DEFAULT_METRIC == {
    "chexpert": "mean_auc",
    "nih": "mean_auc",
    "multiclass": "top1",
  }
  assert set(sweep_report.DEFAULT_METRIC.values()) <= set(sweep_report.MAIN_METRICS)


def test_the_arms_csv_reads_back_what_collect_wrote(tmp_path):
  root = tmp_path / "sweep"
  write_fake_sweep(root)
  _, arms, _ = sweep.report(root, num_samples=30, plot=False)
  rows = sweep_report.read_arms(root / sweep.ARMS_FILE)
  assert len(rows) == len(arms)
  for got, want in zip(rows, arms, strict=True):
    assert (got["init"], got["eval"], got["metric"]) == (want["init"], want["eval"], want["metric"])
    assert got["fraction"] == want["fraction"] and got["runs"] == want["runs"] == 2
    for key in ("value", "ci_low", "ci_high"):
      if want[key] is None:
        assert math.isnan(got[key])
      else:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
  empty = tmp_path / "empty.csv"
  empty.write_text(",".join(sweep.differences.ARM_COLUMNS) + "\n")
  with pytest.raises(ValueError, match="has no rows"):
    sweep_report.read_arms(empty)
