"""Test harness: 8 host CPU devices compiled for speed of compilation, quiet TensorFlow, and
tiny-model helpers.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the flag is set here, before any
test module imports jax.
"""

import os

# The suite compiles hundreds of small programs and runs each for a few steps: LLVM's optimisation
# passes cost more than they save there (a third of the suite's time). The commands, and the tests
# that start their own process as a command does (the native convolution as the demo runs it),
# keep XLA's default.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
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
  """Reuses compiled executables across the many short training runs of the suite.

  A step with the native convolution on 8 devices holds `custom_partitioning` calls, whose
  lowered form names a Python callback by its address, different in every trace, so that no two
  traces would share a cache entry. The suite leaves that address out of the cache key. That is
  safe while everything the callback decides besides the program's shapes is the same for every
  trace of a worker: the oneDNN thread count and the weight-gradient method. The tests that vary
  those (`test_native_conv.py`) turn the cache off (`no_compilation_cache`).
  """
  base = tmp_path_factory.getbasetemp()
  # Under xdist, the workers of one session share one cache (their base folders are siblings).
  folder = (
    base.parent / "jax_cache" if os.environ.get("PYTEST_XDIST_WORKER") else base / "jax_cache"
  )
  folder.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
  yield


@pytest.fixture
def no_compilation_cache():
  """The persistent compilation cache off for one test (see `_compilation_cache`)."""
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", True)


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


@pytest.fixture(scope="session")
def teledermatology_data_dir(tmp_path_factory) -> str:
  """Tiny synthetic teledermatology cases (an external clinic included), built as `derm/generic_*`."""
  from data_builders import build, synthetic

  root = tmp_path_factory.mktemp("tele")
  synthetic.write_teledermatology(
    root / "manual", num_cases=24, num_external_cases=10, seed=0, image_size=32
  )
  build.build("derm/generic_images", manual_dir=str(root / "manual"), data_dir=str(root / "tfds"))
  return str(root / "tfds")
