"""Runs a module in N local processes through launch/local_multihost.sh, for multi-process tests."""

import os
import pathlib
import subprocess
import sys

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multihost.sh"


def launch(
  module: str,
  num_processes: int,
  args: list[str],
  log_dir: pathlib.Path,
  devices_per_process: int = 4,
  timeout_s: int = 600,
) -> None:
  """`python -m module ARGS` in `num_processes` processes; fails with their logs' ends."""
  env = {
    **os.environ,
    "MODULE": module,
    "PYTHON": sys.executable,
    "LOG_DIR": str(log_dir),
    "DEVICES_PER_PROCESS": str(devices_per_process),
    # Shares compiled programs with this test process and between launches.
    "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
  }
  result = subprocess.run(
    ["bash", str(LAUNCHER), str(num_processes), "--", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout_s,
  )
  logs = "".join(
    f"\n--- {path.name} (end) ---\n" + path.read_text()[-3000:]
    for path in sorted(log_dir.glob("process_*.log"))
  )
  assert result.returncode == 0, result.stderr + logs
