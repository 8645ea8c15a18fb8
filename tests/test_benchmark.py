"""The benchmark runs end to end on a tiny config and reports every documented key.

Only presence, type and sign are checked: timings are measured by the tool, never asserted.
"""

import json
import math

import pytest

from configs import cxr
from micle_jax import benchmark, benchmark_input, benchmark_train

TRAIN_POSITIVE = (
  "lower_time_s",
  "compile_time_s",
  "step_time_s",
  "step_time_min_s",
  "step_time_max_s",
  "images_per_s",
  "pairs_per_s",
  "flops_per_step",
  "flops_per_step_per_device",
  "model_flops_per_step",
  "achieved_flops_per_s",
  "peak_flops_per_s",
  "mfu",
  "peak_memory_bytes",
  "num_params",
)
PAIR_POSITIVE = (
  "pairs_per_s",
  "views_per_s",
  "cpu_s_per_pair",
  "cpu_s_per_view",
  "pairs_per_cpu_s",
  "wall_s",
  "cpu_s",
)
PEAK_MATMUL_SIZE = 128


def _positive(value) -> bool:
  return (
    isinstance(value, int | float)
    and not isinstance(value, bool)
    and math.isfinite(value)
    and value > 0
  )


@pytest.fixture(scope="module")
def result():
  config = cxr.get_config("demo")
  config.batch_size = 8
  config.augment.image_size = 32
  return benchmark.run(
    config,
    steps=2,
    warmup=1,
    input_images=8,
    input_size=64,
    peak_matmul_size=PEAK_MATMUL_SIZE,
  )


def test_result_is_json_with_three_sections(result):
  assert set(result) == {"train", "input", "environment"}
  assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_train_section(result, num_devices):
  train = result["train"]
  for key in TRAIN_POSITIVE:
    assert _positive(train[key]), (key, train[key])
  assert train["num_devices"] == num_devices
  assert train["global_batch_size"] == 8 and train["image_size"] == 32
  assert train["images_per_s"] == pytest.approx(2 * train["pairs_per_s"])
  assert train["flops_per_step"] == pytest.approx(num_devices * train["flops_per_step_per_device"])
  assert train["mfu"] == pytest.approx(train["achieved_flops_per_s"] / train["peak_flops_per_s"])
  assert train["mfu_flops_source"] == "model_flops_per_step"
  assert train["achieved_flops_per_s"] == pytest.approx(
    train["model_flops_per_step"] / train["step_time_s"]
  )
  assert train["peak_memory_source"] in (
    "device_memory_stats",
    "compiled_memory_analysis",
    "process_max_rss",
  )
  assert math.isfinite(train["final_loss"])
  peak = train["peak_matmul"]
  assert peak["size"] == PEAK_MATMUL_SIZE and peak["dtype"] == "float32"
  assert peak["chain_length"] >= 1
  assert _positive(peak["flops_per_s_per_device"]) and _positive(peak["time_s"])


def test_input_section(result):
  inputs = result["input"]
  assert set(inputs["presets"]) == {"simclr", "cxr", "derm"}
  for stats in [*inputs["presets"].values(), inputs["micle"]]:
    for key in PAIR_POSITIVE:
      assert _positive(stats[key]), (key, stats[key])
    assert stats["num_pairs"] == 8
    assert stats["views_per_s"] == pytest.approx(2 * stats["pairs_per_s"])
  assert inputs["micle"]["preset"] == "cxr"
  assert _positive(inputs["micle_vs_simclr"]) and _positive(inputs["micle_vs_simclr_cpu"])
  assert inputs["image_size"] == 64 and inputs["num_images"] == 8
  assert 20_000 < inputs["jpeg_bytes_mean"] < 200_000


def test_environment_section(result, num_devices):
  env = result["environment"]
  assert env["platform"] == "cpu" and env["device_count"] == num_devices
  for key in ("device_kind", "jax_version", "jaxlib_version", "timestamp_utc"):
    assert env[key]
  assert env["config"]["augment"]["image_size"] == 32


def test_flops_from_cost_analysis_forms():
  class Compiled:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      if isinstance(self.analysis, Exception):
        raise self.analysis
      return self.analysis

  assert benchmark_train.cost_analysis_flops(Compiled({"flops": 6.0})) == 6.0
  assert benchmark_train.cost_analysis_flops(Compiled([{"flops": 2.0}, {"flops": 3.0}])) == 5.0
  for missing in ({}, [], None, [{"bytes accessed": 1.0}], {"flops": -1.0}, NotImplementedError()):
    assert benchmark_train.cost_analysis_flops(Compiled(missing)) is None


def test_micle_cases_have_two_to_four_images():
  cases = benchmark_input.synthetic_cases([b"a", b"b", b"c"], num_cases=20, seed=0)
  counts = cases["num_images"].numpy()
  assert counts.min() >= 2 and counts.max() <= 4
  for row, count in zip(cases["images"].numpy(), counts, strict=True):
    assert all(row[:count]) and not any(row[count:])


def test_jaxpr_flops_match_xla_cpu_for_convolutions_and_matmuls():
  import jax
  import jax.numpy as jnp

  def loss(w, v, x):
    y = jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.einsum("nhwc,cd->nhwd", y, v) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  args = (jnp.ones((3, 3, 8, 16)), jnp.ones((16, 4)), jnp.ones((2, 16, 16, 8)))
  counted = benchmark_train.jaxpr_matmul_flops(jax.make_jaxpr(grad)(*args))
  xla = benchmark_train.cost_analysis_flops(grad.lower(*args).compile())
  conv, dot = 2 * 2 * 8 * 8 * 16 * 9 * 8, 2 * 2 * 8 * 8 * 4 * 16
  # conv: forward + kernel gradient (x is not differentiated); dot: forward + both gradients.
  assert counted == pytest.approx(2 * conv + 3 * dot)
  assert counted == pytest.approx(xla, rel=0.1)
