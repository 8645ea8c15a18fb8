"""Where a number came from: the code, the software, the devices and the CPU of a run.

Float rounding is part of a result: the same study on another CPU, with another convolution
kernel or another device count, trains other networks. Every pretraining.json and results.json
records `environment()`, and a table made from runs that differ in any of it says so, naming the
keys (`warn_if_mixed`).
"""

import functools
import importlib.metadata
import os
import pathlib
import platform
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

import jax
from absl import logging

from micle_jax import host

_REPO = pathlib.Path(__file__).resolve().parents[2]
_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "tensorflow-cpu",
  "tensorflow",
  "tensorflow-datasets",
  "numpy",
  "ml-collections",
)


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(
      ["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=20
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code() -> dict[str, Any]:
  """{"commit", "dirty"}: the checkout's commit, and whether tracked or new files differ from it
  (None for both outside a git checkout)."""
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain") if commit else None
  return {"commit": commit, "dirty": None if status is None else bool(status)}


@functools.cache
def versions() -> dict[str, str]:
  """Python's version and those of the installed packages the numbers depend on."""
  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def environment(convolution: Mapping[str, Any]) -> dict[str, Any]:
  """The run's environment.

  Args:
    convolution: which path the convolutions take (`native_conv.describe()`: native or XLA, the
      oneDNN version, its ISA, threads and weight-gradient method).

  Returns:
    {"code", "versions", "platform", "device_kind", "device_count", "local_device_count",
    "process_count", "convolution", "cpu" (model, machine, ISA flags), "usable_cores",
    "xla_flags", "allocator"}.
  """
  devices = jax.devices()
  preload = os.environ.get("LD_PRELOAD", "")
  return {
    "code": code(),
    "versions": versions(),
    "platform": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
    "convolution": dict(convolution),
    "cpu": host.cpu(),
    "usable_cores": host.usable_cores(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "allocator": "tcmalloc" if "tcmalloc" in preload else "system",
  }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value if not isinstance(value, list) else tuple(value)
  return out


def differing_keys(records: Iterable[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
  """{dotted key: its distinct values} for the keys in which the recorded environments differ
  (a key missing from some records counts as a value, "<unrecorded>")."""
  flat = [_flatten(r) for r in records if r]
  keys = sorted({k for f in flat for k in f})
  out = {}
  for key in keys:
    values = list(dict.fromkeys(f.get(key, "<unrecorded>") for f in flat))
    if len(values) > 1:
      out[key] = values
  return out


def warn_if_mixed(records: Iterable[Mapping[str, Any] | None], *, what: str) -> dict[str, list]:
  """Logs a warning naming the keys in which `records` differ (and how many runs recorded
  none); returns `differing_keys`."""
  records = list(records)
  missing = sum(r is None for r in records)
  differing = differing_keys(records)
  if differing:
    shown = "; ".join(f"{k}: {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in differing.items())
    logging.warning(
      "%s mixes runs from different environments, so float rounding differs between them: %s",
      what,
      shown,
    )
  if missing and missing < len(records):
    logging.warning("%s: %d of %d runs recorded no environment", what, missing, len(records))
  return differing
