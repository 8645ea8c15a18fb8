"""The benchmark runs end to end on a tiny config and reports every documented key.

Only presence, type and sign are checked: timings are measured by the tool, never asserted.
"""

import json
import math
import pathlib

import pytest

from configs import cxr
from micle_jax.data import augment_presets
from micle_jax.tools import benchmark, benchmark_input, benchmark_profile, benchmark_train

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
def profile_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def result(profile_dir):
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
    profile_dir=str(profile_dir),
    profile_steps=2,
  )


def test_result_is_json_with_four_sections(result):
  assert set(result) == {"train", "input", "vs_torch", "environment"}
  assert result["vs_torch"] is None  # only with vs_torch=True
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


def test_profile_section(result, profile_dir, num_devices):
  train = result["train"]
  profile = train["profile"]
  assert profile["source"] == "host_threads" and profile["num_devices"] == num_devices
  assert profile["steps"] == 2
  assert pathlib.Path(profile["trace_dir"]).is_relative_to(profile_dir)
  assert list(pathlib.Path(profile["trace_dir"]).glob("*.xplane.pb"))
  assert set(profile["by_category_s"]) == set(benchmark_profile.CATEGORIES)
  assert profile["busy_s"] == pytest.approx(sum(profile["by_category_s"].values()))
  assert sum(profile["fraction"].values()) == pytest.approx(1.0)
  # The demo ResNet's convolutions and its 8-device gradient all-reduce are both in the trace.
  assert _positive(profile["by_category_s"]["convolution"])
  assert _positive(profile["by_category_s"]["collective"])
  assert _positive(profile["convolution_flops_per_s"]) and _positive(profile["convolution_vs_peak"])
  assert 0 < len(profile["top_ops"]) <= 15
  assert all(op["category"] in benchmark_profile.CATEGORIES for op in profile["top_ops"])
  assert train["model_flops_per_step"] == pytest.approx(
    train["model_flops_conv_per_step"] + train["model_flops_dot_per_step"]
  )


def test_input_section(result):
  inputs = result["input"]
  assert set(inputs["presets"]) == set(augment_presets.PRESETS)  # simclr, cxr, derm, cxr_small
  for stats in [*inputs["presets"].values(), inputs["micle"]]:
    for key in PAIR_POSITIVE:
      assert _positive(stats[key]), (key, stats[key])
    assert stats["num_pairs"] == 8 and stats["repeats"] == 3
    assert stats["views_per_s"] == pytest.approx(2 * stats["pairs_per_s"])
  assert inputs["micle"]["preset"] == "cxr_small"  # the config's own preset
  assert _positive(inputs["micle_vs_simclr"]) and _positive(inputs["micle_vs_simclr_cpu"])
  assert inputs["image_size"] == 64 and inputs["num_images"] == 8 and inputs["repeats"] == 3
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


def test_hlo_categories_of_a_compiled_step(num_devices):
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((num_devices,), ("data",))

  def body(x, w, v):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    z = jnp.einsum("nhwc,cd->nhwd", jax.nn.relu(y), v)
    return jax.lax.psum(jnp.sum(z), "data")

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P()))
  x = jax.device_put(jnp.ones((num_devices, 8, 8, 4)), jax.NamedSharding(mesh, P("data")))
  args = (x, jnp.ones((3, 3, 4, 8)), jnp.ones((8, 16)))
  categories = benchmark_profile.hlo_op_categories(step.lower(*args).compile().as_text())
  found = set(categories.values())
  assert {"convolution", "matmul", "collective"} <= found, categories
  assert found <= set(benchmark_profile.CATEGORIES)


@pytest.mark.parametrize(
  "kernel, category",
  [
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized>", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x64x32", "matmul"),
    ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "matmul"),
    ("gemm_fusion_dot_41", "matmul"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ("Memcpy DtoD", "copy"),
    ("loop_add_fusion_5", "elementwise"),
    ("input_scatter_fusion", "elementwise"),
  ],
)
def test_kernel_category(kernel, category):
  assert benchmark_profile.kernel_category(kernel) == category


def test_summarize_maps_cuda_graph_kernels_to_hlo_fusions():
  categories = {"convolution.3": "convolution", "gemm_fusion.2": "matmul", "add_fusion.7": "copy"}
  events = [
    ("cudnn_kernel", 0.004, {"hlo_op": "convolution.3"}),
    ("add_fusion_7", 0.002, {"hlo_op": "command_buffer_12"}),  # category from the HLO map
    ("nvjet_sm90_tst", 0.006, {"hlo_op": "command_buffer_12"}),  # category from the kernel name
    ("input_reduce_fusion", 0.008, {}),
  ]
  summary = benchmark_profile.summarize(events, categories, steps=2, devices=1)
  assert summary["by_category_s"] == pytest.approx(
    {"convolution": 0.002, "matmul": 0.003, "collective": 0.0, "elementwise": 0.004, "copy": 0.001}
  )
  assert summary["busy_s"] == pytest.approx(0.01)
  assert [op["op"] for op in summary["top_ops"]] == [
    "input_reduce_fusion",
    "nvjet_sm90_tst",
    "convolution.3",
    "add_fusion_7",
  ]


def test_a_dtype_convert_kernel_is_not_a_convolution():
  assert benchmark_profile.kernel_category("loop_convert_fusion_3") == "elementwise"


# --- --vs_torch ---------------------------------------------------------------------------------


def _tiny_config(task="chexpert"):
  config = cxr.get_config("demo")
  config.batch_size = 8  # one pair per test device
  config.augment.image_size = 32
  config.labels.task = task
  return config


def test_vs_torch_times_both_alternately():
  from micle_jax.tools import benchmark_torch

  report = benchmark_torch.vs_torch(_tiny_config(), steps=1, rounds=2, warmup=0, threads=1)
  assert report["images_per_step"] == 16 and report["image_size"] == 32
  for side in ("micle_jax", "torch"):
    section = report[side]
    assert _positive(section["step_time_s"]) and _positive(section["images_per_s"])
    assert len(section["step_times_s"]) == 2 and all(map(_positive, section["step_times_s"]))
    assert math.isfinite(section["final_loss"])
  assert report["torch"]["threads"] == 1 and report["torch"]["version"].startswith("2.")
  assert report["ratio"] == pytest.approx(
    report["torch"]["step_time_s"] / report["micle_jax"]["step_time_s"]
  )
  assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_vs_torch_without_torch_says_how_to_get_it(tmp_path):
  """A `torch` that fails to import (as when it is not installed): one line naming the extra."""
  import os
  import subprocess
  import sys

  hidden = tmp_path / "hide" / "torch"
  hidden.mkdir(parents=True)
  (hidden / "__init__.py").write_text("raise ImportError('No module named torch')\n")
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = {**os.environ, "PYTHONPATH": f"{hidden.parent}{os.pathsep}{repo}"}
  command = [sys.executable, "-m", "micle_jax.benchmark", "--config=configs/cxr.py:demo"]
  done = subprocess.run(
    [*command, "--vs_torch", "--skip_input", f"--out={tmp_path / 'b.json'}"],
    capture_output=True,
    text=True,
    env=env,
    cwd=repo,
  )
  assert done.returncode != 0
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --vs_torch needs PyTorch") and "requirements-bench.txt" in last
  assert not (tmp_path / "b.json").exists()
