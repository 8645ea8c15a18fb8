"""One entry for every command line: flags, the distributed start, and one-line errors.

Each command (`main`, `finetune`, `tools.*`) defines its flags in a function, so importing its
module defines none, and hands its `main` to `run`:

    def define_flags():
      app.config_flag("Config file (configs/*.py[:arg]).")
      flags.DEFINE_string("workdir", None, "...", required=True)

    if __name__ == "__main__":
      app.run(main, define_flags)

`run` refuses unexpected positional arguments, and reports a config error or unreadable
checkpoints as one line on stderr with exit status 1 (no traceback). It keeps the log to what
a person follows: this project's own INFO lines, every warning and error, and each run's
progress line; the INFO logs of the libraries (Orbax's checkpoint internals, clu's metric lines,
TensorFlow's) come back with `--log_third_party` (the metrics are in TensorBoard either way). A command that trains calls
`start_devices(batch_size)` first: `jax.distributed.initialize()` on a cluster, else this host's
CPU split into one device per core (one device where the native convolution is built). Before
any of this, importing `micle_jax` restarted the command with tcmalloc preloaded where it is
installed (`runtime.allocator`; MICLE_ALLOCATOR=system keeps glibc's).
"""

import logging as python_logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from micle_jax import specs
from micle_jax.models import native_conv
from micle_jax.runtime import checkpoint, distributed

UsageError = app.UsageError  # a command line that makes no sense: absl prints the usage

# Errors that are the user's input, not the program's: one line is the whole story.
_ONE_LINE_ERRORS = (specs.ConfigError, checkpoint.UnreadableCheckpointError)


def config_flag(help_text: str, *, required: bool = True, **kwargs) -> None:
  """`--config=FILE[:arg]`, locked (an unknown `--config.key` fails), overridable key by key."""
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True, **kwargs)
  if required:
    flags.mark_flag_as_required("config", flag_values=kwargs.get("flag_values", flags.FLAGS))


def start_devices(global_batch_size: int) -> None:
  """`jax.distributed.initialize()` on a cluster; on one CPU host, one device per core, or one
  device where the native convolution is built (`distributed.split_cpu_into_devices`)."""
  if not distributed.initialize():
    distributed.split_cpu_into_devices(global_batch_size, one_device=native_conv.built())


_OWN_CODE = tuple(
  str(pathlib.Path(__file__).resolve().parents[1] / part) for part in ("micle_jax", "data_builders")
)


class OwnInfoOnly(python_logging.Filter):
  """Passes warnings and errors from anywhere, and INFO records of this project's own code."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def quiet_third_party_info() -> None:
  """Drops the libraries' INFO records from absl's handler (every Python logger reaches it)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
    handler.addFilter(OwnInfoOnly())


def run(
  main: Callable[..., None],
  define_flags: Callable[[], None],
  *,
  subcommands: Sequence[str] = (),
) -> None:
  """Defines the flags and runs `main()` (or `main(subcommand)`) under absl."""
  define_flags()
  if "log_third_party" not in flags.FLAGS:
    flags.DEFINE_bool(
      "log_third_party", False, "Also log the libraries' INFO lines (Orbax, clu, TensorFlow)."
    )

  def absl_main(argv: list[str]) -> None:
    if not flags.FLAGS.log_third_party:
      quiet_third_party_info()
    extra = argv[1:]
    if subcommands:
      if len(extra) != 1 or extra[0] not in subcommands:
        raise app.UsageError(f"expected one subcommand, {' or '.join(subcommands)}; got {extra}")
    elif extra:
      raise app.UsageError(f"Unexpected arguments: {extra}")
    try:
      main(*extra)
    except _ONE_LINE_ERRORS as e:
      sys.exit(f"error: {e}")

  app.run(absl_main)
