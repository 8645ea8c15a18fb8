"""Host-side evaluation metrics for fine-tuned classifiers: AUC, top-k, case aggregation, bootstrap.

Everything here is pure NumPy on host arrays, so the fine-tune evaluation driver can call it on
gathered predictions without touching jax. Undefined metrics (an AUC with one class present, a
bootstrap resample that misses a class) are `nan`, never an exception or a warning; malformed
inputs (NaN scores, labels outside {0, 1}, mismatched shapes) raise `ValueError` naming the problem.

Confidence intervals resample *units* (derm cases, CXR patients), not images: `metric_fn` receives
an index array over units and is responsible for mapping it to whatever rows it scores.
"""

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import logging

# How many offending case ids an error message lists before eliding the rest.
_MAX_NAMED = 5


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of a 1-D array, tied values sharing the mean of the ranks they span."""
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)  # 1-based rank of the last member of each tied group.
  mean_rank = last - (counts - 1) / 2.0
  return mean_rank[inverse]


def _check_binary_labels(labels: np.ndarray, what: str) -> np.ndarray:
  """Returns `labels` as a bool array, or raises if any value is not 0 or 1."""
  if labels.dtype == bool:
    return labels
  bad = ~((labels == 0) | (labels == 1))
  if np.any(bad):
    raise ValueError(
      f"{what} must be 0 or 1; got {int(bad.sum())} other value(s), e.g. {labels[bad][:5]!r}"
    )
  return labels == 1


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Binary ROC AUC from the Mann-Whitney U statistic, ties between classes counting 1/2.

  Equals the probability that a random positive scores above a random negative (a tie adds 1/2).

  Args:
    scores: [N] real scores, higher meaning more positive; must not contain NaN.
    labels: [N] labels in {0, 1} (bool, int or float).

  Returns:
    The AUC in [0, 1], or `nan` when `labels` hold fewer than two distinct classes.

  Raises:
    ValueError: on shape mismatch, NaN scores or labels outside {0, 1}.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(
      f"scores and labels must be 1-D of equal length; got {scores.shape} and {labels.shape}"
    )
  if np.isnan(scores).any():
    raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s)")
  positive = _check_binary_labels(labels, "labels")
  num_pos = int(positive.sum())
  num_neg = positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  rank_sum = _average_ranks(scores)[positive].sum()
  u_statistic = rank_sum - num_pos * (num_pos + 1) / 2.0
  return float(u_statistic / (num_pos * num_neg))


def per_label_auc(
  scores: np.ndarray,
  targets: np.ndarray,
  mask: np.ndarray | None,
  names: Sequence[str],
) -> dict[str, float]:
  """ROC AUC of each label of a multi-label problem, over the cells the mask keeps.

  Args:
    scores: [N, K] scores, one column per label.
    targets: [N, K] binary targets; masked-out cells may hold anything (e.g. -1 or NaN for
      uncertain or missing labels) and are never inspected.
    mask: [N, K] truthy where a cell counts, or None to count every cell.
    names: K label names, the keys of the result (in this order).

  Returns:
    {name: AUC}, `nan` for a label whose kept cells hold a single class (or none).
  """
  scores = np.asarray(scores)
  targets = np.asarray(targets)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(
      f"scores and targets must be [N, K] of equal shape; got {scores.shape} and {targets.shape}"
    )
  keep = np.ones(scores.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  if keep.shape != scores.shape:
    raise ValueError(f"mask shape {keep.shape} != scores shape {scores.shape}")
  if len(names) != scores.shape[1] or len(set(names)) != len(names):
    raise ValueError(f"need {scores.shape[1]} distinct label names; got {list(names)}")
  out = {}
  for k, name in enumerate(names):
    rows = keep[:, k]
    try:
      out[name] = roc_auc(scores[rows, k], targets[rows, k])
    except ValueError as e:
      raise ValueError(f"label {name!r}: {e}") from e
  return out


def num_defined(per_label: Mapping[str, float]) -> int:
  """How many labels of a `per_label_auc` result have a defined (non-NaN) AUC."""
  return int(sum(not np.isnan(v) for v in per_label.values()))


def mean_auc(per_label: Mapping[str, float]) -> float:
  """Mean AUC over labels with a defined AUC; `nan` if none. `num_defined` gives their count."""
  defined = [v for v in per_label.values() if not np.isnan(v)]
  return float(np.mean(defined)) if defined else float("nan")


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of examples whose label is among the k highest-scoring classes.

  Ties are broken deterministically by class index: among equal scores the lower class index
  ranks higher. So with all scores equal, exactly classes 0..k-1 count as the top k.

  Args:
    probs: [N, C] class probabilities or logits (only their order matters); no NaN.
    labels: [N] integer class indices in [0, C).
    k: how many top classes count as a hit, 1 <= k <= C.

  Returns:
    The accuracy in [0, 1], or `nan` when N == 0.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"need probs [N, C] and labels [N]; got {probs.shape} and {labels.shape}")
  num_classes = probs.shape[1]
  if not 1 <= k <= num_classes:
    raise ValueError(f"k must be in [1, {num_classes}]; got {k}")
  if np.isnan(probs).any():
    raise ValueError(f"probs contain {int(np.isnan(probs).sum())} NaN value(s)")
  if not np.issubdtype(labels.dtype, np.integer) or np.any((labels < 0) | (labels >= num_classes)):
    raise ValueError(f"labels must be integer class indices in [0, {num_classes})")
  if labels.size == 0:
    return float("nan")
  label_score = probs[np.arange(labels.size), labels][:, None]
  lower_index = np.arange(num_classes)[None, :] < labels[:, None]
  # 0-based rank of the label: classes strictly above it, plus equal ones with a lower index.
  rank = (probs > label_score).sum(1) + ((probs == label_score) & lower_index).sum(1)
  return float(np.mean(rank < k))


def _rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N] bool: whether rows of `a` and `b` agree, NaN matching NaN."""
  same = a == b
  if np.issubdtype(a.dtype, np.floating):
    same |= np.isnan(a) & np.isnan(b)
  return same.all(axis=tuple(range(1, same.ndim)))


