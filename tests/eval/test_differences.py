"""Paired-bootstrap differences between inits, against an independent implementation."""

import itertools

import numpy as np
import pytest

from micle_jax.eval import differences, eval_metrics, evaluation
from micle_jax.tools import sweep_report

NAMES = ("Edema", "Effusion")


def _preds(rng, signal, *, num_patients=30):
  """Multi-label predictions of 1–3 images per patient; `signal` sets how well they separate."""
  patients = np.repeat([f"p{i:02d}" for i in range(num_patients)], rng.integers(1, 4, num_patients))
  n = len(patients)
  targets = (rng.random((n, 2)) < 0.4).astype(np.float32)
  mask = (rng.random((n, 2)) < 0.9).astype(np.float32)
  logits = signal * (targets - 0.5) + rng.normal(size=(n, 2))
  ids = np.asarray([f"img{i}" for i in range(n)])
  return evaluation.Predictions(
    task="multilabel",
    names=NAMES,
    image_id=ids,
    case_id=patients,
    patient_id=patients,
    study_id=ids,
    probs=(1 / (1 + np.exp(-logits))).astype(np.float32),
    targets=targets,
    target_mask=mask,
  )


def _with_probs(preds, probs):
  fields = {k: getattr(preds, k) for k in preds.__dataclass_fields__}
  return evaluation.Predictions(**{**fields, "probs": probs})


