"""What an evaluation scores, from saved per-image predictions: rows, bootstrap units, metrics.

Fine-tuning saves each evaluation's per-image predictions (`predictions/<eval>.npz` in its
workdir, `save_predictions`); its metrics and their bootstrap CIs, and the sweep's paired
differences between two models, are all computed from those files by `metrics_fn`, so a reported
number and a reported difference rest on one definition.

- Multi-class (dermatology): rows are cases (the mean of a case's image probabilities,
  aggregation "case", the paper's case-level accuracy) or images ("image"); metrics top-1 and
  top-3 accuracy; the bootstrap resamples cases.
- Multi-label (chest X-rays): rows are images ("image") or studies ("study": the mean over a
  study's images; a study's labels are one report's); metrics mean AUC over the labels with both
  classes present and the AUC of each label; the bootstrap resamples patients.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from micle_jax.eval import bootstrap, eval_metrics

PREDICTIONS_DIR = "predictions"
AGGREGATIONS = {"multiclass": ("case", "image"), "multilabel": ("image", "study")}
_IDS = ("image_id", "case_id", "patient_id", "study_id")


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Per-image outputs of one model on one evaluation split, in split order.

  `label` [N] for multi-class; `targets`, `target_mask` [N, K] for multi-label.
  """

  task: str  # "multiclass" or "multilabel"
  names: tuple[str, ...]
  image_id: np.ndarray
  case_id: np.ndarray
  patient_id: np.ndarray
  study_id: np.ndarray
  probs: np.ndarray
  label: np.ndarray | None = None
  targets: np.ndarray | None = None
  target_mask: np.ndarray | None = None


def predictions_path(workdir: epath.PathLike, eval_name: str) -> epath.Path:
  return epath.Path(workdir) / PREDICTIONS_DIR / f"{eval_name}.npz"


def save_predictions(path: epath.PathLike, preds: Predictions) -> None:
  """Writes `preds` as one .npz of plain arrays (strings as unicode, no pickles)."""
  arrays = {k: np.asarray(v) for k, v in dataclasses.asdict(preds).items() if v is not None}
  arrays["task"] = np.asarray(preds.task)
  arrays["names"] = np.asarray(preds.names)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez(f, **arrays)


def load_predictions(path: epath.PathLike) -> Predictions:
  """Reads a file written by `save_predictions`; raises FileNotFoundError naming it."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no saved predictions (rerun the fine-tuning's evaluation)")
  with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
    fields = {k: data[k] for k in data.files}
  fields["task"] = str(fields["task"])
  fields["names"] = tuple(str(n) for n in fields["names"])
  return Predictions(**fields)


def check_aggregation(task: str, aggregation: str, key: str = "eval_aggregation") -> str:
  if aggregation not in AGGREGATIONS[task]:
    raise ValueError(f"config.{key}={aggregation!r} not in {AGGREGATIONS[task]} for {task}")
  return aggregation


def _first_appearance_groups(keys: np.ndarray) -> tuple[list[str], np.ndarray]:
  """(distinct keys in order of first appearance, group index of each row)."""
  index: dict[str, int] = {}
  inverse = np.array([index.setdefault(str(k), len(index)) for k in keys], np.int64)
  return list(index), inverse


def _rows(preds: Predictions, aggregation: str) -> dict[str, np.ndarray]:
  """The scored rows after aggregation, each with the bootstrap unit (patient) it belongs to."""
  unit_key = preds.patient_id
  if aggregation == "image":
    rows = {"probs": preds.probs, "unit": unit_key}
    if preds.task == "multiclass":
      return rows | {"label": preds.label}
    return rows | {"targets": preds.targets, "target_mask": preds.target_mask}
  group = preds.case_id if aggregation == "case" else preds.study_id
  labels = (
    preds.label
    if preds.task == "multiclass"
    else np.concatenate([preds.targets, preds.target_mask], axis=1)
  )
  ids, probs, labels = eval_metrics.aggregate_by_case([str(g) for g in group], preds.probs, labels)
  _, first = np.unique(_first_appearance_groups(group)[1], return_index=True)
  rows = {"probs": probs, "unit": np.asarray(unit_key)[first]}
  if preds.task == "multiclass":
    return rows | {"label": labels}
  k = preds.probs.shape[1]
  return rows | {"targets": labels[:, :k], "target_mask": labels[:, k:]}


def metrics_fn(preds: Predictions, aggregation: str) -> tuple[list[str], bootstrap.WeightedMetrics]:
  """(bootstrap units, fn): fn(weights [B, U]) -> {metric: [B]} on the units' rows, each unit's
  rows counted as often as its weight says (a bootstrap resample's counts; ones: every unit once).

  The units are patients (a dataset without patient ids gives each case, or image, its own), so a
  patient with several cases or studies is drawn or left out whole. Metric names: "top1", "top3"
  (multi-class, k up to the class count) or "mean_auc" (over the labels defined in that draw)
  and "auc/<label>" (multi-label).
  """
  check_aggregation(preds.task, aggregation)
  rows = _rows(preds, aggregation)
  units, unit_of_row = _first_appearance_groups(rows["unit"])
  if preds.task == "multiclass":
    labels = np.asarray(rows["label"]).astype(np.int64)
    hits = {
      f"top{k}": eval_metrics.top_k_hits(rows["probs"], labels, k).astype(np.float64)
      for k in (1, 3)
      if k <= len(preds.names)
    }

    def accuracy(weights: np.ndarray) -> dict[str, np.ndarray]:
      w = np.asarray(weights, np.float64)[:, unit_of_row]
      total = w.sum(1)
      with np.errstate(invalid="ignore", divide="ignore"):
        return {name: np.where(total > 0, w @ h / total, np.nan) for name, h in hits.items()}

    return units, accuracy

  keep = np.asarray(rows["target_mask"]).astype(bool)
  targets = np.asarray(rows["targets"])
  columns = []
  for k, name in enumerate(preds.names):
    scores, labels = rows["probs"][keep[:, k], k], targets[keep[:, k], k]
    try:  # malformed labels or scores fail now, naming the label
      eval_metrics.weighted_auc(scores, labels, np.ones((1, scores.size)))
    except ValueError as e:
      raise ValueError(f"label {name!r}: {e}") from e
    columns.append((name, keep[:, k], scores, labels))

  def aucs(weights: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(weights, np.float64)[:, unit_of_row]
    per_label = {
      f"auc/{name}": eval_metrics.weighted_auc(scores, labels, w[:, kept])
      for name, kept, scores, labels in columns
    }
    stacked = np.stack(list(per_label.values()), 1)
    defined = ~np.isnan(stacked)
    count = defined.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = np.where(count > 0, np.where(defined, stacked, 0.0).sum(1) / count, np.nan)
    return {"mean_auc": mean} | per_label

  return units, aucs


def same_rows(a: Predictions, b: Predictions) -> bool:
  """Whether two prediction files score the same images in the same order (pairable)."""
  return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in _IDS) and a.names == b.names


def undefined_as_none(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
  """NaN (e.g. the AUC of a label with one class present) -> None: `null` in JSON."""
  return {
    name: {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in m.items()}
    for name, m in metrics.items()
  }


def finite_or_none(row: Mapping[str, Any]) -> dict[str, Any]:
  """A CSV/JSON row with NaN floats as None."""
  return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in row.items()}
