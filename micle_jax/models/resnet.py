"""The SimCLR variant of ResNet v1 and its heads, in Flax.

Architecture as in SimCLR(v2)'s `tf2/resnet.py`: depths 18/34 (basic blocks) and
50/101/152/200 (bottlenecks); every channel count scaled by `width`; strided convolutions with
fixed padding; the last BatchNorm of each block starts with γ = 0; optional selective kernels
(`sk_ratio > 0`, which also switch on the ResNet-D stem and avg-pool shortcut). A `cifar` stem
(3×3 conv, stride 1, no max-pool) serves low-resolution inputs (32–64 px).

The `torchvision` variant computes as torchvision's ResNet does, for weights imported from it
(`tools/import_torch.py`): the [0, 1] input is normalised with ImageNet's mean and std inside the
model, the stem's 3×3/2 max-pool pads both ends (PyTorch's `padding=1`; SimCLR's TF 'SAME' pads
an even side only at the end), and a block's shortcut is projected only where its shape changes
(SimCLR projects every group's first block, so also ResNet-18/34's first). Everything else is
the same in both: the strided convolutions' padding, the stride on the bottleneck's 3×3 conv,
BatchNorm's ε.

Module names are stable and structural (`block_group_1_block_0/conv_1`), because checkpoint
conversion from the published TensorFlow weights matches on them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from micle_jax import specs
from micle_jax.models.layers import (
  Conv,
  Dtype,
  batch_norm,
  dense_kernel_init,
  fixed_padding,
  max_pool,
)

# depth -> (block kind, blocks per group)
RESNET_LAYERS: dict[int, tuple[str, tuple[int, ...]]] = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
  200: ("bottleneck", (3, 24, 36, 3)),
}
SK_MIN_DIM = 32
# torchvision's input normalisation (its ImageNet weights were trained on inputs normalised so).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
assert tuple(RESNET_LAYERS) == specs.DEPTHS, "the schema's depths are the ones built here"


def _bn_relu(
  x: jnp.ndarray,
  train: bool,
  dtype: Dtype,
  name: str,
  *,
  relu: bool = True,
  zero_init: bool = False,
) -> jnp.ndarray:
  x = batch_norm(train, dtype=dtype, zero_init=zero_init, name=name)(x)
  return nn.relu(x) if relu else x


class SelectiveKernel(nn.Module):
  """SimCLRv2's selective-kernel 3×3 conv: two streams mixed by a learned softmax per channel."""

  filters: int
  strides: int
  sk_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = Conv(2 * self.filters, 3, self.strides, dtype=self.dtype, name="conv")(x)
    x = _bn_relu(x, train, self.dtype, "bn")
    streams = jnp.stack(jnp.split(x, 2, axis=-1))  # [2, N, H, W, C]
    mid_dim = max(int(self.filters * self.sk_ratio), SK_MIN_DIM)
    pooled = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
    pooled = Conv(mid_dim, 1, dtype=self.dtype, name="fc_conv")(pooled)
    pooled = _bn_relu(pooled, train, self.dtype, "fc_bn")
    mixing = Conv(2 * self.filters, 1, dtype=self.dtype, name="mixing_conv")(pooled)
    mixing = nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
    return jnp.sum(streams * mixing, axis=0)


class Shortcut(nn.Module):
  """The projection shortcut: 1×1 conv + BN, or (with SK) ResNet-D's avg-pool then 1×1 conv."""

  features: int
  strides: int
  resnet_d: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.resnet_d:
      if self.strides > 1:
        x = fixed_padding(x, 2)
      padding = "SAME" if self.strides == 1 else "VALID"
      x = nn.avg_pool(
        x, (2, 2), (self.strides, self.strides), padding=padding, count_include_pad=False
      )
      x = Conv(self.features, 1, dtype=self.dtype, name="conv")(x)
    else:
      x = Conv(self.features, 1, self.strides, dtype=self.dtype, name="conv")(x)
    return _bn_relu(x, train, self.dtype, "bn", relu=False)


class BasicBlock(nn.Module):
  """Two 3×3 convs (ResNet-18/34)."""

  filters: int
  strides: int
  use_projection: bool
  sk_ratio: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    shortcut = x
    if self.use_projection:
      shortcut = Shortcut(
        self.filters, self.strides, self.sk_ratio > 0, self.dtype, name="shortcut"
      )(x, train)
    x = Conv(self.filters, 3, self.strides, dtype=self.dtype, name="conv_0")(x)
    x = _bn_relu(x, train, self.dtype, "bn_0")
    x = Conv(self.filters, 3, dtype=self.dtype, name="conv_1")(x)
    x = _bn_relu(x, train, self.dtype, "bn_1", relu=False, zero_init=True)
    return nn.relu(x + shortcut)


