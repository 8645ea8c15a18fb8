"""Host-side evaluation metrics for fine-tuned classifiers: AUC, top-k, case aggregation.

Everything here is pure NumPy on host arrays, so the fine-tune evaluation driver can call it on
gathered predictions without touching jax. Undefined metrics (an AUC with one class present, a
bootstrap resample that misses a class) are `nan`, never an exception or a warning; malformed
inputs (NaN scores, labels outside {0, 1}, mismatched shapes) raise `ValueError` naming the problem.

`weighted_auc` and `top_k_hits` serve the bootstrap (`bootstrap.py`, `evaluation.metrics_fn`): a
resample of units is a weight per row, and a thousand resamples are scored at once.
"""

from collections.abc import Mapping, Sequence

import numpy as np

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
  hits = top_k_hits(probs, labels, k)
  return float(np.mean(hits)) if hits.size else float("nan")


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """`roc_auc` of rows repeated `weights` times, for many weightings at once.

  A bootstrap resample is a count per row; this is the AUC of the resampled rows, for each row of
  `weights`, without materialising them: sum over positives i and negatives j of w_i·w_j·[s_i >
  s_j] (a tie counting 1/2), over (sum of positive weights)·(sum of negative weights).

  Args:
    scores: [N] real scores, no NaN.
    labels: [N] labels in {0, 1}.
    weights: [B, N] non-negative weights (e.g. bootstrap counts), one weighting per row.

  Returns:
    [B] AUCs, NaN where a weighting leaves one class without weight.
  """
  scores = np.asarray(scores, np.float64)
  positive = _check_binary_labels(np.asarray(labels), "labels")
  weights = np.asarray(weights, np.float64)
  if scores.ndim != 1 or positive.shape != scores.shape or weights.shape[-1:] != scores.shape:
    raise ValueError(
      f"need scores [N], labels [N], weights [B, N]; got {scores.shape}, {positive.shape}, "
      f"{weights.shape}"
    )
  if np.isnan(scores).any():
    raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s)")
  weights = weights.reshape(-1, scores.size)
  if scores.size == 0:
    return np.full(weights.shape[0], np.nan)
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tied groups
  w = weights[:, order]
  is_pos = positive[order]
  pos = np.add.reduceat(np.where(is_pos, w, 0.0), starts, axis=1)  # [B, groups]
  neg = np.add.reduceat(np.where(is_pos, 0.0, w), starts, axis=1)
  below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
  total_pos, total_neg = pos.sum(1), neg.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (pos * (below + 0.5 * neg)).sum(1) / (total_pos * total_neg)
  return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def top_k_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """[N] bool: whether each example's label is among its k highest-scoring classes, ties broken as
  `top_k_accuracy` breaks them (its mean over rows)."""
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
  label_score = probs[np.arange(labels.size), labels][:, None]
  lower_index = np.arange(num_classes)[None, :] < labels[:, None]
  # 0-based rank of the label: classes strictly above it, plus equal ones with a lower index.
  rank = (probs > label_score).sum(1) + ((probs == label_score) & lower_index).sum(1)
  return rank < k


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
