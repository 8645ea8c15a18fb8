"""Facts about the machine this process runs on: the cores it may use, and its CPU.

`os.cpu_count()` counts the machine's cores, not the ones this process is given: a process pinned
to some cores (`taskset`, a job scheduler) or in a container with a CPU quota has fewer. The
thread counts (oneDNN's, the CPU device split) come from `usable_cores`.
"""

import functools
import math
import os
import pathlib
import platform

_CGROUP = pathlib.Path("/sys/fs/cgroup")


def _affinity() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1


def _quota(cgroup: pathlib.Path) -> float | None:
  """The CPU quota in cores of cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_*`), None if unlimited."""
  try:
    text = (cgroup / "cpu.max").read_text().split()
    if text and text[0] != "max":
      return int(text[0]) / int(text[1])
  except (OSError, ValueError, IndexError):
    pass
  try:
    quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
    period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    if quota > 0 and period > 0:
      return quota / period
  except (OSError, ValueError):
    pass
  return None


def usable_cores(cgroup: pathlib.Path = _CGROUP) -> int:
  """The cores this process may run on: its CPU affinity, capped by a container's CPU quota
  (rounded up: a quota of 1.5 cores keeps two threads busy part of the time)."""
  cores = _affinity()
  quota = _quota(cgroup)
  if quota is not None:
    cores = min(cores, max(1, math.ceil(quota)))
  return max(1, cores)


@functools.cache
def cpu() -> dict[str, str | list[str]]:
  """{"model", "machine", "isa"}: the CPU's name, architecture and its vector extensions of note
  (e.g. ["avx2", "avx512f", "avx512_bf16"]), as /proc/cpuinfo lists them (empty elsewhere)."""
  model, flags = "", set()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name" and not model:
        model = value.strip()
      elif key.strip() == "flags" and not flags:
        flags = set(value.split())
  except OSError:
    pass
  isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
  return {"model": model or platform.processor(), "machine": platform.machine(), "isa": isa}
