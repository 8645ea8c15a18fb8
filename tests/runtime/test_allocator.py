"""The commands' tcmalloc restart: found, preloaded once, skipped where it does not apply."""

import os
import subprocess
import sys

import pytest

from micle_jax.runtime import allocator


def test_finds_the_first_library_of_the_directories(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  first.mkdir()
  second.mkdir()
  assert allocator.find_tcmalloc([str(first), str(second)]) is None
  (second / "libtcmalloc.so.4").write_bytes(b"")
  assert allocator.find_tcmalloc([str(first), str(second)]) == str(second / "libtcmalloc.so.4")
  (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
  assert allocator.find_tcmalloc([str(first), str(second)]) == str(
    first / "libtcmalloc_minimal.so.4"
  )


def test_the_restart_keeps_the_command_line_and_other_preloads(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/x/libother.so")
  executable, argv, env = allocator.restart_command("/lib/libtcmalloc_minimal.so.4")
  assert executable == sys.executable
  assert argv == [sys.executable, *sys.orig_argv[1:]]
  assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/x/libother.so"
  monkeypatch.delenv("LD_PRELOAD")
  assert allocator.restart_command("/t.so")[2]["LD_PRELOAD"] == "/t.so"


def test_only_commands_restart_by_default():
  assert allocator.is_command(["python", "-m", "micle_jax.study", "--config=x"])
  assert not allocator.is_command(["python", "-m", "pytest", "-q"])
  assert not allocator.is_command(["python", "-c", "import micle_jax"])
  assert not allocator.is_command(["python"])


@pytest.mark.parametrize(
  "setting",
  ["system", "preloaded", "not linux", "not installed", "not a command", "restart", "forced"],
)
def test_restarts_only_where_it_applies(monkeypatch, setting):
  restarts = []
  monkeypatch.setattr(os, "execve", lambda *args: restarts.append(args))
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "micle_jax.main", "--config=c.py"])
  monkeypatch.delenv(allocator.ENV, raising=False)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  if setting == "system":
    monkeypatch.setenv(allocator.ENV, "system")
  elif setting == "preloaded":
    monkeypatch.setenv("LD_PRELOAD", "/lib/libtcmalloc_minimal.so.4")
  elif setting == "not linux":
    monkeypatch.setattr(sys, "platform", "darwin")
  elif setting == "not installed":
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
  elif setting in ("not a command", "forced"):
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest"])
    if setting == "forced":
      monkeypatch.setenv(allocator.ENV, "tcmalloc")
  allocator.use_tcmalloc()
  assert len(restarts) == (1 if setting in ("restart", "forced") else 0)
  if restarts:
    assert restarts[0][1][1:] == sys.orig_argv[1:]
    assert restarts[0][2]["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4"


@pytest.mark.skipif(
  sys.platform != "linux" or allocator.find_tcmalloc() is None,
  reason="tcmalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)",
)
@pytest.mark.parametrize("setting,mapped", [("tcmalloc", True), ("", False), ("system", False)])
def test_importing_micle_jax_restarts_with_tcmalloc_mapped(setting, mapped):
  """With MICLE_ALLOCATOR=tcmalloc any process restarts at `import micle_jax` (a command does
  without it); the restarted process runs the script once."""
  script = "import micle_jax; print('mapped', 'tcmalloc' in open('/proc/self/maps').read())"
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
  env[allocator.ENV] = setting
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["mapped", str(mapped)]
