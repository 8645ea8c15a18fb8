"""Bootstrap intervals: weighted metrics against resampled rows, and the hierarchical interval over
training runs and patients against a brute-force implementation and on simulated studies whose
answer is known."""

import zlib

import numpy as np
import pytest

from micle_jax.eval import bootstrap, eval_metrics, evaluation

NAMES = ("Edema", "Effusion")


def _auc_by_pairs(scores, labels):
  """AUC as the fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  if not len(pos) or not len(neg):
    return np.nan
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_weighted_auc_is_the_auc_of_the_repeated_rows():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, 40) / 5.0  # many ties, within and across classes
  labels = rng.integers(0, 2, 40)
  weights = rng.integers(0, 4, (30, 40)).astype(float)
  weights[0] = np.where(labels == 1, 0.0, 1.0)  # no positive weight: undefined
  got = eval_metrics.weighted_auc(scores, labels, weights)
  assert np.isnan(got[0])
  for w, value in zip(weights[1:], got[1:], strict=True):
    rows = np.repeat(np.arange(40), w.astype(int))
    assert value == pytest.approx(_auc_by_pairs(scores[rows], labels[rows]), abs=1e-12)
    assert value == pytest.approx(eval_metrics.roc_auc(scores[rows], labels[rows]), abs=1e-12)


def test_top_k_hits_average_to_top_k_accuracy():
  rng = np.random.default_rng(1)
  probs = rng.integers(0, 3, (50, 4)).astype(float)  # ties broken by class index
  labels = rng.integers(0, 4, 50)
  for k in (1, 3):
    hits = eval_metrics.top_k_hits(probs, labels, k)
    assert hits.mean() == eval_metrics.top_k_accuracy(probs, labels, k)


def preds(rng, quality, *, num_patients=30, images=None, noise=1.0):
  """Multi-label predictions of 1–3 images per patient; `quality` sets how well they separate.

  The same `rng` state gives the same patients, labels and noise, so predictions of several
  models on one evaluation set are made from copies of one generator.
  """
  images = rng.integers(1, 4, num_patients) if images is None else np.asarray(images)
  num_patients = len(images)
  patients = np.repeat([f"p{i:02d}" for i in range(num_patients)], images)
  n = len(patients)
  targets = (rng.random((n, 2)) < 0.4).astype(np.float32)
  mask = (rng.random((n, 2)) < 0.9).astype(np.float32)
  logits = quality * (targets - 0.5) + noise * rng.normal(size=(n, 2))
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


def _mean_auc(p, patient_draw):
  rows = np.concatenate([np.flatnonzero(p.patient_id == q) for q in patient_draw])
  aucs = []
  for k in range(len(NAMES)):
    keep = rows[p.target_mask[rows, k] > 0]
    aucs.append(_auc_by_pairs(p.probs[keep, k], p.targets[keep, k]))
  aucs = [a for a in aucs if not np.isnan(a)]
  return np.mean(aucs) if aucs else np.nan


def test_metrics_fn_scores_resampled_patients_as_their_rows_would():
  rng = np.random.default_rng(2)
  p = preds(rng, 1.0)
  units, fn = evaluation.metrics_fn(p, "image")
  weights = bootstrap.unit_weights(len(units), 20, seed=5)
  got = fn(weights)["mean_auc"]
  draws = np.random.default_rng(5)
  for value in got:
    draw = [units[i] for i in draws.integers(0, len(units), size=len(units))]
    assert value == pytest.approx(_mean_auc(p, draw), abs=1e-12)


def _brute_force(arms, comparison, num_units, num_samples, seed):
  """The hierarchical bootstrap written out: resample patients, then per arm its level-1 units
  and their runs (the same generators and calls as the implementation), score each drawn run on
  the drawn patients, average; the difference's percentile interval."""
  units = list(dict.fromkeys(arms[comparison[0]][0][0].patient_id))
  patient_draws = np.random.default_rng(seed)
  arm_rngs = {name: np.random.default_rng([seed, zlib.crc32(name.encode())]) for name in arms}
  draws = []
  for _ in range(num_samples):
    patients = [units[i] for i in patient_draws.integers(0, num_units, size=num_units)]
    values = {}
    for name, groups in arms.items():
      rng = arm_rngs[name]
      total = 0.0
      for _ in range(len(groups)):
        group = groups[int(rng.integers(0, len(groups)))]
        picks = rng.integers(0, len(group), size=len(group))
        total += np.mean([_mean_auc(group[j], patients) for j in picks])
      values[name] = total / len(groups)
    draws.append(values[comparison[0]] - values[comparison[1]])
  point = {
    name: np.mean([np.mean([_mean_auc(p, units) for p in g]) for g in groups])
    for name, groups in arms.items()
  }
  low, high = np.quantile(np.asarray(draws), [0.025, 0.975])
  return point[comparison[0]] - point[comparison[1]], low, high


