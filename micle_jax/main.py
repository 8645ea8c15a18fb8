r"""Entry point: `python -m micle_jax.main --config=configs/cxr.py --workdir=DIR`.

Kept short on purpose: parse flags, start the devices, and hand `(config, workdir)` to
`pretrain.train_and_evaluate`. Override any config key from the command line with
`--config.key=value` (e.g. `--config.batch_size=256`); unknown keys fail.
"""

from absl import flags, logging

from micle_jax import app

FLAGS = flags.FLAGS


def define_flags() -> None:
  app.config_flag("Config file (configs/*.py[:arg]).")
  flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard events and config (gs:// works).", required=True
  )


def main() -> None:
  app.start_devices(FLAGS.config.batch_size)
  from micle_jax import pretrain  # Imported after jax.distributed is initialised.

  logging.info("Config:\n%s", FLAGS.config)
  pretrain.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("Done: %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, define_flags)
