"""`python -m micle_jax.sweep` runs the fine-tuning sweep, `micle_jax.tools.sweep`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.sweep", run_name="__main__", alter_sys=True)