def aggregate_by_case(
  case_ids: Sequence[str],
  probs: np.ndarray,
  labels: np.ndarray,
) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Averages the predictions of each case's images (case-level derm evaluation).

  Args:
    case_ids: [N] case id of each image.
    probs: [N, C] per-image probabilities (any [N, ...] shape works).
    labels: [N] class labels or [N, K] multi-label targets; all images of a case must agree
      (NaN agrees with NaN).

  Returns:
    (ids, case_probs [M, ...], case_labels [M] or [M, K]) for the M distinct cases, in order of
    first appearance in `case_ids`; `case_probs` is float64.

  Raises:
    ValueError: on length mismatch, or naming the cases whose images carry different labels.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if not (len(case_ids) == len(probs) == len(labels)):
    raise ValueError(
      f"case_ids, probs and labels differ in length: {len(case_ids)}, {len(probs)}, {len(labels)}"
    )
  index_of: dict[str, int] = {}
  inverse = np.array([index_of.setdefault(c, len(index_of)) for c in case_ids], np.int64)
  ids = list(index_of)
  # Cases are numbered by first appearance, so `first[m]` is the first image of case m.
  _, first = np.unique(inverse, return_index=True)
  case_labels = labels[first]
  conflicts = sorted(set(inverse[~_rows_equal(labels, case_labels[inverse])].tolist()))
  if conflicts:
    named = [ids[i] for i in conflicts[:_MAX_NAMED]]
    more = f" and {len(conflicts) - _MAX_NAMED} more" if len(conflicts) > _MAX_NAMED else ""
    raise ValueError(f"conflicting labels within case(s) {named}{more}")
  sums = np.zeros((len(ids),) + probs.shape[1:], np.float64)
  np.add.at(sums, inverse, probs)
  counts = np.bincount(inverse, minlength=len(ids)).reshape((-1,) + (1,) * (probs.ndim - 1))
  return ids, sums / counts, case_labels


def bootstrap_draws(
  metric_fn: Callable[[np.ndarray], float],
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
) -> np.ndarray:
  """[num_samples] metric values on unit resamples drawn with replacement (NaN kept).

  Draw i calls `metric_fn` with `num_units` indices from `np.random.default_rng(seed)`, so the
  draws are a deterministic function of `seed`.
  """
  return np.array(
    [float(metric_fn(idx)) for idx in _draw_indices(num_units, num_samples, seed)], np.float64
  )


def _percentile_interval(draws: np.ndarray, alpha: float) -> tuple[float, float, int]:
  """(low, high, dropped): the central 1 - alpha interval of the non-NaN draws."""
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1); got {alpha}")
  valid = draws[~np.isnan(draws)]
  dropped = draws.size - valid.size
  if dropped:
    logging.warning(
      "bootstrap: dropped %d of %d draws with an undefined (NaN) metric", dropped, draws.size
    )
  if valid.size == 0:
    return float("nan"), float("nan"), dropped
  low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
  return float(low), float(high), dropped


