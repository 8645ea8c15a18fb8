"""Paired differences between the inits of a sweep, with paired-bootstrap CIs (`differences.csv`).

The claim a label-efficiency study makes is a difference: MICLe minus scratch, MICLe minus
SimCLR, at one label fraction, on one evaluation set. Both models of a comparison are scored on
the same cases, so their errors share the cases' difficulty; a paired bootstrap resamples the
cases once per draw and scores both models on that same resample, and that shared variation
cancels. Per-model CIs would overlap where the paired one does not.

Pairing: for one (evaluation, label fraction), the init run with seed s is paired with the
baseline run with seed s: the seed picks the label-fraction subset, so both trained on the same
patients. The difference is the mean over the seeds both have of (init − baseline) on all cases;
each bootstrap draw resamples the cases once and averages the seeds' differences on it (pooled
over seeds). Draw i resamples with `np.random.default_rng(seed).integers(0, U, size=U)`, the
i-th call. Every init is compared with `scratch`, and `micle` with `simclr` when both exist.
"""

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from micle_jax.eval import eval_metrics, evaluation

BASELINE = "scratch"
COLUMNS = (
  "eval",
  "fraction",
  "metric",
  "init",
  "baseline",
  "difference",
  "ci_low",
  "ci_high",
  "seeds",
)


def comparisons(inits: Sequence[str]) -> list[tuple[str, str]]:
  """(init, baseline) pairs: every init against scratch, and micle against simclr."""
  names = set(inits)
  pairs = [(i, BASELINE) for i in sorted(names) if i != BASELINE and BASELINE in names]
  if {"micle", "simclr"} <= names:
    pairs.append(("micle", "simclr"))
  return pairs


def _fns(run: Mapping[str, Any], eval_name: str, cache: dict) -> tuple[Any, list[str], Any]:
  """(predictions, units, metrics fn) of one run's evaluation, loaded once."""
  key = (run["workdir"], eval_name)
  if key not in cache:
    preds = evaluation.load_predictions(evaluation.predictions_path(run["workdir"], eval_name))
    units, fn = evaluation.metrics_fn(preds, run["results"]["eval_aggregation"])
    cache[key] = (preds, units, fn)
  return cache[key]


def paired_differences(
  runs: Sequence[Mapping[str, Any]], *, num_samples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
  """One row (COLUMNS) per (eval, fraction, metric, init, baseline) that the runs allow.

  Args:
    runs: {"init", "workdir", "results"} per fine-tuning run (`results` is its results.json).
    num_samples: bootstrap draws.
    seed: the bootstrap's seed.

  Raises:
    ValueError: when two runs to be paired scored different images, or aggregated differently.
    FileNotFoundError: naming a run's missing predictions file.
  """
  by_cell: dict[tuple[str, float], dict[str, dict[int, Mapping[str, Any]]]] = (
    collections.defaultdict(lambda: collections.defaultdict(dict))
  )
  for run in runs:
    results = run["results"]
    for eval_name in results["eval"]:
      cell = (eval_name, float(results["label_fraction"]))
      by_cell[cell][run["init"]][int(results["seed"])] = run
  cache: dict = {}
  rows = []
  for (eval_name, fraction), inits in sorted(by_cell.items()):
    for init, baseline in comparisons(list(inits)):
      seeds = sorted(set(inits[init]) & set(inits[baseline]))
      if not seeds:
        continue
      pairs, units = [], None
      for s in seeds:
        a_run, b_run = inits[init][s], inits[baseline][s]
        a_preds, a_units, a_fn = _fns(a_run, eval_name, cache)
        b_preds, b_units, b_fn = _fns(b_run, eval_name, cache)
        if not evaluation.same_rows(a_preds, b_preds) or a_units != b_units:
          raise ValueError(
            f"{a_run['workdir']} and {b_run['workdir']}: {eval_name} predictions cover different "
            "images, so they cannot be paired"
          )
        if a_run["results"]["eval_aggregation"] != b_run["results"]["eval_aggregation"]:
          raise ValueError(f"{a_run['workdir']} and {b_run['workdir']}: different eval_aggregation")
        if units is not None and units != a_units:
          raise ValueError(f"{eval_name}: runs of different seeds scored different cases")
        units = a_units
        pairs.append((a_fn, b_fn))
      stats = eval_metrics.paired_bootstrap(pairs, len(units), num_samples=num_samples, seed=seed)
      for metric, m in stats.items():
        rows.append(
          {
            "eval": eval_name,
            "fraction": fraction,
            "metric": metric,
            "init": init,
            "baseline": baseline,
            "difference": m["difference"],
            "ci_low": m["ci_low"],
            "ci_high": m["ci_high"],
            "seeds": len(seeds),
          }
        )
  return [evaluation.finite_or_none(r) for r in rows]
