r"""Benchmark: training-step speed, FLOPs and memory, and input-pipeline throughput per core.

  python -m micle_jax.benchmark --config=configs/cxr.py:demo --out=/tmp/bench_demo.json
  python -m micle_jax.benchmark --config=configs/cxr.py --config.batch_size=128 \
      --config.model.dtype=bfloat16 --out=bench.json --steps=10

Writes one JSON file with the sections `train` (`benchmark_train`), `input` (`benchmark_input`),
`vs_torch` (`benchmark_torch`: the same step in PyTorch eager, timed alternately with ours; with
`--vs_torch`, which needs `pip install -r requirements-bench.txt`) and `environment`;
docs/benchmark.md explains every key. No dataset is needed: the step is fed
random images, the input pipeline synthetic JPEGs. The same command runs on CPU, GPU and TPU.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import flax
import jax
import ml_collections
import optax
from absl import flags, logging
from etils import epath

from micle_jax import app


def _load_average() -> list[float] | None:
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where and with what the benchmark ran: devices, versions, host load and the config."""
  device = jax.devices()[0]
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
    "jax_version": jax.__version__,
    "jaxlib_version": importlib.metadata.version("jaxlib"),
    "flax_version": flax.__version__,
    "optax_version": optax.__version__,
    "python_version": platform.python_version(),
    "host_cpu_count": os.cpu_count(),
    "host_load_average": _load_average(),
    "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "argv": list(sys.argv),
    "config": config.to_dict(),
  }


def run(
  config: ml_collections.ConfigDict,
  *,
  steps: int = 20,
  warmup: int = 3,
  input_images: int = 200,
  input_size: int = 224,
  input_repeats: int = 3,
  skip_train: bool = False,
  skip_input: bool = False,
  peak_matmul_size: int | None = None,
  num_classes: int | None = None,
  profile_dir: str | None = None,
  profile_steps: int = 5,
  vs_torch: bool = False,
  vs_torch_rounds: int = 3,
  vs_torch_steps: int = 3,
) -> dict[str, Any]:
  """Runs the benchmark of `config` and returns its JSON-ready result.

  Args:
    config: a pretraining config (`configs/*.py`).
    steps: timed training steps (the median counts).
    warmup: untimed training steps after compilation.
    input_images: synthetic JPEGs (and MICLe cases) per input-pipeline measurement.
    input_size: view side in pixels for the input-pipeline measurement.
    input_repeats: timed passes per input measurement (interleaved; medians reported).
    skip_train: leave out the training step (`train` is None).
    skip_input: leave out the input pipeline (`input` is None).
    peak_matmul_size: side of the peak-FLOP/s matmul (None: chosen automatically).
    num_classes: classes of a multiclass supervised monitor (None: a default; see
      `benchmark_train.DEFAULT_MULTICLASS_CLASSES`).
    profile_dir: if set, trace `profile_steps` training steps there and add `train.profile`,
      the step's device time by kind of work (`benchmark_profile`).
    profile_steps: steps to trace.
    vs_torch: also time the same step in PyTorch eager, alternating with ours (`vs_torch`).
    vs_torch_rounds: rounds of that comparison.
    vs_torch_steps: steps of each framework per round.

  Returns:
    {"train": ..., "input": ..., "vs_torch": ..., "environment": ...}; see docs/benchmark.md.
  """
  # Imported here so that `main` can set up the distributed runtime and CPU devices first.
  from micle_jax.tools import benchmark_input, benchmark_torch, benchmark_train

  if vs_torch:
    benchmark_torch.check_torch()  # before any work
  result: dict[str, Any] = {
    "train": None,
    "input": None,
    "vs_torch": None,
    "environment": environment(config),
  }
  if not skip_train:
    result["train"] = benchmark_train.benchmark_train(
      config,
      steps_timed=steps,
      warmup=warmup,
      peak_matmul_size=peak_matmul_size,
      num_classes=num_classes,
      profile_dir=profile_dir,
      profile_steps=profile_steps,
    )
    logging.info("Train: %s", result["train"])
  if not skip_input:
    result["input"] = benchmark_input.benchmark_input(
      num_images=input_images,
      image_size=input_size,
      micle_preset=config.augment.preset,
      seed=config.seed,
      repeats=input_repeats,
    )
  if vs_torch:
    result["vs_torch"] = benchmark_torch.vs_torch(
      config, steps=vs_torch_steps, rounds=vs_torch_rounds, warmup=max(warmup, 1)
    )
    logging.info("vs_torch: ratio %.3f (PyTorch step / ours)", result["vs_torch"]["ratio"])
  result["environment"]["host_load_average_end"] = _load_average()
  return result


FLAGS = flags.FLAGS


def define_flags() -> None:
  app.config_flag("Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("out", None, "Where to write the JSON result.", required=True)
  flags.DEFINE_integer("steps", 20, "Timed training steps (median reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed training steps after compilation.")
  flags.DEFINE_integer("input_images", 200, "Synthetic JPEGs per input-pipeline measurement.")
  flags.DEFINE_integer("input_size", 224, "View side in pixels for the input-pipeline measurement.")
  flags.DEFINE_integer(
    "input_repeats", 3, "Timed passes per input measurement (interleaved; medians reported)."
  )
  flags.DEFINE_integer("peak_matmul_size", 0, "Side of the peak-FLOP/s matmul; 0 = automatic.")
  flags.DEFINE_string(
    "profile_dir", None, "Trace training steps here and report device time by kind of work."
  )
  flags.DEFINE_integer("profile_steps", 5, "Training steps to trace with --profile_dir.")
  flags.DEFINE_bool("skip_input", False, "Do not measure the input pipeline.")
  flags.DEFINE_bool("skip_train", False, "Do not measure the training step.")
  flags.DEFINE_bool(
    "vs_torch",
    False,
    "Also time the same step in PyTorch eager, alternating with ours "
    "(needs `pip install -r requirements-bench.txt`).",
  )
  flags.DEFINE_integer("vs_torch_rounds", 3, "Rounds of the --vs_torch comparison.")
  flags.DEFINE_integer("vs_torch_steps", 3, "Steps of each framework per --vs_torch round.")


def main() -> None:
  app.start_devices(FLAGS.config.batch_size)
  from micle_jax.tools import benchmark_torch

  try:
    result = run(
      FLAGS.config,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      input_images=FLAGS.input_images,
      input_size=FLAGS.input_size,
      input_repeats=FLAGS.input_repeats,
      skip_train=FLAGS.skip_train,
      skip_input=FLAGS.skip_input,
      peak_matmul_size=FLAGS.peak_matmul_size or None,
      profile_dir=FLAGS.profile_dir,
      profile_steps=FLAGS.profile_steps,
      vs_torch=FLAGS.vs_torch,
      vs_torch_rounds=FLAGS.vs_torch_rounds,
      vs_torch_steps=FLAGS.vs_torch_steps,
    )
  except benchmark_torch.TorchMissingError as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    out = epath.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logging.info("Wrote %s", out)


if __name__ == "__main__":
  app.run(main, define_flags)