def _auc_by_pairs(scores, labels):
  """AUC as the fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  if not len(pos) or not len(neg):
    return np.nan
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def _mean_auc(preds, patient_draw):
  rows = np.concatenate([np.flatnonzero(preds.patient_id == p) for p in patient_draw])
  aucs = []
  for k in range(len(NAMES)):
    keep = rows[preds.target_mask[rows, k] > 0]
    aucs.append(_auc_by_pairs(preds.probs[keep, k], preds.targets[keep, k]))
  aucs = [a for a in aucs if not np.isnan(a)]
  return np.mean(aucs) if aucs else np.nan


def _reference(pairs, num_samples, seed):
  """Resample patients; each draw: mean over seeds of AUC(A) − AUC(B) on that same resample."""
  patients = list(dict.fromkeys(pairs[0][0].patient_id))
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(num_samples):
    draw = [patients[i] for i in rng.integers(0, len(patients), size=len(patients))]
    draws.append(np.mean([_mean_auc(a, draw) - _mean_auc(b, draw) for a, b in pairs]))
  point = np.mean([_mean_auc(a, patients) - _mean_auc(b, patients) for a, b in pairs])
  draws = np.asarray(draws)
  low, high = np.quantile(draws[~np.isnan(draws)], [0.025, 0.975])
  return point, low, high


def test_paired_bootstrap_equals_an_independent_implementation():
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(2):  # two seeds, pooled
    base = _preds(rng, signal=1.0)
    better = _with_probs(base, np.clip(base.probs + 0.3 * (base.targets - 0.5), 0, 1))
    pairs.append((better, base))
  fns = [
    (evaluation.metrics_fn(a, "image")[1], evaluation.metrics_fn(b, "image")[1]) for a, b in pairs
  ]
  units = evaluation.metrics_fn(pairs[0][0], "image")[0]
  got = eval_metrics.paired_bootstrap(fns, len(units), num_samples=200, seed=3)["mean_auc"]
  point, low, high = _reference(pairs, 200, 3)
  assert got["difference"] == pytest.approx(point, abs=1e-12)
  assert (got["ci_low"], got["ci_high"]) == pytest.approx((low, high), abs=1e-12)
  assert got["difference"] > 0 and got["pairs"] == 2


def test_identical_predictions_differ_by_exactly_zero():
  preds = _preds(np.random.default_rng(1), signal=1.0)
  units, fn = evaluation.metrics_fn(preds, "image")
  stats = eval_metrics.paired_bootstrap([(fn, fn)], len(units), num_samples=100, seed=0)
  for metric in ("mean_auc", "auc/Edema", "auc/Effusion"):
    assert (stats[metric]["difference"], stats[metric]["ci_low"], stats[metric]["ci_high"]) == (
      0.0,
      0.0,
      0.0,
    )


def test_metrics_with_ci_matches_one_metric_at_a_time():
  preds = _preds(np.random.default_rng(2), signal=0.5)
  units, fn = evaluation.metrics_fn(preds, "image")
  together = eval_metrics.metrics_with_ci(fn, len(units), num_samples=50, seed=4)
  alone = eval_metrics.metric_with_ci(
    lambda idx: fn(idx)["mean_auc"], len(units), num_samples=50, seed=4
  )
  assert together["mean_auc"] == alone


def test_study_aggregation_averages_a_studys_images():
  preds = _preds(np.random.default_rng(3), signal=1.0)
  studies = np.asarray([f"{p}/s" for p in preds.patient_id])  # one study per patient
  fields = {k: getattr(preds, k) for k in preds.__dataclass_fields__}
  # Labels are a study's: make every image of a patient carry the first image's labels.
  first = {p: i for i, p in reversed(list(enumerate(preds.patient_id)))}
  rows = [first[p] for p in preds.patient_id]
  fields.update(study_id=studies, targets=preds.targets[rows], target_mask=preds.target_mask[rows])
  preds = evaluation.Predictions(**fields)
  units, fn = evaluation.metrics_fn(preds, "study")
  patients = list(dict.fromkeys(preds.patient_id))
  assert units == patients
  mean_probs = np.stack([preds.probs[preds.patient_id == p].mean(0) for p in patients])
  keep = preds.target_mask[[first[p] for p in patients], 0] > 0
  targets = preds.targets[[first[p] for p in patients], 0]
  expected = _auc_by_pairs(mean_probs[keep, 0], targets[keep])
  assert fn(np.arange(len(units)))["auc/Edema"] == pytest.approx(expected)


def _run(tmp_path, init, seed, preds, fraction=0.1):
  workdir = tmp_path / init / f"s{seed}"
  evaluation.save_predictions(evaluation.predictions_path(workdir, "in_distribution"), preds)
  results = {
    "label_fraction": fraction,
    "seed": seed,
    "eval_aggregation": "image",
    "eval": {"in_distribution": {}},
  }
  return {"init": init, "workdir": str(workdir), "results": results}


def test_sweep_differences_pair_seeds_and_compare_micle_with_simclr(tmp_path):
  rng = np.random.default_rng(5)
  runs = []
  for seed in (0, 1):
    base = _preds(rng, signal=0.5)
    for init, boost in (("scratch", 0.0), ("simclr", 0.2), ("micle", 0.3)):
      probs = np.clip(base.probs + boost * (base.targets - 0.5), 0, 1)
      runs.append(_run(tmp_path, init, seed, _with_probs(base, probs)))
  rows = differences.paired_differences(runs, num_samples=100, seed=0)
  pairs = {(r["init"], r["baseline"]) for r in rows}
  assert pairs == {("micle", "scratch"), ("simclr", "scratch"), ("micle", "simclr")}
  assert all(r["seeds"] == 2 and tuple(r) == differences.COLUMNS for r in rows)
  main = {(r["init"], r["baseline"]): r for r in rows if r["metric"] == "mean_auc"}
  assert main[("micle", "scratch")]["difference"] > main[("simclr", "scratch")]["difference"] > 0
  table = sweep_report.differences_table(rows)
  assert table.count("*") >= 2 and "micle    simclr" in table

  # Runs that scored different images cannot be paired.
  other = _preds(np.random.default_rng(9), signal=0.5, num_patients=12)
  broken = [r for r in runs if r["init"] != "scratch" or r["results"]["seed"] != 0]
  broken.append(_run(tmp_path / "x", "scratch", 0, other))
  with pytest.raises(ValueError, match="cover different images"):
    differences.paired_differences(broken, num_samples=10)


def test_comparisons():
  assert differences.comparisons(["scratch", "micle"]) == [("micle", "scratch")]
  assert differences.comparisons(["micle", "simclr"]) == [("micle", "simclr")]
  assert list(itertools.chain(differences.comparisons(["scratch"]))) == []
