"""A sweep's arms and differences: cells, levels, refusals, and the study aggregation."""

import itertools
import re

import numpy as np
import pytest
from test_bootstrap import preds

from micle_jax.eval import differences, evaluation
from micle_jax.runtime import run_files
from micle_jax.tools import sweep_report

NAMES = ("Edema", "Effusion")


def _preds(rng, signal, *, num_patients=30):
  """Multi-label predictions of 1–3 images per patient; `signal` sets how well they separate."""
  return preds(rng, signal, num_patients=num_patients)


def _with_probs(preds, probs):
  fields = {k: getattr(preds, k) for k in preds.__dataclass_fields__}
  return evaluation.Predictions(**{**fields, "probs": probs})


def _run(tmp_path, init, seed, preds, fraction=0.1, *, pretraining=None, mode="full", **config):
  """A finished fine-tuning run's files: predictions, results.json's fields, config.json."""
  unit = "" if pretraining is None else f"p{pretraining}"
  workdir = tmp_path / mode / init / unit / f"s{seed}"
  evaluation.save_predictions(evaluation.predictions_path(workdir, "in_distribution"), preds)
  init_from = "scratch" if init == "scratch" else str(tmp_path / "pretrain" / init / unit)
  results = {
    "init_from": init_from,
    "mode": mode,
    "task": "chexpert",
    "views": "frontal",
    "label_fraction": fraction,
    "seed": seed,
    "eval_aggregation": "image",
    "step": 10,
    "pretraining": None if init == "scratch" else {"seed": pretraining or 0, "step": 64},
    "eval": {"in_distribution": {"dataset": "chexpert:valid", "views": "frontal"}},
  }
  if init == "scratch" and pretraining is not None:
    results["init_seed"] = pretraining
  stored = {"init_from": init_from, "seed": seed, "label_fraction": fraction, "mode": mode}
  run_files.write_json(workdir / run_files.CONFIG_FILE, stored | config)
  return {"init": init, "workdir": str(workdir), "results": results}


def _study(tmp_path, rng, *, pretrainings=(0, 1), seeds=(0, 1)):
  """scratch, simclr and micle, each fine-tuned from every pretraining (scratch: init seed) at
  every seed, micle best and scratch worst."""
  base = _preds(rng, signal=0.5)
  runs = []
  for p in pretrainings:
    for seed in seeds:
      for init, boost in (("scratch", 0.0), ("simclr", 0.2), ("micle", 0.3 + 0.05 * p)):
        noise = rng.normal(0, 0.05, base.probs.shape)
        probs = np.clip(base.probs + boost * (base.targets - 0.5) + noise, 0, 1)
        runs.append(_run(tmp_path, init, seed, _with_probs(base, probs), pretraining=p))
  return runs


def test_compare_reports_every_arm_and_difference_over_runs(tmp_path):
  runs = _study(tmp_path, np.random.default_rng(5))
  arms, rows = differences.compare(runs, num_samples=100, seed=0)
  assert {(r["init"], r["baseline"]) for r in rows} == {
    ("micle", "scratch"),
    ("simclr", "scratch"),
    ("micle", "simclr"),
  }
  assert all(tuple(r) == differences.COLUMNS for r in rows)
  assert all(tuple(r) == differences.ARM_COLUMNS for r in arms)
  main = {(r["init"], r["baseline"]): r for r in rows if r["metric"] == "mean_auc"}
  assert main[("micle", "scratch")]["difference"] > main[("simclr", "scratch")]["difference"] > 0
  d = main[("micle", "simclr")]
  assert (d["runs"], d["baseline_runs"], d["units"], d["baseline_units"]) == (4, 4, 2, 2)
  assert d["scope"] == "training runs and patients"
  assert d["per_seed"].startswith("p0:+") and " p1:+" in d["per_seed"]
  arm = next(r for r in arms if r["init"] == "micle" and r["metric"] == "mean_auc")
  assert arm["runs"] == 4 and arm["units"] == 2 and arm["sd_runs"] > 0
  assert arm["pretrain_steps"] == 64 and arm["train_steps"] == 10
  table = sweep_report.differences_table(rows)
  assert table.count("*") >= 2 and "micle    simclr" in table and "p0:+" in table
  assert "patients only" not in table and "patients only" not in sweep_report.table(arms)


