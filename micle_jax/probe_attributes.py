"""`python -m micle_jax.probe_attributes` probes what a representation keeps,
`micle_jax.tools.probe_attributes`."""

import runpy

if __name__ == "__main__":
  runpy.run_module("micle_jax.tools.probe_attributes", run_name="__main__", alter_sys=True)
