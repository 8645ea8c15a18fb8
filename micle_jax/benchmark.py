"""`python -m micle_jax.benchmark` runs the benchmark, `micle_jax.tools.benchmark`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.benchmark", run_name="__main__", alter_sys=True)
