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


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Reuses compiled executables across the many short training runs of the suite."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield


@pytest.fixture(scope="session")
def cxr_data_dir(tmp_path_factory) -> str:
  """A small synthetic CheXpert-style download, built with the real `chexpert_micle` builder."""
  from data_builders import build, synthetic

  root = tmp_path_factory.mktemp("cxr")
  synthetic.write_chexpert(
    root / "manual", num_patients=24, num_valid_patients=8, seed=0, image_size=48
  )
  build.build("chexpert_micle", manual_dir=str(root / "manual"), data_dir=str(root / "tfds"))
  return str(root / "tfds")


@pytest.fixture(scope="session")
def nih_data_dir(tmp_path_factory) -> str:
  """A small synthetic NIH ChestX-ray14 download, built with the real `nih_cxr14` builder."""
  from data_builders import build, synthetic

  root = tmp_path_factory.mktemp("nih")
  synthetic.write_nih(root / "manual", num_patients=16, seed=0, image_size=48)
  build.build("nih_cxr14/images", manual_dir=str(root / "manual"), data_dir=str(root / "tfds"))
  return str(root / "tfds")
