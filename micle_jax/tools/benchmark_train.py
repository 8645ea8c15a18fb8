"""Training-step benchmark: compile time, step time, images/s, FLOPs, MFU and peak memory.

Runs the real jitted `steps.pretrain_step` (`steps.compile_pretrain_step`) with the config's
model, optimizer, temperature and global batch on every device of `sharding.create_mesh()`, fed a
fixed random batch of the config's image size (no dataset; host-to-device transfer of batches is
not timed). FLOPs are counted twice: by XLA's cost analysis of the compiled step (what one device
runs; on GPU it misses the convolutions that become cuDNN calls), and from the step's jaxpr (the
convolutions and matrix products: the model FLOPs that MFU uses). The peak to compare them with is measured, not looked up: a
chain of square matmuls on every device at once (float32, or bfloat16 when the model computes in
bfloat16). The same code runs on CPU, GPU and TPU.
"""

import functools
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from micle_jax import pretrain, specs
from micle_jax.data import tasks
from micle_jax.models import native_conv, resnet
from micle_jax.runtime import sharding
from micle_jax.tools import benchmark_profile
from micle_jax.train import build

# Classes of the supervised monitor for `labels.task="multiclass"` when not given: the dataset
# decides at training time; the head is one Dense layer, a negligible part of the step.
DEFAULT_MULTICLASS_CLASSES = 10
# Length of the (warm-up + cosine) schedule the step evaluates; values do not change its cost.
_SCHEDULE_STEPS = 10_000
PEAK_MATMUL_SIZES = (2048, 8192)  # auto-sizing starts at the first and doubles up to the second


def monitor_classes(spec: specs.PretrainSpec, num_classes: int | None = None) -> int:
  """Outputs of the supervised monitor head for `spec.labels` (0 when there is none)."""
  task = tasks.get(spec.labels.task)
  if task.loss == "none":
    return 0
  if task.loss == "multiclass":
    return num_classes or DEFAULT_MULTICLASS_CLASSES
  return len(task.output_names({}, spec.labels))


def random_batch(
  spec: specs.PretrainSpec, num_classes: int, mesh: Mesh, seed: int = 0
) -> dict[str, jax.Array]:
  """A global batch shaped like the input pipeline's, with random views in [0, 1]."""
  n = sharding.local_batch_size(spec.batch_size)
  size = spec.augment.image_size
  rng = np.random.default_rng([seed, jax.process_index()])
  batch = {
    "view1": rng.random((n, size, size, 3), np.float32),
    "view2": rng.random((n, size, size, 3), np.float32),
    "multi_image": np.full((n,), float(spec.method == "micle"), np.float32),
  }
  loss = tasks.get(spec.labels.task).loss
  if loss == "multilabel":
    batch["targets"] = (rng.random((n, num_classes)) < 0.3).astype(np.float32)
    batch["target_mask"] = np.ones((n, num_classes), np.float32)
  elif loss == "multiclass":
    batch["label"] = rng.integers(0, num_classes, (n,), dtype=np.int32)
  return sharding.make_global_batch(batch, mesh)


def cost_analysis_flops(stage: Any) -> float | None:
  """The 'flops' of XLA's cost analysis of a `Compiled` (or `Lowered`) stage, if XLA reports them.

  For a compiled SPMD program the figure is one device's. On GPU it leaves out convolutions
  rewritten to cuDNN custom calls. Accepts the dict of current JAX and the list of dicts (one per
  HLO module) of older releases.
  """
  try:
    analysis = stage.cost_analysis()
  except Exception as e:  # noqa: BLE001 - backends without cost analysis raise various errors.
    logging.warning("cost_analysis() unavailable: %s", e)
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [float(a["flops"]) for a in analysis or () if a and a.get("flops") is not None]
  total = sum(flops)
  return total if flops and math.isfinite(total) and total > 0 else None


def _conv_flops(eqn: Any) -> float:
  """2 × output elements × (kernel window × input features per group) of a convolution."""
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * window * rhs[rhs_spec[1]]