def test_a_single_pretraining_run_is_said_to_condition_the_interval(tmp_path):
  runs = _study(tmp_path, np.random.default_rng(6), pretrainings=(0,))
  arms, rows = differences.compare(runs, num_samples=50)
  d = next(r for r in rows if r["metric"] == "mean_auc" and r["baseline"] == "simclr")
  assert d["scope"] == "patients only; one level-1 run: micle, simclr"
  table = sweep_report.differences_table(rows)
  assert "over patients only, given the one pretraining run of micle and the one" in table
  assert "given scratch's one initialisation" in sweep_report.table(arms)


def test_runs_of_another_mode_are_another_cell_and_two_claims_of_one_place_are_refused(tmp_path):
  rng = np.random.default_rng(7)
  runs = _study(tmp_path, rng, pretrainings=(0,), seeds=(0,))
  linear = _study(tmp_path / "linear", rng, pretrainings=(0,), seeds=(0,))
  for run in linear:
    run["results"]["mode"] = "linear"
  arms, diffs = differences.compare(runs + linear, num_samples=20)
  assert {(r["mode"], r["init"]) for r in arms if r["metric"] == "mean_auc"} == {
    (m, i) for m in ("full", "linear") for i in ("scratch", "simclr", "micle")
  }
  table = sweep_report.table(arms)  # the two modes' arms told apart
  assert "micle/linear" in table and "micle/full" in table
  assert re.search(r"micle/linear +simclr/linear", sweep_report.differences_table(diffs))
  # The name columns fit the longest name: every difference's value starts at one column.
  rows = [line for line in sweep_report.differences_table(diffs).splitlines() if "/linear" in line]
  assert len({re.search(r"[+-]\d\.\d{3}", line).start() for line in rows}) == 1
  twin = _study(tmp_path / "twin", rng, pretrainings=(0,), seeds=(0,))
  with pytest.raises(ValueError, match=r"both claim scratch p0 seed 0") as error:
    differences.compare(runs + twin, num_samples=20)
  assert str(tmp_path / "twin") in str(error.value) and str(tmp_path / "full") in str(error.value)


def test_runs_of_one_arm_must_differ_only_in_their_seeds(tmp_path):
  rng = np.random.default_rng(8)
  base = _preds(rng, signal=0.5)
  runs = [
    _run(tmp_path, "scratch", 0, base, pretraining=0, learning_rate=1.0),
    _run(tmp_path, "scratch", 1, base, pretraining=0, learning_rate=0.1),
  ]
  with pytest.raises(ValueError, match=r"configs differ in \['learning_rate'\]"):
    differences.compare(runs, num_samples=10)


def test_runs_that_scored_other_images_cannot_be_compared(tmp_path):
  rng = np.random.default_rng(9)
  runs = [_run(tmp_path, "scratch", 0, _preds(rng, signal=0.5), pretraining=0)]
  runs.append(_run(tmp_path, "simclr", 0, _preds(rng, signal=0.5, num_patients=12), pretraining=0))
  with pytest.raises(ValueError, match="cover different images"):
    differences.compare(runs, num_samples=10)


def test_identical_predictions_differ_by_exactly_zero(tmp_path):
  preds = _preds(np.random.default_rng(1), signal=1.0)
  runs = [_run(tmp_path, init, 0, preds, pretraining=0) for init in ("scratch", "simclr")]
  _, rows = differences.compare(runs, num_samples=50)
  for r in rows:
    if r["metric"] in ("mean_auc", "auc/Edema", "auc/Effusion"):
      assert (r["difference"], r["ci_low"], r["ci_high"]) == (0.0, 0.0, 0.0)


