"""`python -m micle_jax.export_torch` runs the PyTorch export, `micle_jax.tools.export_torch`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.export_torch", run_name="__main__", alter_sys=True)
