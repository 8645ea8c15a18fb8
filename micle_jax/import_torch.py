"""`python -m micle_jax.import_torch` runs the torchvision/timm weights importer, `micle_jax.tools.import_torch`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.import_torch", run_name="__main__", alter_sys=True)
