r"""Entry point: `python -m micle_jax.main --config=configs/cxr.py --workdir=DIR`.

Kept short on purpose: parse flags, set up logging and the distributed runtime, and hand
`(config, workdir)` to `pretrain.train_and_evaluate`. Override any config key from the command line
with `--config.key=value` (e.g. `--config.batch_size=256`); unknown keys fail.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from micle_jax.runtime import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and config (gs:// works).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not distributed.initialize():
    distributed.split_cpu_into_devices(FLAGS.config.batch_size)
  # Imported after jax.distributed is initialised.
  from micle_jax import pretrain
  from micle_jax.runtime import checkpoint

  logging.info("Config:\n%s", FLAGS.config)
  try:
    pretrain.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except checkpoint.UnreadableCheckpointError as e:
    sys.exit(f"error: {e}")  # one line, exit status 1, not a traceback
  logging.info("Done: %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