def _study(rng, qualities, *, images=None, noise=1.0):
  """{arm: [[predictions of each run] per level-1 unit]}: every model scores the same patients
  (copies of one generator state), with the quality given per arm, unit and run."""
  state = rng.bit_generator.state
  out = {}
  for name, per_unit in qualities.items():
    out[name] = []
    for per_run in per_unit:
      runs = []
      for i, q in enumerate(per_run):
        gen = np.random.default_rng()
        gen.bit_generator.state = state
        base = preds(gen, 0.0, images=images, noise=0.0)  # same patients and labels for all
        noise_rng = np.random.default_rng(zlib.crc32(repr((name, q, i)).encode()))
        logits = q * (base.targets - 0.5) + noise * noise_rng.normal(size=base.targets.shape)
        fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
        fields["probs"] = (1 / (1 + np.exp(-logits))).astype(np.float32)
        runs.append(evaluation.Predictions(**fields))
      out[name].append(runs)
  return out


def _hierarchical(study, comparison, num_samples=200, seed=3):
  arms = []
  for name, groups in study.items():
    fns = {f"p{u}": [evaluation.metrics_fn(p, "image")[1] for p in g] for u, g in enumerate(groups)}
    arms.append(bootstrap.Arm(name, fns))
  units = evaluation.metrics_fn(next(iter(study.values()))[0][0], "image")[0]
  return bootstrap.hierarchical(arms, [comparison], len(units), num_samples=num_samples, seed=seed)


def test_the_hierarchical_interval_equals_a_brute_force_implementation():
  rng = np.random.default_rng(4)
  images = rng.integers(1, 4, 30)
  study = _study(
    rng, {"micle": [[1.5, 1.2], [0.6, 0.9], [1.1]], "scratch": [[0.4, 0.7, 0.2]]}, images=images
  )
  per_arm, diffs = _hierarchical(study, ("micle", "scratch"), num_samples=60, seed=7)
  got = diffs[("micle", "scratch")]["mean_auc"]
  units = evaluation.metrics_fn(study["micle"][0][0], "image")[0]
  point, low, high = _brute_force(study, ("micle", "scratch"), len(units), 60, 7)
  assert got["difference"] == pytest.approx(point, abs=1e-12)
  assert (got["ci_low"], got["ci_high"]) == pytest.approx((low, high), abs=1e-12)
  assert (got["runs"], got["baseline_runs"], got["units"], got["baseline_units"]) == (5, 3, 3, 1)
  assert got["scope"] == "patients only; one level-1 run: scratch"
  assert set(got["per_unit"]) == {"p0"}  # the only level-1 label both arms have
  assert per_arm["micle"]["mean_auc"]["scope"] == "training runs and patients"


def test_when_runs_vary_the_interval_widens_and_when_they_do_not_it_is_the_cases_one():
  rng = np.random.default_rng(5)
  images = rng.integers(1, 4, 60)
  # The same network three times over: nothing varies between runs.
  same = _study(rng, {"a": [[1.0], [1.0], [1.0]], "b": [[0.5], [0.5], [0.5]]}, images=images)
  # Pretraining runs of very different quality, the same mean as above.
  varied = _study(rng, {"a": [[0.2], [1.0], [1.8]], "b": [[0.5], [0.5], [0.5]]}, images=images)
  steady = _hierarchical(same, ("a", "b"))[1][("a", "b")]["mean_auc"]
  shaky = _hierarchical(varied, ("a", "b"))[1][("a", "b")]["mean_auc"]
  assert steady["ci_low"] == pytest.approx(steady["ci_low_cases"], abs=0.02)
  assert steady["ci_high"] == pytest.approx(steady["ci_high_cases"], abs=0.02)
  width = shaky["ci_high"] - shaky["ci_low"]
  assert width > 2 * (shaky["ci_high_cases"] - shaky["ci_low_cases"])
  assert width > 2 * (steady["ci_high"] - steady["ci_low"])


