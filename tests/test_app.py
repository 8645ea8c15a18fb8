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
