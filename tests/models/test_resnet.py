"""ResNet/heads: shapes, parameter counts of the standard architectures, and layer details."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tiny_models import tiny_spec

from micle_jax import specs
from micle_jax.models import layers, resnet


def _abstract_params(spec: specs.ModelSpec, size: int = 224):
  model = resnet.create_model(spec)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False)
  )
  return variables["params"]


# Backbone counts (BatchNorm γ/β included, running statistics excluded). ResNet-50/152 at 1×
# without SK are torchvision's resnet50/resnet152 minus the 1000-way fc; SimCLR's ResNet-18 has a
# projection shortcut in the first group too (+64·64 + 2·64 = 4,224 over torchvision). The wide
# and SK counts round to SimCLRv2's published sizes (R50 2×: 94M, R50 1× SK: 35M, R152 1× SK: 89M,
# R152 3× SK: 795M); the rest pin the architecture against regressions.
@pytest.mark.parametrize(
  "depth,width,sk,backbone_count",
  [
    (18, 1, 0.0, 11_180_736),
    (50, 1, 0.0, 23_508_032),
    (152, 1, 0.0, 58_143_808),
    (18, 2, 0.0, 44_684_672),
    (50, 2, 0.0, 93_907_072),
    (152, 2, 0.0, 232_253_568),
    (50, 1, 0.0625, 35_215_584),
    (152, 1, 0.0625, 88_940_896),
    (50, 2, 0.0625, 140_306_048),
    (152, 3, 0.0625, 794_704_160),
  ],
)
def test_backbone_parameter_counts(depth, width, sk, backbone_count):
  params = _abstract_params(specs.ModelSpec(depth=depth, width=width, sk_ratio=sk))
  assert resnet.count_params(params["backbone"]) == backbone_count


def test_resnet50_with_1000_way_head_matches_standard_count():
  params = _abstract_params(specs.ModelSpec(depth=50, num_proj_layers=0, num_classes=1000))
  assert resnet.count_params(params) == 25_557_032


@pytest.mark.parametrize(
  "depth,width,sk", [(18, 1, 0.0), (50, 1, 0.0), (50, 2, 0.0625), (152, 1, 0.0625)]
)
def test_output_shapes(depth, width, sk):
  spec = specs.ModelSpec(depth=depth, width=width, sk_ratio=sk, num_classes=5)
  model = resnet.create_model(spec)
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((3, 224, 224, 3)), train=False)[
      0
    ]
  )
  feat = int(512 * width) * (1 if depth < 50 else 4)
  assert out["features"].shape == (3, feat)
  assert [h.shape for h in out["hiddens"]] == [(3, feat), (3, feat), (3, feat), (3, 128)]
  assert out["projection"].shape == (3, 128)
  assert out["logits"].shape == (3, 5)


def test_tiny_model_runs_and_heads_are_exposed():
  spec = tiny_spec(num_classes=4, supervised_input_layer=1)
  model = resnet.create_model(spec)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), x, train=False)
  out, _ = jax.jit(model.apply, static_argnames=("train", "mutable"))(
    variables, x, train=True, mutable=("batch_stats",)
  )
  assert out["features"].shape == (4, 128)
  assert len(out["hiddens"]) == 3 and out["projection"].shape == (4, 16)
  # The last head layer has BN without β; the middle ones have β.
  head = variables["params"]["projection_head"]
  assert "bias" not in head["bn_1"] and "bias" in head["bn_0"]
  assert variables["params"]["head_supervised"]["kernel"].shape == (128, 4)
  # Zero-initialised γ on the last BN of every block; ones elsewhere.
  block = variables["params"]["backbone"]["block_group_0_block_0"]
  assert np.all(block["bn_1"]["scale"] == 0) and np.all(block["bn_0"]["scale"] == 1)


def test_bfloat16_compute_keeps_float32_params():
  model = resnet.create_model(tiny_spec(dtype="bfloat16"))
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  out = jax.jit(model.apply, static_argnames="train")(variables, x, train=False)
  assert out["projection"].dtype == jnp.float32 and np.all(np.isfinite(out["projection"]))


def test_supervised_head_input_is_stop_gradient():
  model = resnet.create_model(tiny_spec(num_classes=3))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), x, train=False)

  def logits_sum(params):
    return jnp.sum(model.apply({**variables, "params": params}, x, train=False)["logits"])

  grads = jax.jit(jax.grad(logits_sum))(variables["params"])
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree_util.tree_leaves(grads["backbone"]))
  assert float(jnp.abs(grads["head_supervised"]["kernel"]).sum()) > 0


def test_a_frozen_backbone_keeps_its_kept_projection_layers_frozen_too():
  """Linear evaluation: the backbone and the kept projection-head layers run in inference mode
  in a training step, so their BatchNorm statistics do not move and the features the head sees
  are those of inference."""
  model = resnet.create_model(
    tiny_spec(num_classes=3, proj_layers_kept=1, supervised_input_layer=1, freeze_backbone=True)
  )
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), x, train=False)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  trained, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  inference = apply(variables, x, train=False)
  assert "bn_0" in variables["batch_stats"]["projection_head"]
  for a, b in zip(
    jax.tree_util.tree_leaves(updates["batch_stats"]),
    jax.tree_util.tree_leaves(variables["batch_stats"]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(trained["hiddens"][1], inference["hiddens"][1])


@pytest.mark.parametrize(
  "kernel_size,strides,size",
  [(1, 1, 8), (1, 2, 8), (1, 2, 7), (3, 1, 8), (3, 2, 8), (3, 2, 7), (7, 2, 16)],
)
def test_conv_matches_tensorflow_fixed_padding_rule(kernel_size, strides, size):
  # Independent reference: explicit SimCLR padding (strided) or SAME (stride 1) with lax.conv in
  # float64-free float32 at HIGHEST precision.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
  conv = layers.Conv(6, kernel_size, strides)
  variables = conv.init(jax.random.PRNGKey(1), x)
  kernel = variables["params"]["kernel"]
  if strides > 1:
    beg = (kernel_size - 1) // 2
    end = kernel_size - 1 - beg
    padding = [(beg, end), (beg, end)]
  else:
    padding = "SAME"
  expected = lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=lax.Precision.HIGHEST,
  )
  np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "field,value",
  [("depth", 42), ("stem", "tiny"), ("dtype", "float16"), ("supervised_input_layer", 5)],
)
def test_invalid_spec_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}"):
    resnet.create_model(specs.ModelSpec(**{field: value}))
