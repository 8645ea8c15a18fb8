"""`python -m micle_jax.convert_simclr` runs the SimCLR checkpoint converter, `micle_jax.tools.convert_simclr`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.convert_simclr", run_name="__main__", alter_sys=True)