class BottleneckBlock(nn.Module):
  """1×1 → 3×3 (or selective kernel) → 1×1 with 4× expansion (ResNet-50 and deeper)."""

  filters: int
  strides: int
  use_projection: bool
  sk_ratio: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    shortcut = x
    if self.use_projection:
      shortcut = Shortcut(
        4 * self.filters, self.strides, self.sk_ratio > 0, self.dtype, name="shortcut"
      )(x, train)
    x = Conv(self.filters, 1, dtype=self.dtype, name="conv_0")(x)
    x = _bn_relu(x, train, self.dtype, "bn_0")
    if self.sk_ratio > 0:
      x = SelectiveKernel(self.filters, self.strides, self.sk_ratio, self.dtype, name="sk")(
        x, train
      )
    else:
      x = Conv(self.filters, 3, self.strides, dtype=self.dtype, name="conv_1")(x)
      x = _bn_relu(x, train, self.dtype, "bn_1")
    x = Conv(4 * self.filters, 1, dtype=self.dtype, name="conv_2")(x)
    x = _bn_relu(x, train, self.dtype, "bn_2", relu=False, zero_init=True)
    return nn.relu(x + shortcut)


class ResNet(nn.Module):
  """SimCLR's ResNet v1 backbone; returns globally average-pooled features [N, C].

  Attributes:
    depth: 18, 34, 50, 101, 152 or 200.
    width: channel multiplier (1–4 for the paper; fractions such as 0.25 for tests).
    sk_ratio: selective-kernel reduction ratio (0 = off; SimCLRv2 uses 0.0625).
    stem: "imagenet" (7×7/2 conv + 3×3/2 max-pool, or ResNet-D's three 3×3 convs with SK) or
      "cifar" (one 3×3/1 conv, no pooling) for 32–64 px inputs.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    variant: "simclr", or "torchvision" to compute as torchvision's ResNet (module docstring).
  """

  depth: int = 50
  width: float = 1.0
  sk_ratio: float = 0.0
  stem: str = "imagenet"
  dtype: Dtype = jnp.float32
  variant: str = "simclr"

  def _channels(self, base: int) -> int:
    return max(1, int(round(base * self.width)))

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    kind, layers = RESNET_LAYERS[self.depth]
    torchvision = self.variant == "torchvision"
    if torchvision:
      x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
    x = self._stem(x, train)
    block_cls = BasicBlock if kind == "basic" else BottleneckBlock
    expansion = 1 if kind == "basic" else 4
    for g, (num_blocks, group_stride) in enumerate(zip(layers, (1, 2, 2, 2), strict=True)):
      filters = self._channels(64 * 2**g)
      for b in range(num_blocks):
        reshapes = group_stride > 1 or x.shape[-1] != expansion * filters
        x = block_cls(
          filters,
          group_stride if b == 0 else 1,
          use_projection=b == 0 and (reshapes or not torchvision),
          sk_ratio=self.sk_ratio,
          dtype=self.dtype,
          name=f"block_group_{g}_block_{b}",
        )(x, train)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)

  def _stem(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    width = self._channels(64)
    if self.stem == "cifar":
      x = Conv(width, 3, 1, dtype=self.dtype, name="stem_conv_0")(x)
      return _bn_relu(x, train, self.dtype, "stem_bn_0")
    if self.sk_ratio > 0:  # ResNet-D stem.
      x = Conv(width // 2, 3, 2, dtype=self.dtype, name="stem_conv_0")(x)
      x = _bn_relu(x, train, self.dtype, "stem_bn_0")
      x = Conv(width // 2, 3, 1, dtype=self.dtype, name="stem_conv_1")(x)
      x = _bn_relu(x, train, self.dtype, "stem_bn_1")
      x = Conv(width, 3, 1, dtype=self.dtype, name="stem_conv_2")(x)
      x = _bn_relu(x, train, self.dtype, "stem_bn_2")
    else:
      x = Conv(width, 7, 2, dtype=self.dtype, name="stem_conv_0")(x)
      x = _bn_relu(x, train, self.dtype, "stem_bn_0")
    return max_pool(x, 3, 2, symmetric=self.variant == "torchvision")


class ProjectionHead(nn.Module):
  """SimCLR's non-linear projection head; returns the features entering and leaving each layer.

  Layers 0..L-2: Dense (no bias) → BN → ReLU at the input width; layer L-1: Dense (no bias) to
  `out_dim` → BN without β. The returned tuple holds L+1 arrays: `hiddens[0]` is the backbone
  output, `hiddens[k]` the output of layer k-1, so fine-tuning that keeps the first k layers
  (`ft_proj_selector = k`) reads `hiddens[k]`.
  """

  num_layers: int = 3
  out_dim: int = 128
  dtype: Dtype = jnp.float32
  num_built: int | None = None  # fine-tuning keeps the first k layers of an L-layer head

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, ...]:
    hiddens = [x]
    mid_dim = x.shape[-1]
    built = self.num_layers if self.num_built is None else self.num_built
    for j in range(built):
      last = j == self.num_layers - 1
      x = nn.Dense(
        self.out_dim if last else mid_dim,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=dense_kernel_init,
        name=f"dense_{j}",
      )(x)
      x = batch_norm(train, dtype=self.dtype, center=not last, name=f"bn_{j}")(x)
      if not last:
        x = nn.relu(x)
      hiddens.append(x.astype(jnp.float32))
    return tuple(hiddens)


class ContrastiveModel(nn.Module):
  """Backbone + projection head + supervised head, as in SimCLR.

  Attributes:
    backbone: the ResNet.
    num_proj_layers: projection-head layers (SimCLRv2: 3).
    proj_layers_kept: how many of them are built (-1 = all; fine-tuning keeps
      `ft_proj_selector` of them, 0 = none).
    proj_out_dim: width of the last projection layer.
    num_classes: supervised head outputs (0 = no supervised head).
    supervised_input_layer: which `hiddens[k]` feeds the supervised head (SimCLR's
      `ft_proj_selector`; 0 = backbone features).
    stop_gradient_supervised: detach the supervised head's input (the linear monitor during
      pretraining; linear evaluation).
    freeze_backbone: run the backbone and the kept projection-head layers in inference mode
      (running BatchNorm statistics) behind a stop-gradient (linear evaluation: the features are
      frozen, so their statistics must not drift with each batch).
    zero_init_head: start the supervised head's kernel at 0 (SimCLR TF2's
      `zero_init_logits_layer`; fine-tuning's default) instead of N(0, 0.01²).
  """

  backbone: ResNet
  num_proj_layers: int = 3
  proj_layers_kept: int = -1
  proj_out_dim: int = 128
  num_classes: int = 0
  supervised_input_layer: int = 0
  stop_gradient_supervised: bool = True
  freeze_backbone: bool = False
  zero_init_head: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, Any]:
    frozen = self.freeze_backbone
    features = self.backbone(x, train and not frozen)
    if frozen:
      features = jax.lax.stop_gradient(features)
    kept = None if self.proj_layers_kept < 0 else self.proj_layers_kept
    hiddens = ProjectionHead(
      self.num_proj_layers, self.proj_out_dim, self.backbone.dtype, kept, name="projection_head"
    )(features, train and not frozen)
    if frozen:
      hiddens = tuple(jax.lax.stop_gradient(h) for h in hiddens)
    outputs = {"features": features, "hiddens": hiddens, "projection": hiddens[-1]}
    if self.num_classes:
      sup_input = hiddens[self.supervised_input_layer]
      if self.stop_gradient_supervised:
        sup_input = jax.lax.stop_gradient(sup_input)
      logits = nn.Dense(
        self.num_classes,
        dtype=self.backbone.dtype,
        kernel_init=nn.initializers.zeros if self.zero_init_head else dense_kernel_init,
        name="head_supervised",
      )(sup_input)
      outputs["logits"] = logits.astype(jnp.float32)
    return outputs


def create_model(spec: specs.ModelSpec) -> ContrastiveModel:
  """Builds the model of a (validated) spec."""
  backbone = ResNet(
    spec.depth, spec.width, spec.sk_ratio, spec.stem, jnp.dtype(spec.dtype), spec.variant
  )
  return ContrastiveModel(
    backbone,
    num_proj_layers=spec.num_proj_layers,
    proj_layers_kept=spec.proj_layers_kept,
    proj_out_dim=spec.proj_out_dim,
    num_classes=spec.num_classes,
    supervised_input_layer=spec.supervised_input_layer,
    stop_gradient_supervised=spec.stop_gradient_supervised,
    freeze_backbone=spec.freeze_backbone,
    zero_init_head=spec.zero_init_head,
  )


def head_classes(params: Mapping[str, Any]) -> int:
  """The output count of a checkpoint's supervised head (0 where it has none)."""
  head = params.get("head_supervised") or {}
  return int(np.shape(head["kernel"])[-1]) if "kernel" in head else 0


def count_params(tree: Any, prefixes: Sequence[str] = ()) -> int:
  """Number of scalars in `tree`, restricted to top-level keys starting with any of `prefixes`."""
  if prefixes:
    tree = {k: v for k, v in tree.items() if any(k.startswith(p) for p in prefixes)}
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
