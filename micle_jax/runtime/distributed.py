"""Multi-process setup: `jax.distributed.initialize()` when running on several processes.

Three ways in, checked in this order:

- `MICLE_COORDINATOR=host:port`, `MICLE_NUM_PROCESSES=N` and `MICLE_PROCESS_ID=i` on every
  process: explicit (any cluster; the local launcher `launch/local_multihost.sh` sets them).
- `MICLE_DISTRIBUTED=auto`: `jax.distributed.initialize()` with no arguments, so that JAX's
  cluster detection finds the coordinator: on Cloud TPU VMs from the metadata server, and on
  SLURM, Open MPI and GKE from their environment. `launch/tpu.sh run` sets it on every worker
  (it is also right on a single-host TPU VM).
- GKE TPU pods (`TPU_WORKER_HOSTNAMES` with several hosts): as with `auto`, unless
  `MICLE_DISTRIBUTED=off`.

Otherwise this is a single process and nothing is initialised.
"""

import os

import jax
from absl import logging

from micle_jax import host


def _mode() -> str:
  """MICLE_DISTRIBUTED: 'auto', 'off' or '' (unset)."""
  value = os.environ.get("MICLE_DISTRIBUTED", "").strip().lower()
  if value not in ("", "auto", "off"):
    raise ValueError(f"MICLE_DISTRIBUTED={value!r}: expected 'auto' or 'off' (or unset)")
  return value


def _required_int(name: str) -> int:
  value = os.environ.get(name, "")
  if not value.strip().isdigit():
    raise ValueError(f"MICLE_COORDINATOR is set, so {name} must be a non-negative integer")
  return int(value)


def _on_multihost_gke() -> bool:
  return os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0


def initialize() -> bool:
  """Initialises JAX's distributed runtime when this is one of several processes.

  Returns:
    True if the distributed runtime was initialised (see the module doc for when).

  Raises:
    ValueError: for a MICLE_DISTRIBUTED other than 'auto' or 'off', or, with MICLE_COORDINATOR,
      a missing or non-integer MICLE_NUM_PROCESSES / MICLE_PROCESS_ID.
  """
  coordinator = os.environ.get("MICLE_COORDINATOR")
  mode = _mode()
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=_required_int("MICLE_NUM_PROCESSES"),
      process_id=_required_int("MICLE_PROCESS_ID"),
    )
  elif mode == "auto" or (mode != "off" and _on_multihost_gke()):
    jax.distributed.initialize()
  else:
    return False
  logging.info(
    "Process %d of %d; %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def split_cpu_into_devices(global_batch_size: int, *, one_device: bool = False) -> None:
  """On a CPU-only host, runs one XLA CPU device per core (call before jax picks its backend).

  XLA's CPU backend uses the cores of one device poorly for convolutions: the demo's step
  (ResNet-18 x0.25, 32 px, batch 64) takes 1.54 s on 1 device and 0.95 s on 2 devices of a
  2-core machine (`micle_jax.benchmark`, see the README). Data parallelism
  over per-core devices gives that back. The count is the largest divisor of the global batch not
  above the core count. Does nothing when XLA_FLAGS or JAX already set a CPU device count, or when
  an accelerator platform is requested.

  With `one_device` (the native convolution is built: `models.native_conv`), the host stays one
  device: oneDNN spreads each convolution over the cores itself, and one device was faster and
  steadier than one per core (ResNet-18 at 64 px: 9.04 against 11.6 s a step; docs/benchmark.md).
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  if jax.config.jax_num_cpu_devices != -1 or os.environ.get("JAX_PLATFORMS", "cpu") not in (
    "cpu",
    "",
  ):
    return
  if one_device:
    logging.info("CPU devices: 1 (the native convolution uses every core)")
    return
  cores = host.usable_cores()
  count = max(d for d in range(1, cores + 1) if global_batch_size % d == 0)
  jax.config.update("jax_num_cpu_devices", count)
  logging.info("CPU devices: %d (one per core, dividing the batch of %d)", count, global_batch_size)
