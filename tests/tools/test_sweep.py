"""Sweeps: plan, printed commands, in-process runs (faked training), collecting results to CSV."""

import copy
import csv
import itertools
import json
import pathlib
import shlex

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import finetune_cxr
from micle_jax import finetune
from micle_jax.eval import evaluation
from micle_jax.runtime import run_files
from micle_jax.tools import sweep, sweep_plan

CONFIG_FILE = str(pathlib.Path(__file__).parents[2] / "configs" / "finetune_cxr.py")
INITS = {"scratch": "scratch", "micle": "gs://bucket/pre trained/micle"}


def fake_results(init_from: str, fraction: float, seed: int) -> dict:
  """A results.json of a CXR run with an NIH shift eval; the NIH AUC of 'Edema' is undefined."""
  base = 0.6 + 0.2 * fraction + (0.05 if init_from != "scratch" else 0.0) + 0.01 * seed

  def metric(value):
    undefined = value is None
    return {
      "value": value,
      "ci_low": None if undefined else value - 0.05,
      "ci_high": None if undefined else value + 0.05,
      "num_units": 8,
      "num_bootstrap": 20,
      "dropped": 20 if undefined else 0,
    }

  def evaluation(dataset, value, edema):
    metrics = {"mean_auc": metric(value), "auc/Edema": metric(edema)}
    return {"dataset": dataset, "num_images": 20, "num_cases": 8, "metrics": metrics}

  return {
    "init_from": init_from,
    "mode": "full",
    "task": "chexpert",
    "label_fraction": fraction,
    "seed": seed,
    "step": 3,
    "train_images_seen": 24,
    "num_train_images": int(100 * fraction),
    "num_train_patients": int(40 * fraction),
    "views": "frontal",
    "eval_aggregation": "image",
    "labels": ["Edema"],
    "init": {"source": "scratch" if init_from == "scratch" else "init_from", "step": 9},
    "pretraining": None if init_from == "scratch" else {"step": 9, "views_seen": 9 * 2 * 64},
    "eval": {
      "in_distribution": evaluation("chexpert_micle/images:validation", base, base),
      "nih": evaluation("nih_cxr14/images:test", base - 0.1, None),
    },
  }


def fake_predictions(init: str, seed: int, eval_name: str) -> evaluation.Predictions:
  """20 images of 8 patients; the pretrained init's scores separate the classes better."""
  rng = np.random.default_rng([seed, len(eval_name)])
  targets = (np.arange(20) % 2).astype(np.float32)[:, None]
  signal = 1.0 if init == "scratch" else 2.0
  probs = 1 / (1 + np.exp(-(signal * (targets - 0.5) + rng.normal(size=(20, 1)))))
  ids = np.asarray([f"img{i}" for i in range(20)])
  patients = np.asarray([f"p{i % 8}" for i in range(20)])
  return evaluation.Predictions(
    task="multilabel",
    names=("Edema",),
    image_id=ids,
    case_id=patients,
    patient_id=patients,
    study_id=ids,
    probs=probs.astype(np.float32),
    targets=targets,
    target_mask=np.ones_like(targets),
  )