def test_one_run_per_arm_is_conditional_on_it_and_equals_the_cases_interval():
  rng = np.random.default_rng(6)
  study = _study(rng, {"a": [[1.2]], "b": [[0.4]]})
  per_arm, diffs = _hierarchical(study, ("a", "b"))
  d = diffs[("a", "b")]["mean_auc"]
  assert d["scope"] == "patients only; one level-1 run: a, b"
  assert (d["ci_low"], d["ci_high"]) == (d["ci_low_cases"], d["ci_high_cases"])
  assert per_arm["a"]["mean_auc"]["sd_runs"] is None


def test_the_interval_covers_a_known_difference_between_methods():
  """Two methods whose pretraining runs are drawn around known qualities: over repeated
  simulated studies the hierarchical interval covers the methods' true difference about as often
  as it says, where the interval over patients alone (one study's networks) rarely does."""
  covered, covered_cases = 0, 0
  for trial in range(12):
    rng = np.random.default_rng(100 + trial)
    runs = rng.normal(0.0, 0.5, size=(2, 4))  # each pretraining's own luck
    study = _study(
      rng,
      {"a": [[1.0 + e] for e in runs[0]], "b": [[1.0 + e] for e in runs[1]]},
      images=np.full(150, 2),
      noise=0.5,
    )
    d = _hierarchical(study, ("a", "b"), num_samples=200, seed=trial)[1][("a", "b")]["mean_auc"]
    covered += d["ci_low"] <= 0.0 <= d["ci_high"]  # the methods are equal on average
    covered_cases += d["ci_low_cases"] <= 0.0 <= d["ci_high_cases"]
  assert covered >= 10
  assert covered_cases <= 8


def test_run_weights_resample_units_then_runs():
  rng = np.random.default_rng(0)
  w = bootstrap.run_weights([2, 1, 3], 2000, rng)
  np.testing.assert_allclose(w.sum(1), 1.0)
  # Each unit is drawn 1/3 of the time on average, and within it each run equally.
  means = w.mean(0)
  np.testing.assert_allclose(means, [1 / 6, 1 / 6, 1 / 3, 1 / 9, 1 / 9, 1 / 9], atol=0.02)
  np.testing.assert_allclose(
    bootstrap.fixed_run_weights([2, 1, 3]), [1 / 6, 1 / 6, 1 / 3] + [1 / 9] * 3
  )


def test_metrics_with_ci_is_deterministic_and_drops_undefined_draws():
  scores, labels = np.array([0.2, 0.6, 0.9]), np.array([0, 0, 1])

  def fn(weights):
    return {"auc": eval_metrics.weighted_auc(scores, labels, weights)}

  out = bootstrap.metrics_with_ci(fn, 3, num_samples=100, seed=0)["auc"]
  draws = np.random.default_rng(0)
  expected = sum(
    2 not in idx or set(idx) == {2} for idx in (draws.integers(0, 3, 3) for _ in range(100))
  )
  assert out["dropped"] == expected and 0 < expected < 100
  assert out["value"] == out["ci_low"] == out["ci_high"] == 1.0
  assert out == bootstrap.metrics_with_ci(fn, 3, num_samples=100, seed=0)["auc"]
  with pytest.raises(ValueError, match="alpha"):
    bootstrap.percentile_interval(np.zeros(3), alpha=1.0)


def test_the_interval_of_a_mean_has_the_width_of_its_standard_error():
  values = np.random.default_rng(1).normal(size=200)

  def fn(weights):
    return {"mean": weights @ values / weights.sum(1)}

  out = bootstrap.metrics_with_ci(fn, 200, num_samples=400, seed=3)["mean"]
  assert out["ci_low"] < values.mean() < out["ci_high"]
  assert 0.15 < out["ci_high"] - out["ci_low"] < 0.45  # ≈ 2 · 1.96 / sqrt(200)