def bootstrap_ci(
  metric_fn: Callable[[np.ndarray], float],
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> tuple[float, float]:
  """Percentile bootstrap (1 - alpha) confidence interval, resampling units with replacement.

  Draws whose metric is NaN (e.g. a resample holding one class) are dropped; their count is
  logged here and returned as `dropped` by `metric_with_ci`.

  Args:
    metric_fn: maps an index array over units (cases, patients) to the metric on those units;
      repeated indices must count repeatedly.
    num_units: how many units there are; each draw resamples this many.
    num_samples: bootstrap draws.
    seed: seed of `np.random.default_rng`; the interval is deterministic given it.
    alpha: 1 - coverage; the interval spans the alpha/2 and 1 - alpha/2 quantiles.

  Returns:
    (low, high), or (nan, nan) if every draw was NaN.
  """
  draws = bootstrap_draws(metric_fn, num_units, num_samples=num_samples, seed=seed)
  low, high, _ = _percentile_interval(draws, alpha)
  return low, high


def metric_with_ci(
  metric_fn: Callable[[np.ndarray], float],
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, float | int]:
  """The metric on all units with its bootstrap interval, ready to log.

  Args are those of `bootstrap_ci`.

  Returns:
    {value: metric_fn(arange(num_units)), ci_low, ci_high, num_units, num_bootstrap: draws made
    (num_samples), dropped: NaN draws left out, so the interval rests on num_bootstrap - dropped}.
  """
  value = float(metric_fn(np.arange(num_units)))
  draws = bootstrap_draws(metric_fn, num_units, num_samples=num_samples, seed=seed)
  low, high, dropped = _percentile_interval(draws, alpha)
  return dict(
    value=value,
    ci_low=low,
    ci_high=high,
    num_units=num_units,
    num_bootstrap=num_samples,
    dropped=dropped,
  )


MetricsFn = Callable[[np.ndarray], Mapping[str, float]]


def _draw_indices(num_units: int, num_samples: int, seed: int):
  """The bootstrap's resamples: draw i is `default_rng(seed).integers(0, U, size=U)`, i-th call."""
  if num_units < 1 or num_samples < 1:
    raise ValueError(f"need num_units >= 1 and num_samples >= 1; got {num_units}, {num_samples}")
  rng = np.random.default_rng(seed)
  for _ in range(num_samples):
    yield rng.integers(0, num_units, size=num_units)


def metrics_with_ci(
  metrics_fn: MetricsFn,
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, dict[str, float | int]]:
  """`metric_with_ci` for several metrics computed together on the same resamples.

  Args:
    metrics_fn: index array over units -> {metric name: value} (the same names every call).
    num_units, num_samples, seed, alpha: as for `bootstrap_ci`; the draws are those of
      `bootstrap_draws` with the same seed, so each metric's interval equals `metric_with_ci`'s.

  Returns:
    {metric: {value, ci_low, ci_high, num_units, num_bootstrap, dropped}}.
  """
  values = dict(metrics_fn(np.arange(num_units)))
  draws = {name: [] for name in values}
  for idx in _draw_indices(num_units, num_samples, seed):
    for name, value in metrics_fn(idx).items():
      draws[name].append(float(value))
  out = {}
  for name, value in values.items():
    low, high, dropped = _percentile_interval(np.asarray(draws[name], np.float64), alpha)
    out[name] = dict(
      value=float(value),
      ci_low=low,
      ci_high=high,
      num_units=num_units,
      num_bootstrap=num_samples,
      dropped=dropped,
    )
  return out


def paired_bootstrap(
  pairs: Sequence[tuple[MetricsFn, MetricsFn]],
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, dict[str, float | int]]:
  """Paired bootstrap of a difference between two models scored on the same units.

  Each pair is (model A's metrics, model B's metrics) on the *same* units, e.g. one pair per
  training seed. Every draw resamples the units once and scores both models of every pair on that
  same resample, so the case-to-case variation they share cancels; the draw is the mean over
  pairs of A − B (pooled over seeds). NaN draws (a resample where a metric is undefined) are
  dropped and counted.

  Returns:
    {metric: {difference (mean over pairs of A − B on all units), ci_low, ci_high, num_units,
    num_bootstrap, dropped, pairs}}.
  """
  if not pairs:
    raise ValueError("paired_bootstrap needs at least one (A, B) pair")

  def mean_difference(idx: np.ndarray) -> dict[str, float]:
    sums: dict[str, float] = {}
    for fn_a, fn_b in pairs:
      a, b = fn_a(idx), fn_b(idx)
      for name in a:
        sums[name] = sums.get(name, 0.0) + float(a[name]) - float(b[name])
    return {name: total / len(pairs) for name, total in sums.items()}

  result = metrics_with_ci(
    mean_difference, num_units, num_samples=num_samples, seed=seed, alpha=alpha
  )
  for stats in result.values():
    stats["difference"] = stats.pop("value")
    stats["pairs"] = len(pairs)
  return result