def _dot_flops(eqn: Any) -> float:
  """2 × output elements × contracted size of a dot_general."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value: Any) -> list[Any]:
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops_by_kind(jaxpr: Any) -> dict[str, float]:
  """FLOPs of the convolutions (`conv`) and matrix products (`dot`) of a (closed) jaxpr.

  Nested jaxprs count too: loops their body `length` times (scan) or once (while); of the
  branches of a cond, the one with the most FLOPs.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = {"conv": 0.0, "dot": 0.0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total["conv"] += _conv_flops(eqn)
    elif name == "dot_general":
      total["dot"] += _dot_flops(eqn)
    elif name == "ffi_call":
      total["conv"] += native_conv.ffi_flops(eqn)
    subs = [jaxpr_flops_by_kind(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == "cond":
      subs = [max(subs, key=lambda s: s["conv"] + s["dot"])] if subs else []
    repeat = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in subs:
      for kind in total:
        total[kind] += sub[kind] * repeat
  return total


def jaxpr_matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the convolutions and matrix products of a (closed) jaxpr, nested ones included.

  These are the model FLOPs that MFU counts (elementwise work is left out); see
  `jaxpr_flops_by_kind` for how loops and conds count.
  """
  return sum(jaxpr_flops_by_kind(jaxpr).values())


def peak_memory(compiled: Any) -> tuple[int, str]:
  """(peak bytes, source): device allocator peak, else XLA's estimate, else the process's RSS.

  The first two are per device (the largest over local devices); the last is the whole process.
  """
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p]
  if peaks:
    return int(max(peaks)), "device_memory_stats"
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 - not every backend implements it.
    logging.warning("memory_analysis() unavailable: %s", e)
    m = None
  if m is not None:
    total = (
      m.temp_size_in_bytes
      + m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
    )
    if total > 0:
      return int(total), "compiled_memory_analysis"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


def _timed(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls, after one untimed call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.partial(jax.jit, static_argnums=2)
def _matmul_chain(x: jax.Array, w: jax.Array, iters: int) -> jax.Array:
  """`iters` dependent batched matmuls x ← x·w ([D, n, n] each; one matrix per device)."""
  return jax.lax.fori_loop(0, iters, lambda _, y: jnp.einsum("dij,djk->dik", y, w), x)


def measure_peak_matmul(
  mesh: Mesh,
  dtype: jnp.dtype,
  *,
  size: int | None = None,
  target_s: float = 0.2,
  repeats: int = 5,
) -> dict[str, Any]:
  """Achievable FLOP/s of all devices of `mesh` together, from square matmuls run on each at once.

  Args:
    mesh: the devices; each multiplies its own n×n matrices (devices that share cores, like XLA
      CPU devices, are measured sharing them, as the training step uses them).
    dtype: float32, or bfloat16 for a bfloat16 model.
    size: n; None picks it: 2048, doubled while one matmul takes under target_s / 8, up to 8192.
    target_s: each timed call chains enough matmuls to take about this long.
    repeats: timed calls; the median counts.

  Returns:
    {"flops_per_s", "flops_per_s_per_device", "size", "dtype", "chain_length", "time_s"}.
  """
  num = mesh.devices.size
  spread = NamedSharding(mesh, P(mesh.axis_names))

  def operands(n: int) -> tuple[jax.Array, jax.Array]:
    @functools.partial(jax.jit, out_shardings=(spread, spread))
    def make():
      kx, kw = jax.random.split(jax.random.PRNGKey(0))
      x = jax.random.normal(kx, (num, n, n), jnp.float32)
      w = jax.random.normal(kw, (num, n, n), jnp.float32) / math.sqrt(n)  # keeps ‖x‖ ~ stable
      return x.astype(dtype), w.astype(dtype)

    return make()

  n = size or PEAK_MATMUL_SIZES[0]
  x, w = operands(n)
  seconds = _timed(_matmul_chain, x, w, 1, repeats=3)
  while size is None and seconds < target_s / 8 and n < PEAK_MATMUL_SIZES[1]:
    n *= 2
    x, w = operands(n)
    seconds = _timed(_matmul_chain, x, w, 1, repeats=3)
  chain = int(min(max(round(target_s / seconds), 1), 1000))
  seconds = _timed(_matmul_chain, x, w, chain, repeats=repeats)
  total = 2.0 * n**3 * chain * num / seconds
  return {
    "flops_per_s": total,
    "flops_per_s_per_device": total / num,
    "size": n,
    "dtype": jnp.dtype(dtype).name,
    "chain_length": chain,
    "time_s": seconds,
  }


def _build_run(spec: specs.PretrainSpec, mesh: Mesh, num_classes: int) -> build.Built:
  """The pretraining run of `spec` as `pretrain.train_and_evaluate` builds it (`train.build`)."""
  epochs = spec.num_epochs if spec.num_epochs > 0 else 1
  plan = pretrain.plan(
    spec,
    num_classes=num_classes,
    total_steps=_SCHEDULE_STEPS,
    steps_per_epoch=_SCHEDULE_STEPS / epochs,
  )
  return build.build(plan, mesh)


class Prepared(NamedTuple):
  """What a benchmark of a pretraining config runs: the spec, mesh, run and a random batch."""

  spec: specs.PretrainSpec
  mesh: Mesh
  num_classes: int
  run: build.Built
  batch: dict[str, jax.Array]


def prepare(config: ml_collections.ConfigDict, num_classes: int | None = None) -> Prepared:
  """Validates `config` and builds its step, state and a random batch on every device.

  Args:
    config: a pretraining config.
    num_classes: classes of a multiclass monitor head (default `DEFAULT_MULTICLASS_CLASSES`).
  """
  spec = specs.from_config(specs.PretrainSpec, config)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(spec.batch_size, mesh, key="config.batch_size")
  classes = monitor_classes(spec, num_classes)
  run = _build_run(spec, mesh, classes)
  return Prepared(spec, mesh, classes, run, random_batch(spec, classes, mesh, seed=spec.seed))


class _Timed(NamedTuple):
  state: Any
  compiled: Any
  times: list[float]
  metrics: dict[str, Any]
  lower_s: float
  compile_s: float


def _time_steps(step_fn, state, batch, *, steps_timed: int, warmup: int) -> _Timed:
  """Lowers and compiles the step, runs `warmup` steps, then times `steps_timed` one by one."""
  start = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  logging.info("Step lowered in %.2f s, compiled in %.2f s", lower_s, compile_s)
  metrics = {}
  for _ in range(warmup):
    state, metrics = jax.block_until_ready(compiled(state, batch))
  times = []
  for _ in range(steps_timed):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  return _Timed(state, compiled, times, metrics, lower_s, compile_s)


def _profile(compiled, state, batch, log_dir: str, steps: int, mesh: Mesh):
  """(state after the traced steps, the device-time breakdown of `benchmark_profile`)."""
  held = {"state": state}

  def one_step() -> Any:
    held["state"], step_metrics = compiled(held["state"], batch)
    return step_metrics

  profile = benchmark_profile.profile_steps(
    compiled, one_step, steps=steps, log_dir=log_dir, num_devices=mesh.devices.size
  )
  return held["state"], profile


def benchmark_train(
  config: ml_collections.ConfigDict,
  *,
  steps_timed: int,
  warmup: int,
  peak_matmul_size: int | None = None,
  num_classes: int | None = None,
  profile_dir: str | None = None,
  profile_steps: int = 5,
) -> dict[str, Any]:
  """Compiles and times the pretraining step of `config`; see docs/benchmark.md for the keys.

  Args:
    config: a pretraining config (validated here).
    steps_timed: timed steps; the median counts.
    warmup: untimed steps after compilation.
    peak_matmul_size: n of the peak-FLOP/s matmul (None: chosen by `measure_peak_matmul`).
    num_classes: classes of a multiclass monitor head (default `DEFAULT_MULTICLASS_CLASSES`).
    profile_dir: if set, also trace `profile_steps` steps there and break the step's device time
      down by kind of work (`benchmark_profile`); the result's `profile` is None otherwise.
    profile_steps: steps to trace.

  Returns:
    The `train` section of the benchmark's JSON.
  """
  if steps_timed < 1 or warmup < 0:
    raise ValueError(f"steps={steps_timed} must be >= 1 and warmup={warmup} >= 0")
  prepared = prepare(config, num_classes)
  mesh, batch = prepared.mesh, prepared.batch
  state, step_fn = prepared.run.state, prepared.run.step_fn

  timed = _time_steps(step_fn, state, batch, steps_timed=steps_timed, warmup=warmup)
  state, compiled, times, metrics = timed.state, timed.compiled, timed.times, timed.metrics
  lower_s, compile_s, step_s = timed.lower_s, timed.compile_s, statistics.median(timed.times)
  memory_bytes, memory_source = peak_memory(compiled)
  profile = None
  if profile_dir:
    state, profile = _profile(compiled, state, batch, profile_dir, profile_steps, mesh)

  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  peak = measure_peak_matmul(mesh, dtype, size=peak_matmul_size)
  device_flops = cost_analysis_flops(compiled)
  flops = device_flops * mesh.devices.size if device_flops is not None else None
  flops_by_kind = jaxpr_flops_by_kind(jax.make_jaxpr(step_fn)(state, batch))
  model_flops = sum(flops_by_kind.values()) or None
  mfu_source = "model_flops_per_step" if model_flops is not None else "flops_per_step"
  counted = model_flops if model_flops is not None else flops
  achieved = counted / step_s if counted is not None else None
  images = 2 * config.batch_size
  return {
    "method": config.method,
    "model": config.model.to_dict(),
    "num_params": resnet.count_params(state.params),
    "global_batch_size": config.batch_size,
    "image_size": config.augment.image_size,
    "num_devices": mesh.devices.size,
    "lower_time_s": lower_s,
    "compile_time_s": lower_s + compile_s,
    "steps": steps_timed,
    "warmup": warmup,
    "step_time_s": step_s,
    "step_time_min_s": min(times),
    "step_time_max_s": max(times),
    "images_per_s": images / step_s,
    "pairs_per_s": config.batch_size / step_s,
    "flops_per_step": flops,
    "flops_per_step_per_device": device_flops,
    "model_flops_per_step": model_flops,
    "model_flops_conv_per_step": flops_by_kind["conv"],
    "model_flops_dot_per_step": flops_by_kind["dot"],
    "mfu_flops_source": mfu_source if counted is not None else None,
    "achieved_flops_per_s": achieved,
    "peak_flops_per_s": peak["flops_per_s"],
    "peak_matmul": peak,
    "mfu": achieved / peak["flops_per_s"] if achieved is not None else None,
    "peak_memory_bytes": memory_bytes,
    "peak_memory_source": memory_source,
    "final_loss": float(metrics["loss"]),
    "profile": _with_rates(profile, flops_by_kind, peak["flops_per_s"] / mesh.devices.size),
  }


def _with_rates(
  profile: dict[str, Any] | None, flops_by_kind: dict[str, float], peak_per_device: float
) -> dict[str, Any] | None:
  """Adds the convolutions' FLOP/s while they run (per device) and its share of the peak."""
  if profile is None:
    return None
  devices = max(profile.get("num_devices", 1), 1)
  conv_s = profile["by_category_s"]["convolution"]
  conv_rate = flops_by_kind["conv"] / devices / conv_s if conv_s > 0 else None
  return {
    **profile,
    "convolution_flops_per_s": conv_rate,
    "convolution_vs_peak": conv_rate / peak_per_device if conv_rate else None,
  }
