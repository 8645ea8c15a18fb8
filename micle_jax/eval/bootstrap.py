"""Bootstrap intervals: over evaluation units for one model, and over training runs and units for
an arm of a study (several pretrainings, several fine-tunings of each) and the differences
between arms.

Metrics are computed on *weighted* units: a bootstrap resample of U units is a count per unit, and
a `WeightedMetrics` function maps a [B, U] matrix of counts to [B] values of each metric, so a
thousand resamples cost a few array operations (`evaluation.metrics_fn`). Draw i resamples the
units with `np.random.default_rng(seed).integers(0, U, size=U)`, the i-th call.

**Hierarchical intervals.** One trained network answers "how well does *this* network do?"; a
study asks "how well does the *method* do?", and another pretraining run of the method would have
given another network. An arm is a two-level sample: level-1 units (the pretraining runs, or for
a baseline without pretraining the seeds of its random initialisation) and, within each, its
fine-tuning runs (seeds, which also draw the label subset). Its value is the mean over level-1
units of the mean over their runs. Each draw of the hierarchical bootstrap

1. resamples the evaluation units (cases or patients) once, shared by every arm and run, so that
   two arms compared on a draw are scored on the same cases (paired by case);
2. resamples, independently for each arm, its level-1 units with replacement, and within each
   drawn unit its runs with replacement;

and the interval is the percentile interval of the arm's value (or of the difference of two arms'
values) over the draws. Where an arm has a single level-1 unit, the first stage of step 2 cannot
vary: the interval is then conditional on that one pretraining run (`scope` says so). The
interval over cases alone, with the runs held fixed (`ci_*_cases`), is reported beside it: it is
the interval of the given networks, not of the method.
"""

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import logging

# weights [B, U] (count of each unit in each of B resamples) -> {metric: [B] values}.
WeightedMetrics = Callable[[np.ndarray], Mapping[str, np.ndarray]]
_CHUNK = 250  # resamples per call of a WeightedMetrics (bounds the [B, rows] temporaries)


def unit_weights(num_units: int, num_samples: int, seed: int) -> np.ndarray:
  """[num_samples, num_units] counts: draw i is `default_rng(seed).integers(0, U, size=U)`,
  the i-th call, as a count per unit."""
  if num_units < 1 or num_samples < 1:
    raise ValueError(f"need num_units >= 1 and num_samples >= 1; got {num_units}, {num_samples}")
  rng = np.random.default_rng(seed)
  out = np.empty((num_samples, num_units), np.float64)
  for i in range(num_samples):
    out[i] = np.bincount(rng.integers(0, num_units, size=num_units), minlength=num_units)
  return out


def evaluate(fn: WeightedMetrics, weights: np.ndarray) -> dict[str, np.ndarray]:
  """{metric: [B]} of `fn` on every row of `weights`, in chunks."""
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, weights.shape[0], _CHUNK):
    for name, values in fn(weights[start : start + _CHUNK]).items():
      parts.setdefault(name, []).append(np.asarray(values, np.float64))
  return {name: np.concatenate(values) for name, values in parts.items()}


def full_data(fn: WeightedMetrics, num_units: int) -> dict[str, float]:
  """The metrics on every unit once."""
  return {k: float(v[0]) for k, v in fn(np.ones((1, num_units))).items()}


def percentile_interval(draws: np.ndarray, alpha: float) -> tuple[float, float, int]:
  """(low, high, dropped): the central 1 - alpha interval of the non-NaN draws."""
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1); got {alpha}")
  draws = np.asarray(draws, np.float64)
  valid = draws[~np.isnan(draws)]
  dropped = int(draws.size - valid.size)
  if dropped:
    logging.warning(
      "bootstrap: dropped %d of %d draws with an undefined (NaN) metric", dropped, draws.size
    )
  if valid.size == 0:
    return float("nan"), float("nan"), dropped
  low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
  return float(low), float(high), dropped


