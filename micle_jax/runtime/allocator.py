"""tcmalloc for the commands on Linux: one re-execution with it in LD_PRELOAD.

XLA's CPU backend allocates and frees each step's activations, tens of megabytes each, and with
glibc's malloc every one is a fresh mmap whose pages the kernel faults in and zeroes again. With
tcmalloc the memory is reused: the ResNet-50 step at 224 px went 7.90 → 6.21 s on 2 cores
(docs/benchmark.md, "The native convolution, and PyTorch"). An allocator can only be chosen when
the process starts, so `use_tcmalloc()` restarts the same command line once with the library preloaded where it is installed (Debian/Ubuntu: libtcmalloc-minimal4),
and does nothing where it is not, on other systems, or with MICLE_ALLOCATOR=system.

The restart happens when `micle_jax` is first imported, before the command's own imports
(TensorFlow and JAX take seconds), and only for a command (`python -m micle_jax.…`), or for
any process with MICLE_ALLOCATOR=tcmalloc; tests and notebooks are left alone otherwise.
"""

import os
import sys
from collections.abc import Sequence

ENV = "MICLE_ALLOCATOR"
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRECTORIES = (
  "/usr/lib/x86_64-linux-gnu",
  "/usr/lib/aarch64-linux-gnu",
  "/usr/lib64",
  "/usr/lib",
  "/usr/local/lib",
)


def find_tcmalloc(directories: Sequence[str] = DIRECTORIES) -> str | None:
  """The first tcmalloc shared library in `directories`, or None."""
  for directory in directories:
    for name in NAMES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def preloaded() -> bool:
  """Whether this process was started with tcmalloc in LD_PRELOAD."""
  return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def restart_command(path: str) -> tuple[str, list[str], dict[str, str]]:
  """The executable, argv and environment that restart this command with `path` preloaded."""
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
  return sys.executable, [sys.executable, *sys.orig_argv[1:]], env


def is_command(orig_argv: list[str]) -> bool:
  """Whether the interpreter was started as `python -m micle_jax.…` (its original argv)."""
  return len(orig_argv) > 2 and orig_argv[1] == "-m" and orig_argv[2].startswith("micle_jax.")


def use_tcmalloc() -> None:
  """Restarts this process with tcmalloc preloaded, once, where that applies (module docstring).

  Never returns when it restarts. `micle_jax/__init__.py` calls it, before any work.
  """
  setting = os.environ.get(ENV, "")
  if sys.platform != "linux" or setting == "system" or preloaded():
    return
  if setting != "tcmalloc" and not is_command(sys.orig_argv):
    return
  path = find_tcmalloc()
  if path is None:
    return
  executable, argv, env = restart_command(path)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(executable, argv, env)
