"""`python -m micle_jax.study` runs the study, `micle_jax.tools.study`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.study", run_name="__main__", alter_sys=True)