def metrics_with_ci(
  fn: WeightedMetrics,
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, dict[str, float | int]]:
  """Each metric on all units with its percentile bootstrap interval over resampled units.

  Returns:
    {metric: {value, ci_low, ci_high, num_units, num_bootstrap (draws made), dropped (draws
    with an undefined metric, left out of the interval)}}.
  """
  values = full_data(fn, num_units)
  draws = evaluate(fn, unit_weights(num_units, num_samples, seed))
  out = {}
  for name, value in values.items():
    low, high, dropped = percentile_interval(draws[name], alpha)
    out[name] = dict(
      value=value,
      ci_low=low,
      ci_high=high,
      num_units=num_units,
      num_bootstrap=num_samples,
      dropped=dropped,
    )
  return out


@dataclasses.dataclass(frozen=True)
class Arm:
  """The runs of one arm of a comparison.

  `groups` maps each level-1 unit's label (e.g. "p0", a pretraining seed) to the metrics of its
  fine-tuning runs, all scored on the same evaluation units.
  """

  name: str
  groups: Mapping[str, Sequence[WeightedMetrics]]

  @property
  def num_runs(self) -> int:
    return sum(len(runs) for runs in self.groups.values())


def fixed_run_weights(groups: Sequence[int]) -> np.ndarray:
  """[R] weights of the runs in the arm's value: 1/(units · runs of its unit) each."""
  return np.concatenate([np.full(n, 1.0 / (len(groups) * n)) for n in groups])


def run_weights(groups: Sequence[int], num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """[B, R] weights of a two-level resample of the runs: per draw, len(groups) units with
  replacement, and within each drawn unit as many of its runs as it has, with replacement; each
  drawn run weighs 1/(units · runs of its unit). Rows sum to 1."""
  offsets = np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)
  out = np.zeros((num_samples, int(offsets[-1])))
  for b in range(num_samples):
    for _ in range(len(groups)):
      unit = int(rng.integers(0, len(groups)))
      size = groups[unit]
      for run in rng.integers(0, size, size=size):
        out[b, offsets[unit] + run] += 1.0 / (len(groups) * size)
  return out


