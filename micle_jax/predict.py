"""`python -m micle_jax.predict` runs prediction, `micle_jax.tools.predict`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.predict", run_name="__main__", alter_sys=True)