def test_comparisons():
  assert differences.comparisons(["scratch", "micle"]) == [("micle", "scratch")]
  assert differences.comparisons(["micle", "simclr"]) == [("micle", "simclr")]
  # Pair policies: each against SimCLR, and against patient pairs (`micle`).
  assert differences.comparisons(["simclr", "micle", "micle_study", "scratch"]) == [
    ("micle", "scratch"),
    ("micle_study", "scratch"),
    ("simclr", "scratch"),
    ("micle", "simclr"),
    ("micle_study", "simclr"),
    ("micle_study", "micle"),
  ]
  assert list(itertools.chain(differences.comparisons(["scratch"]))) == []
  # The paper's baseline: every pretrained init against it too (scratch already faces it).
  assert differences.comparisons(["scratch", "supervised", "simclr", "micle"]) == [
    ("micle", "scratch"),
    ("simclr", "scratch"),
    ("supervised", "scratch"),
    ("micle", "simclr"),
    ("micle", "supervised"),
    ("simclr", "supervised"),
  ]


def test_an_arms_chain_says_what_its_networks_were_trained_from(tmp_path):
  imported = tmp_path / "imagenet"
  imported.mkdir()
  report = {
    "converter": "import_torch",
    "source": {"file": "/weights/resnet50-11ad3fa6.pth"},
    "architecture": "resnet50",
    "model": {"variant": "torchvision"},
  }
  run_files.write_json(imported / run_files.CONVERSION_FILE, report)
  converted = tmp_path / "simclrv2"
  converted.mkdir()
  conversion = {"prefix": "/w/ckpt-1", "depth": 50, "width": 2.0, "sk_ratio": 0.0625}
  run_files.write_json(converted / run_files.CONVERSION_FILE, conversion)
  chained, plain = tmp_path / "pretrain" / "micle", tmp_path / "pretrain" / "simclr"
  run_files.write_json(chained / run_files.CONFIG_FILE, {"init_from": str(imported)})
  run_files.write_json(plain / run_files.CONFIG_FILE, {"init_from": ""})
  imagenet = "ImageNet supervised resnet50 (resnet50-11ad3fa6.pth)"
  for init_from, pretraining, expected in [
    ("scratch", None, "random init"),
    (str(imported), None, imagenet),
    (str(chained / "checkpoints"), {"method": "micle"}, f"{imagenet} → micle"),
    (str(plain), {"method": "simclr"}, "simclr"),
    (str(converted), None, "SimCLRv2 r50_2x_sk1"),
    ("gs://unreachable-bucket/run", None, "run"),  # out of reach: the folder's name
  ]:
    results = {"init_from": init_from, "pretraining": pretraining}
    assert differences.chain(results) == expected, init_from


def test_a_patient_with_several_cases_is_one_bootstrap_unit():
  """PAD-UFES-20: a patient can have several lesions (cases); the bootstrap draws patients."""
  rng = np.random.default_rng(3)
  cases = np.asarray([f"c{i}" for i in range(12)])
  patients = np.asarray([f"p{i // 3}" for i in range(12)])  # 4 patients, 3 cases each
  probs = rng.dirichlet(np.ones(4), size=12).astype(np.float32)
  preds = evaluation.Predictions(
    task="multiclass",
    names=("a", "b", "c", "d"),
    image_id=cases,
    case_id=cases,
    patient_id=patients,
    study_id=cases,
    probs=probs,
    label=rng.integers(0, 4, 12),
  )
  units, fn = evaluation.metrics_fn(preds, "case")
  assert units == ["p0", "p1", "p2", "p3"]
  # Drawing patient p1 twice and p0, p2, p3 never: p1's three cases, each counted twice.
  weights = np.array([[0.0, 2.0, 0.0, 0.0]])
  hits = np.argmax(probs[3:6], 1) == preds.label[3:6]
  assert fn(weights)["top1"][0] == pytest.approx(hits.mean())