def _combine(weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
  """[B] Σ_r weights[b, r]·draws[r, b]; NaN where a run with weight has a NaN draw."""
  used = weights > 0
  nan = (np.isnan(draws.T) & used).any(1)
  total = np.where(used, np.nan_to_num(draws.T), 0.0)
  return np.where(nan, np.nan, (weights * total).sum(1))


def _sd(values: Sequence[float]) -> float | None:
  values = [v for v in values if np.isfinite(v)]
  return float(np.std(values, ddof=1)) if len(values) > 1 else None


@dataclasses.dataclass
class _ArmDraws:
  arm: Arm
  values: dict[str, np.ndarray]  # metric -> [R] on all units
  draws: dict[str, np.ndarray]  # metric -> [R, B]
  fixed: np.ndarray  # [R]
  resampled: np.ndarray  # [B, R]

  def unit_values(self, metric: str) -> dict[str, float]:
    out, start = {}, 0
    for label, runs in self.arm.groups.items():
      out[label] = float(np.mean(self.values[metric][start : start + len(runs)]))
      start += len(runs)
    return out


ACROSS_RUNS = "training runs and patients"
GIVEN_ONE_RUN = "patients only; one level-1 run: "


def _scope(*arms: Arm) -> str:
  """What the interval covers: training runs and patients, or patients only, given the single
  level-1 run of the arms named."""
  single = [a.name for a in arms if len(a.groups) == 1]
  return GIVEN_ONE_RUN + ", ".join(single) if single else ACROSS_RUNS


def hierarchical(
  arms: Sequence[Arm],
  comparisons: Sequence[tuple[str, str]],
  num_units: int,
  *,
  num_samples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> tuple[dict[str, dict[str, dict]], dict[tuple[str, str], dict[str, dict]]]:
  """Every arm's value and every (arm, baseline) difference, with hierarchical intervals.

  Args:
    arms: the arms, each with its runs' metrics on the same `num_units` evaluation units.
    comparisons: (arm, baseline) name pairs.
    num_units, num_samples, seed, alpha: as for `metrics_with_ci`; the unit resamples are those
      of `unit_weights(num_units, num_samples, seed)`, shared by all arms; each arm's run
      resamples come from a generator seeded by (seed, the arm's name).

  Returns:
    ({arm: {metric: {value, ci_low, ci_high, ci_low_cases, ci_high_cases, scope, runs, units,
    sd_runs, sd_units, dropped}}}, {(arm, baseline): {metric: {difference, ci_low, ci_high,
    ci_low_cases, ci_high_cases, scope, runs, baseline_runs, units, baseline_units, per_unit,
    dropped}}}); `per_unit` holds the difference of the unit means for each level-1 label the
    two arms share (e.g. each pretraining seed's own difference).
  """
  weights = unit_weights(num_units, num_samples, seed)
  state = {}
  for arm in arms:
    if not arm.groups or any(not runs for runs in arm.groups.values()):
      raise ValueError(f"arm {arm.name!r} has a level-1 unit without runs")
    fns = [fn for runs in arm.groups.values() for fn in runs]
    runs = [(full_data(fn, num_units), evaluate(fn, weights)) for fn in fns]
    names = list(runs[0][0])
    sizes = [len(r) for r in arm.groups.values()]
    rng = np.random.default_rng([seed, zlib.crc32(arm.name.encode())])
    state[arm.name] = _ArmDraws(
      arm,
      {m: np.array([r[0][m] for r in runs]) for m in names},
      {m: np.stack([r[1][m] for r in runs]) for m in names},
      fixed_run_weights(sizes),
      run_weights(sizes, num_samples, rng),
    )
  per_arm = {name: _arm_stats(s, alpha) for name, s in state.items()}
  diffs = {}
  for a, b in comparisons:
    diffs[(a, b)] = _difference_stats(state[a], state[b], alpha)
  return per_arm, diffs


def _arm_stats(s: _ArmDraws, alpha: float) -> dict[str, dict]:
  out = {}
  for metric, values in s.values.items():
    value = float(s.fixed @ values) if np.isfinite(values).all() else float("nan")
    low, high, dropped = percentile_interval(_combine(s.resampled, s.draws[metric]), alpha)
    cases = _combine(np.broadcast_to(s.fixed, s.resampled.shape), s.draws[metric])
    low_c, high_c, _ = percentile_interval(cases, alpha)
    out[metric] = dict(
      value=value,
      ci_low=low,
      ci_high=high,
      ci_low_cases=low_c,
      ci_high_cases=high_c,
      scope=_scope(s.arm),
      runs=s.arm.num_runs,
      units=len(s.arm.groups),
      sd_runs=_sd(values),
      sd_units=_sd(list(s.unit_values(metric).values())),
      dropped=dropped,
    )
  return out


def _difference_stats(a: _ArmDraws, b: _ArmDraws, alpha: float) -> dict[str, dict]:
  out = {}
  for metric in a.values:
    value_a = float(a.fixed @ a.values[metric])
    value_b = float(b.fixed @ b.values[metric])
    hier = _combine(a.resampled, a.draws[metric]) - _combine(b.resampled, b.draws[metric])
    low, high, dropped = percentile_interval(hier, alpha)
    cases = _combine(np.broadcast_to(a.fixed, a.resampled.shape), a.draws[metric]) - _combine(
      np.broadcast_to(b.fixed, b.resampled.shape), b.draws[metric]
    )
    low_c, high_c, _ = percentile_interval(cases, alpha)
    units_a, units_b = a.unit_values(metric), b.unit_values(metric)
    out[metric] = dict(
      difference=value_a - value_b,
      ci_low=low,
      ci_high=high,
      ci_low_cases=low_c,
      ci_high_cases=high_c,
      scope=_scope(a.arm, b.arm),
      runs=a.arm.num_runs,
      baseline_runs=b.arm.num_runs,
      units=len(a.arm.groups),
      baseline_units=len(b.arm.groups),
      per_unit={k: units_a[k] - units_b[k] for k in units_a if k in units_b},
      dropped=dropped,
    )
  return out