def write_fake_sweep(root: pathlib.Path, fractions=(0.1, 1.0), seeds=(0, 1)) -> None:
  """results.json files where `sweep.run` would write them, plus decoys collect must ignore."""
  for init, fraction, seed in itertools.product(INITS, fractions, seeds):
    workdir = pathlib.Path(sweep.run_workdir(root, init, fraction, seed))
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    results = fake_results(INITS[init], fraction, seed)
    (workdir / finetune.RESULTS_FILE).write_text(json.dumps(results))
    for eval_name in results["eval"]:
      path = evaluation.predictions_path(workdir, eval_name)
      evaluation.save_predictions(path, fake_predictions(init, seed, eval_name))
  unfinished = pathlib.Path(sweep.run_workdir(root, "micle", 0.5, 0))
  (unfinished / "checkpoints").mkdir(parents=True)
  (unfinished / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def config():
  return finetune_cxr.get_config("demo")


def test_plan_is_the_cartesian_product_with_one_config_each(config, tmp_path):
  runs = sweep.plan(config, tmp_path, inits=INITS, fractions=[0.1, 0.5, 1.0], seeds=[0, 1])
  expected = list(itertools.product(INITS, [0.1, 0.5, 1.0], [0, 1]))
  assert [(r.init, r.label_fraction, r.seed) for r in runs] == expected
  for r in runs:
    assert r.workdir == str(tmp_path / r.init / f"f{r.label_fraction}" / f"s{r.seed}")
    assert r.init_from == INITS[r.init]
    assert (r.config.init_from, r.config.label_fraction, r.config.seed) == (
      r.init_from,
      r.label_fraction,
      r.seed,
    )
    assert r.config.model == config.model and r.config.shift == config.shift
  assert runs[-1].workdir.endswith("micle/f1.0/s1")
  assert len({id(r.config) for r in runs}) == len(runs)
  assert (config.init_from, config.label_fraction, config.seed) == ("", 1.0, 0)
  bad = copy.deepcopy(config)
  bad.mode = "partial"
  with pytest.raises(ValueError, match="config.mode"):  # Before anything trains.
    sweep.plan(bad, tmp_path, inits=INITS, fractions=[1.0], seeds=[0])


def test_init_overrides_apply_to_their_init_only_and_reach_the_commands(config, tmp_path):
  overrides = sweep_plan.parse_init_overrides(
    ["scratch:optimizer.base_learning_rate=1.0", "scratch:model.zero_init_head=false"]
  )
  assert overrides == {
    "scratch": {"optimizer.base_learning_rate": "1.0", "model.zero_init_head": "false"}
  }
  runs = sweep.plan(
    config, tmp_path, inits=INITS, fractions=[0.1], seeds=[0], init_overrides=overrides
  )
  by_init = {r.init: r for r in runs}
  scratch = by_init["scratch"].config
  assert scratch.optimizer.base_learning_rate == 1.0 and scratch.model.zero_init_head is False
  assert by_init["micle"].config.optimizer == config.optimizer
  assert by_init["micle"].config.model == config.model
  _, parsed, _ = _parse_finetune_command(sweep.command(by_init["scratch"], f"{CONFIG_FILE}:demo"))
  assert parsed.optimizer.base_learning_rate == 1.0 and parsed.model.zero_init_head is False
  _, parsed, _ = _parse_finetune_command(sweep.command(by_init["micle"], f"{CONFIG_FILE}:demo"))
  assert parsed.optimizer.base_learning_rate == config.optimizer.base_learning_rate
  for bad, message in [
    ({"byol": {"seed": 1}}, "not among the inits"),
    ({"scratch": {"optimizer.learning_rat": 1}}, "no key 'optimizer.learning_rat'"),
    ({"scratch": {"seed": "3"}}, "set by the sweep itself"),
    ({"scratch": {"optimizer.base_learning_rate": "fast"}}, "'fast' is not a float"),
  ]:
    with pytest.raises(ValueError, match=message):
      sweep.plan(config, tmp_path, inits=INITS, fractions=[0.1], seeds=[0], init_overrides=bad)
  for bad in ("scratch", "scratch:lr", ":lr=1"):
    with pytest.raises(ValueError, match="INIT:KEY=VALUE"):
      sweep_plan.parse_init_overrides([bad])


def test_parsers_accept_the_flag_forms_and_reject_mistakes():
  assert sweep.parse_inits(["scratch", "simclr=gs://b/x=1"]) == {
    "scratch": "scratch",
    "simclr": "gs://b/x=1",
  }
  assert sweep.parse_fractions(["0.1", "1"]) == [0.1, 1.0]
  assert sweep.parse_seeds(["0", "3"]) == [0, 3]
  for bad in (["micle"], ["a/b=x"], ["m=x", "m=y"], []):
    with pytest.raises(ValueError):
      sweep.parse_inits(bad)
  for bad in (["0"], ["1.5"], ["0.1", "0.1"]):
    with pytest.raises(ValueError):
      sweep.parse_fractions(bad)
  with pytest.raises(ValueError):
    sweep.parse_seeds(["1", "1"])


def _parse_finetune_command(line: str):
  """Parses a printed command with finetune's own flags; returns (argv, config, workdir)."""
  argv = shlex.split(line)
  assert argv[:3] == ["python", "-m", "micle_jax.finetune"]
  argv = ["finetune"] + argv[3:]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  assert fv(argv) == ["finetune"]
  return argv, fv.config, fv.workdir


def test_commands_parse_back_with_the_overrides(config, tmp_path):
  root = tmp_path / "sweep root"
  runs = sweep.plan(config, root, inits=INITS, fractions=[0.1], seeds=[1])
  overrides = {"num_steps": 5, "model.dtype": "bfloat16", "augment.image_size": 32}
  for r in runs:
    argv, parsed, workdir = _parse_finetune_command(
      sweep.command(r, f"{CONFIG_FILE}:demo", overrides)
    )
    assert workdir == r.workdir
    assert (parsed.init_from, parsed.label_fraction, parsed.seed) == (r.init_from, 0.1, 1)
    assert (parsed.num_steps, parsed.model.dtype, parsed.augment.image_size) == (5, "bfloat16", 32)
    assert parsed.dataset.data_dir == config.dataset.data_dir  # The demo variant was kept.
  with pytest.raises(ValueError, match="seed"):
    sweep.command(runs[0], CONFIG_FILE, {"seed": 3})


def _main(monkeypatch, *args: str) -> None:
  """`python -m micle_jax.sweep ARGS` in-process, with fresh flags."""
  argv = ["sweep", *args]
  fv = flags.FlagValues()
  sweep.define_flags(fv, sys_argv=argv)
  monkeypatch.setattr(sweep, "FLAGS", fv)
  sweep.main(*fv(argv)[1:])


def test_main_print_only_prints_one_command_per_run(monkeypatch, capsys, tmp_path):
  _main(
    monkeypatch,
    "run",
    f"--config={CONFIG_FILE}:demo",
    f"--root={tmp_path}",
    "--fractions=0.5,1.0",
    "--seeds=0,1,2",
    "--inits=scratch,micle=/pre/micle",
    "--config.num_steps=7",
    "--print_only",
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 * 2 * 3
  argv, parsed, workdir = _parse_finetune_command(lines[-1])
  assert argv[1] == f"--config={CONFIG_FILE}:demo"
  assert workdir == str(tmp_path / "micle" / "f1.0" / "s2")
  assert (parsed.init_from, parsed.label_fraction, parsed.seed, parsed.num_steps) == (
    "/pre/micle",
    1.0,
    2,
    7,
  )
  assert not list(tmp_path.iterdir())  # Nothing trained, nothing written.


DATA = {"train": {"name": "chexpert_micle", "content_sha256": "ab", "data_dir": "/d"}}


@pytest.fixture
def fake_data(monkeypatch):
  """The data a planned run would read, as `fingerprint.finetune_data` describes it."""
  monkeypatch.setattr(sweep.fingerprint, "finetune_data", lambda spec: copy.deepcopy(DATA))


def test_run_skips_runs_with_results(monkeypatch, config, tmp_path, fake_data):
  calls = []

  def fake_train_and_evaluate(cfg, workdir):
    calls.append(workdir)
    results = fake_results(cfg.init_from, cfg.label_fraction, cfg.seed)
    results["init"]["step"] = None  # (no checkpoint at the fake gs:// init to compare with)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / finetune.RESULTS_FILE).write_text(json.dumps(results))
    run_files.write_config(workdir, cfg)
    run_files.write_json(pathlib.Path(workdir) / run_files.DATA_FILE, DATA)
    return results

  monkeypatch.setattr(finetune, "train_and_evaluate", fake_train_and_evaluate)
  runs = sweep.plan(config, tmp_path, inits=INITS, fractions=[0.1, 1.0], seeds=[0])
  pathlib.Path(runs[1].workdir).mkdir(parents=True)
  (pathlib.Path(runs[1].workdir) / finetune.RESULTS_FILE).write_text("{}")
  trained = sweep.run(runs)
  assert calls == [r.workdir for r in runs if r is not runs[1]]
  assert trained == [r for r in runs if r is not runs[1]]
  assert sweep.run(runs) == [] and len(calls) == 3  # Resumed: everything is done.
  written = json.loads((pathlib.Path(runs[3].workdir) / finetune.RESULTS_FILE).read_text())
  assert (written["init_from"], written["label_fraction"]) == (INITS["micle"], 1.0)


def test_collect_gives_one_row_per_run_eval_and_metric(tmp_path):
  write_fake_sweep(tmp_path)
  rows = sweep.collect(tmp_path)
  assert len(rows) == 2 * 2 * 2 * 2 * 2  # inits × fractions × seeds × evals × metrics
  assert all(tuple(row) == sweep.CSV_COLUMNS for row in rows)
  keys = [(r["init"], r["label_fraction"], r["seed"], r["eval"], r["metric"]) for r in rows]
  assert keys == [
    (init, fraction, seed, ev, metric)
    for init, fraction, seed in itertools.product(["micle", "scratch"], [0.1, 1.0], [0, 1])
    for ev, metric in itertools.product(["in_distribution", "nih"], ["mean_auc", "auc/Edema"])
  ]
  row = rows[0]
  assert row["init_from"] == INITS["micle"]
  assert (row["mode"], row["task"], row["dataset"]) == (
    "full",
    "chexpert",
    "chexpert_micle/images:validation",
  )
  assert row["value"] == pytest.approx(0.6 + 0.02 + 0.05)
  assert row["ci_low"] == pytest.approx(row["value"] - 0.05)
  assert (row["num_units"], row["num_train_patients"]) == (8, 4)
  assert row["workdir"] == str(tmp_path / "micle" / "f0.1" / "s0")
  undefined = [r for r in rows if r["eval"] == "nih" and r["metric"] == "auc/Edema"]
  assert len(undefined) == 8
  assert all(r["value"] is None and r["ci_low"] is None and r["ci_high"] is None for r in undefined)


def test_write_csv_round_trips_with_empty_cells_for_null(tmp_path):
  write_fake_sweep(tmp_path / "sweep")
  rows = sweep.collect(tmp_path / "sweep")
  sweep.write_csv(rows, tmp_path / "out" / "results.csv")
  with open(tmp_path / "out" / "results.csv", newline="") as f:
    read = list(csv.DictReader(f))
  assert tuple(read[0]) == sweep.CSV_COLUMNS
  assert len(read) == len(rows)
  for got, want in zip(read, rows, strict=True):
    assert got == {k: "" if v is None else str(v) for k, v in want.items()}
  assert sum(r["value"] == "" for r in read) == 8


def test_run_refuses_to_skip_results_of_another_config_data_or_init(
  monkeypatch, config, tmp_path, fake_data
):
  (run_,) = sweep.plan(config, tmp_path, inits={"scratch": "scratch"}, fractions=[0.5], seeds=[0])
  workdir = pathlib.Path(run_.workdir)
  other = copy.deepcopy(run_.config)
  other.optimizer.base_learning_rate = 0.7
  run_files.write_config(workdir, other)
  run_files.write_json(workdir / run_files.DATA_FILE, DATA)
  (workdir / finetune.RESULTS_FILE).write_text(json.dumps(fake_results("scratch", 0.5, 0)))
  with pytest.raises(ValueError, match="cannot skip it.*optimizer.base_learning_rate"):
    sweep.run([run_])
  run_files.write_config(workdir, run_.config)
  assert sweep.run([run_]) == []  # The same config and data: skipped.
  # The same data elsewhere is the same data; other data under the same names is not.
  moved = copy.deepcopy(DATA)
  moved["train"]["data_dir"] = "/elsewhere"
  run_files.write_json(workdir / run_files.DATA_FILE, moved)
  assert sweep.run([run_]) == []
  other_data = copy.deepcopy(DATA)
  other_data["train"]["content_sha256"] = "cd"
  run_files.write_json(workdir / run_files.DATA_FILE, other_data)
  with pytest.raises(ValueError, match=r"other data .*train.content_sha256"):
    sweep.run([run_])
  run_files.write_json(workdir / run_files.DATA_FILE, DATA)

  # A pretrained init whose checkpoint moved on since the run started from it.
  from micle_jax.runtime import checkpoint

  init_dir = tmp_path / "pretrained"
  checkpoint.save_weights(init_dir, {"w": np.zeros(2)}, {}, step=12)
  (run_,) = sweep.plan(
    config, tmp_path / "b", inits={"micle": str(init_dir)}, fractions=[0.5], seeds=[0]
  )
  run_files.write_config(run_.workdir, run_.config)
  results = fake_results(str(init_dir), 0.5, 0)  # started from step 9
  (pathlib.Path(run_.workdir) / finetune.RESULTS_FILE).write_text(json.dumps(results))
  with pytest.raises(ValueError, match="from .*pretrained step 9, which is now at step 12"):
    sweep.run([run_])


def test_main_collect_writes_the_csv_and_the_differences(monkeypatch, capsys, tmp_path):
  write_fake_sweep(tmp_path)
  _main(monkeypatch, "collect", f"--root={tmp_path}", "--bootstrap_samples=50")
  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 32
  micle = next(r for r in rows if r["init"] == "micle")
  assert (micle["train_steps"], micle["pretrain_steps"], micle["pretrain_views_seen"]) == (
    "3",
    "9",
    str(9 * 2 * 64),
  )
  with open(tmp_path / sweep.DIFFERENCES_FILE, newline="") as f:
    diffs = list(csv.DictReader(f))
  # evals × fractions × metrics (mean_auc, auc/Edema) × one comparison (micle − scratch)
  assert len(diffs) == 2 * 2 * 2 and tuple(diffs[0]) == sweep.differences.COLUMNS
  assert {(d["init"], d["baseline"], d["runs"], d["baseline_runs"]) for d in diffs} == {
    ("micle", "scratch", "2", "2")
  }
  # Written before runs recorded their seeds: scratch's initialisation was seeded by `seed` (two
  # level-1 units), micle's runs share one pretraining (one unit: the interval is conditional).
  assert {(d["units"], d["baseline_units"]) for d in diffs} == {("1", "2")}
  with open(tmp_path / sweep.ARMS_FILE, newline="") as f:
    arms = list(csv.DictReader(f))
  assert len(arms) == 2 * 2 * 2 * 2 and tuple(arms[0]) == sweep.differences.ARM_COLUMNS
  out = capsys.readouterr().out
  assert "pretrain views" in out and "Differences, init − baseline" in out
  assert "micle    scratch" in out and "given the one pretraining run of micle" in out
  with pytest.raises(FileNotFoundError):
    sweep.collect(tmp_path / "missing")


def test_report_table_and_plot(tmp_path):
  from micle_jax.eval import differences
  from micle_jax.tools import sweep_report

  root = tmp_path / "sweep"
  write_fake_sweep(root)
  arms, _ = differences.compare(sweep.collect_runs(root), num_samples=30)
  text = sweep_report.table(arms)
  assert "in_distribution" in text and "mean_auc" in text and "95% CI" in text
  assert {r["init"] for r in arms} == {"micle", "scratch"}
  sweep_report.plot_label_efficiency(arms, tmp_path / "le.png")
  assert (tmp_path / "le.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
