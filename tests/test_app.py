"""The entry helper: flags defined on run, positional arguments refused, one-line errors."""

import subprocess
import sys

import pytest

from micle_jax import app, specs
from micle_jax.runtime import checkpoint


def _command(body: str, *argv: str) -> subprocess.CompletedProcess:
  """Runs a tiny command built on `app.run` with `argv`, returning its result."""
  subcommands = ("go",) if "go" in argv else ()
  script = "\n".join(
    [
      "import sys",
      "from absl import flags",
      "from micle_jax import app, specs",
      "from micle_jax.runtime import checkpoint",
      f"sys.argv = ['cmd', *{list(argv)!r}]",
      "def define_flags():",
      "  flags.DEFINE_string('name', 'x', 'A name.')",
      "def main(*args):",
      f"  {body}",
      f"app.run(main, define_flags, subcommands={subcommands!r})",
    ]
  )
  return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
  "error",
  [
    "specs.ConfigError('config.model.depth=42 not in [18]')",
    "checkpoint.UnreadableCheckpointError('no checkpoint in w')",
  ],
)
def test_input_errors_are_one_line(error):
  result = _command(f"raise {error}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in result.stderr


def test_unexpected_arguments_and_subcommands():
  result = _command("print('ran', args, flags.FLAGS.name)", "extra")
  assert result.returncode == 1 and "Unexpected arguments: ['extra']" in result.stderr
  result = _command("print('ran', args, flags.FLAGS.name)", "go", "--name=y")
  assert result.returncode == 0 and "ran ('go',) y" in result.stdout


def test_other_errors_keep_their_traceback():
  result = _command("raise RuntimeError('a bug')")
  assert result.returncode == 1 and "Traceback" in result.stderr


def test_the_one_line_errors_are_the_users_input():
  assert issubclass(specs.ConfigError, ValueError)
  assert set(app._ONE_LINE_ERRORS) == {specs.ConfigError, checkpoint.UnreadableCheckpointError}


def test_a_failed_restore_leaves_only_the_error_line_whatever_the_collector_does():
  """An unreadable checkpoint's read leaves unstarted coroutines in reference cycles (as Orbax's
  scheduled reads do); whether they are freed mid-run or at exit, the output is the one line."""
  script = "\n".join(
    [
      "import sys",
      "from micle_jax import app",
      "from micle_jax.runtime import checkpoint",
      "sys.argv = ['cmd']",
      "async def pending_read():",
      "  return 1",
      "class Manager:",
      "  directory = 'w/checkpoints'",
      "  def all_steps(self):",
      "    return [4, 2]",
      "  def restore(self, step, args):",
      "    cycle = []",
      "    cycle.append((cycle, pending_read()))  # a read scheduled, never started",
      "    raise ValueError(f'step {step} truncated')",
      "def main():",
      "  late = []",
      "  late.append((late, pending_read()))  # freed only at interpreter exit",
      "  checkpoint.restore_newest_readable(Manager(), {'params': {}})",
      "app.run(main, lambda: None)",
    ]
  )
  env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
  )
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line[:1] not in "IW"]
  assert errors == [
    "error: no checkpoint in w/checkpoints can be restored (step 4: ValueError: step 4 "
    "truncated; step 2: ValueError: step 2 truncated)"
  ], result.stderr


def test_the_libraries_info_lines_are_off_unless_asked_for():
  """A command logs its own INFO lines and everyone's warnings; the libraries' INFO lines (Orbax's
  checkpoint internals, clu's metric lines) only with --log_third_party."""
  body = (
    "import logging as L, tempfile; from micle_jax.tools import sweep; "
    "sweep.collect_runs(tempfile.mkdtemp()); L.getLogger('orbax').info('theirs'); "
    "L.getLogger('orbax').warning('their warning')"
  )
  quiet = _command(body)
  assert "Collected 0 runs" in quiet.stderr and "their warning" in quiet.stderr
  assert "theirs" not in quiet.stderr
  loud = _command(body, "--log_third_party")
  assert "theirs" in loud.stderr
