"""Test harness: 8 host CPU devices, quiet TensorFlow, and tiny-model helpers.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the flag is set here, before any
test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  del config
  # TensorFlow is only ever used for input pipelines; keep it off any accelerator and small.
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass


@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.device_count() == 8, "conftest must force 8 host devices before jax is imported"
  return jax.device_count()
