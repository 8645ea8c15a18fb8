"""What a run records of its environment, and the warning when a table mixes environments."""

from micle_jax.models import native_conv
from micle_jax.runtime import provenance


def test_the_environment_names_code_versions_devices_and_convolution():
  env = provenance.environment(native_conv.describe())
  assert set(env) >= {
    "code",
    "versions",
    "platform",
    "device_kind",
    "device_count",
    "process_count",
    "convolution",
    "cpu",
    "usable_cores",
  }
  assert env["device_count"] == 8 and env["platform"] == "cpu"
  assert {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"} <= set(
    env["versions"]
  )
  assert env["convolution"]["convolution"] in ("native", "xla")
  if env["convolution"]["convolution"] == "native":
    assert env["convolution"]["onednn"].startswith("3.2")
    assert env["convolution"]["weight_gradient"] in ("matrix products", "onednn")
  assert len(env["code"]["commit"] or "x" * 40) == 40


def test_mixed_environments_are_named_key_by_key(caplog):
  a = {
    "versions": {"jax": "0.10.2"},
    "convolution": {"convolution": "native"},
    "cpu": {"isa": ["avx2"]},
  }
  b = {
    "versions": {"jax": "0.10.2"},
    "convolution": {"convolution": "xla"},
    "cpu": {"isa": ["avx2"]},
  }
  assert provenance.differing_keys([a, a]) == {}
  assert provenance.differing_keys([a, b, None]) == {"convolution.convolution": ["native", "xla"]}
  with caplog.at_level("WARNING"):
    provenance.warn_if_mixed([a, b, None], what="root")
  assert "root mixes runs from different environments" in caplog.text
  assert (
    "convolution.convolution" in caplog.text
    and "1 of 3 runs recorded no environment" in caplog.text
  )
