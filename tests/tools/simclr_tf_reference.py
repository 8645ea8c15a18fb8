"""A TensorFlow SimCLR model for conversion tests: SimCLR's structure, variable names and ops.

Written from google-research/simclr (tf2 `resnet.py`/`model.py`, tf1 `resnet.py`/`model_util.py`),
independently of our Flax model:

- `tf.Module`s carry the TF2 Keras attribute names (`resnet_model/block_groups/0/layers/0/
  projection_layers/0/conv2d/kernel`, parameter-free layers holding their list slots), so
  `tf.train.Checkpoint(model=...)` writes the published object paths;
- the forward pass uses SimCLR's ops: fixed padding + VALID for strided convolutions, SAME
  otherwise, 3×3/2 SAME max-pool, ResNet-D avg-pool shortcut, selective kernels, BatchNorm in
  inference mode with ε 1e-5;
- `tf1_tensors` names the same weights as a TF1 checkpoint does, numbering `conv2d_k` and
  `batch_normalization_k` in the order the layers are called (TF1's creation order).

Weights are random, with non-trivial BatchNorm statistics.
"""

import numpy as np
import tensorflow as tf

EPSILON = 1e-5
LAYERS = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3])}


def fixed_padding(x: tf.Tensor, kernel_size: int) -> tf.Tensor:
  total = kernel_size - 1
  beg, end = total // 2, total - total // 2
  return tf.pad(x, [[0, 0], [beg, end], [beg, end], [0, 0]])


def _var(value: np.ndarray, trainable: bool = True) -> tf.Variable:
  return tf.Variable(value.astype(np.float32), trainable=trainable)


class Op(tf.Module):
  """A parameter-free layer (identity, padding, pooling, DropBlock) holding its list slot."""

  def __init__(self, fn=tf.identity):
    super().__init__()
    self.fn = fn

  def __call__(self, x, record):
    return self.fn(x)


class Conv2D(tf.Module):
  def __init__(self, rng, kernel_size, cin, cout, strides=1):
    super().__init__()
    fan_in = kernel_size * kernel_size * cin
    self.kernel = _var(rng.normal(size=(kernel_size, kernel_size, cin, cout)) / np.sqrt(fan_in))
    self.strides = strides

  def __call__(self, x, record):
    if record is not None:
      record.append(self)
    padding = "SAME" if self.strides == 1 else "VALID"
    return tf.nn.conv2d(x, self.kernel, self.strides, padding)


class Conv2dFixedPadding(tf.Module):
  def __init__(self, rng, kernel_size, cin, cout, strides):
    super().__init__()
    self.kernel_size, self.strides = kernel_size, strides
    self.conv2d = Conv2D(rng, kernel_size, cin, cout, strides)

  def __call__(self, x, record):
    if self.strides > 1:
      x = fixed_padding(x, self.kernel_size)
    return self.conv2d(x, record)


class BatchNorm(tf.Module):
  """Keras BatchNormalization's variables, applied in inference mode."""

  def __init__(self, rng, dim, center=True):
    super().__init__()
    self.gamma = _var(rng.uniform(0.5, 1.5, dim))
    if center:
      self.beta = _var(rng.normal(0.0, 0.2, dim))
    self.moving_mean = _var(rng.normal(0.0, 0.2, dim), trainable=False)
    self.moving_variance = _var(rng.uniform(0.5, 2.0, dim), trainable=False)

  def __call__(self, x, record):
    if record is not None:
      record.append(self)
    beta = getattr(self, "beta", None)
    return tf.nn.batch_normalization(
      x, self.moving_mean, self.moving_variance, beta, self.gamma, EPSILON
    )


class BatchNormRelu(tf.Module):
  def __init__(self, rng, dim, relu=True, center=True):
    super().__init__()
    self.bn = BatchNorm(rng, dim, center)
    self.relu = relu

  def __call__(self, x, record):
    x = self.bn(x, record)
    return tf.nn.relu(x) if self.relu else x


class SKConv2D(tf.Module):
  """Selective kernel: a 3×3 conv to 2× filters, split into two streams mixed by a softmax."""

  def __init__(self, rng, cin, filters, strides, sk_ratio, min_dim=32):
    super().__init__()
    mid = max(int(filters * sk_ratio), min_dim)
    self.conv2d_fixed_padding = Conv2dFixedPadding(rng, 3, cin, 2 * filters, strides)
    self.batch_norm_relu = BatchNormRelu(rng, 2 * filters)
    self.conv2d_0 = Conv2D(rng, 1, filters, mid)
    self.batch_norm_relu_1 = BatchNormRelu(rng, mid)
    self.conv2d_1 = Conv2D(rng, 1, mid, 2 * filters)

  def __call__(self, x, record):
    x = self.batch_norm_relu(self.conv2d_fixed_padding(x, record), record)
    x = tf.stack(tf.split(x, 2, axis=3))
    pooled = tf.reduce_mean(tf.reduce_sum(x, axis=0), [1, 2], keepdims=True)
    pooled = self.batch_norm_relu_1(self.conv2d_0(pooled, record), record)
    mixing = self.conv2d_1(pooled, record)
    mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=3)), axis=0)
    return tf.reduce_sum(x * mixing, axis=0)


def _shortcut(rng, cin, cout, strides, sk_ratio):
  """Projection shortcut layers; with SK, ResNet-D's (padding,) avg-pool, 1×1 conv."""
  layers = []
  if sk_ratio > 0:
    if strides > 1:
      layers.append(Op(lambda x: fixed_padding(x, 2)))
    padding = "SAME" if strides == 1 else "VALID"
    layers.append(Op(lambda x: tf.nn.avg_pool2d(x, 2, strides, padding)))
    layers.append(Conv2dFixedPadding(rng, 1, cin, cout, 1))
  else:
    layers.append(Conv2dFixedPadding(rng, 1, cin, cout, strides))
  layers.append(BatchNormRelu(rng, cout, relu=False))
  return layers


class BottleneckBlock(tf.Module):
  def __init__(self, rng, cin, filters, strides, use_projection, sk_ratio):
    super().__init__()
    self.projection_layers = (
      _shortcut(rng, cin, 4 * filters, strides, sk_ratio) if use_projection else []
    )
    main = [Conv2dFixedPadding(rng, 1, cin, filters, 1), BatchNormRelu(rng, filters), Op()]
    if sk_ratio > 0:
      main.append(SKConv2D(rng, filters, filters, strides, sk_ratio))
    else:
      main += [Conv2dFixedPadding(rng, 3, filters, filters, strides), BatchNormRelu(rng, filters)]
    main.append(Op())
    main += [
      Conv2dFixedPadding(rng, 1, filters, 4 * filters, 1),
      BatchNormRelu(rng, 4 * filters, relu=False),
      Op(),
    ]
    self.conv_relu_dropblock_layers = main

  def __call__(self, x, record):
    shortcut = x
    for layer in self.projection_layers:
      shortcut = layer(shortcut, record)
    for layer in self.conv_relu_dropblock_layers:
      x = layer(x, record)
    return tf.nn.relu(x + shortcut)


class ResidualBlock(tf.Module):
  def __init__(self, rng, cin, filters, strides, use_projection, sk_ratio):
    super().__init__()
    self.shortcut_layers = _shortcut(rng, cin, filters, strides, sk_ratio) if use_projection else []
    self.conv2d_bn_layers = [
      Conv2dFixedPadding(rng, 3, cin, filters, strides),
      BatchNormRelu(rng, filters),
      Conv2dFixedPadding(rng, 3, filters, filters, 1),
      BatchNormRelu(rng, filters, relu=False),
    ]

  def __call__(self, x, record):
    shortcut = x
    for layer in self.shortcut_layers:
      shortcut = layer(shortcut, record)
    for layer in self.conv2d_bn_layers:
      x = layer(x, record)
    return tf.nn.relu(x + shortcut)


class BlockGroup(tf.Module):
  def __init__(self, block_fn, blocks):
    super().__init__()
    self.layers = blocks

  def __call__(self, x, record):
    for layer in self.layers:
      x = layer(x, record)
    return x


def _stem(rng, width, sk_ratio):
  c = int(64 * width)
  if sk_ratio > 0:
    layers = [
      Conv2dFixedPadding(rng, 3, 3, c // 2, 2),
      BatchNormRelu(rng, c // 2),
      Conv2dFixedPadding(rng, 3, c // 2, c // 2, 1),
      BatchNormRelu(rng, c // 2),
      Conv2dFixedPadding(rng, 3, c // 2, c, 1),
    ]
  else:
    layers = [Conv2dFixedPadding(rng, 7, 3, c, 2)]
  max_pool = Op(lambda x: tf.nn.max_pool2d(x, 3, 2, "SAME"))
  return [*layers, Op(), BatchNormRelu(rng, c), max_pool, Op()]


class Resnet(tf.Module):
  def __init__(self, rng, depth, width, sk_ratio):
    super().__init__()
    kind, layers = LAYERS[depth]
    block_fn = ResidualBlock if kind == "basic" else BottleneckBlock
    expansion = 1 if kind == "basic" else 4
    self.initial_conv_relu_max_pool = _stem(rng, width, sk_ratio)
    groups, cin = [], int(64 * width)
    for g, num_blocks in enumerate(layers):
      filters = int(64 * 2**g * width)
      blocks = []
      for b in range(num_blocks):
        stride = (1 if g == 0 else 2) if b == 0 else 1
        blocks.append(block_fn(rng, cin, filters, stride, b == 0, sk_ratio))
        cin = expansion * filters
      groups.append(BlockGroup(block_fn, blocks))
    self.block_groups = groups
    self.out_dim = cin

  def __call__(self, x, record=None):
    for layer in self.initial_conv_relu_max_pool:
      x = layer(x, record)
    for group in self.block_groups:
      x = group(x, record)
    return tf.reduce_mean(x, [1, 2])


class Dense(tf.Module):
  def __init__(self, rng, cin, cout, use_bias):
    super().__init__()
    self.kernel = _var(rng.normal(size=(cin, cout)) / np.sqrt(cin))
    if use_bias:
      self.bias = _var(rng.normal(0.0, 0.2, cout))

  def __call__(self, x):
    x = tf.matmul(x, self.kernel)
    return x + self.bias if hasattr(self, "bias") else x


class LinearLayer(tf.Module):
  def __init__(self, rng, cin, cout, use_bias=True, use_bn=False):
    super().__init__()
    self.dense = Dense(rng, cin, cout, use_bias and not use_bn)
    if use_bn:
      self.bn_relu = BatchNormRelu(rng, cout, relu=False, center=use_bias)

  def __call__(self, x):
    x = self.dense(x)
    return self.bn_relu(x, None) if hasattr(self, "bn_relu") else x


class ProjectionHead(tf.Module):
  def __init__(self, rng, dim, num_layers, out_dim):
    super().__init__()
    self.linear_layers = [
      LinearLayer(rng, dim, dim, True, True)
      if j < num_layers - 1
      else LinearLayer(rng, dim, out_dim, False, True)
      for j in range(num_layers)
    ]

  def __call__(self, x):
    for j, layer in enumerate(self.linear_layers):
      x = layer(x)
      if j < len(self.linear_layers) - 1:
        x = tf.nn.relu(x)
    return x


class SupervisedHead(tf.Module):
  def __init__(self, rng, dim, num_classes):
    super().__init__()
    self.linear_layer = LinearLayer(rng, dim, num_classes)


class Model(tf.Module):
  """SimCLR's Model: `resnet_model`, `_projection_head` and (optionally) `supervised_head`."""

  def __init__(self, depth, width, sk_ratio=0.0, num_proj_layers=3, proj_out_dim=16,
               num_classes=5, seed=0):  # fmt: skip
    super().__init__()
    rng = np.random.default_rng(seed)
    self.resnet_model = Resnet(rng, depth, width, sk_ratio)
    dim = self.resnet_model.out_dim
    self._projection_head = ProjectionHead(rng, dim, num_proj_layers, proj_out_dim)
    if num_classes:
      self.supervised_head = SupervisedHead(rng, dim, num_classes)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """features, projection and logits (from the features, ft_proj_selector=0) in inference mode."""
    features = self.resnet_model(tf.constant(images, tf.float32))
    out = {"features": features, "projection": self._projection_head(features)}
    if hasattr(self, "supervised_head"):
      out["logits"] = self.supervised_head.linear_layer(features)
    return {k: v.numpy() for k, v in out.items()}


def _fields(module: tf.Module, names: tuple[str, ...]) -> dict[str, np.ndarray]:
  return {n: getattr(module, n).numpy() for n in names if hasattr(module, n)}


BN_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def tf1_tensors(model: Model) -> dict[str, np.ndarray]:
  """The model's weights under TF1 names (`base_model/conv2d_3/kernel`, `head_contrastive/...`)."""
  record = []
  model.resnet_model(tf.zeros([1, 32, 32, 3]), record)  # TF1 creates layers as they are called.
  tensors, convs, bns = {}, 0, 0
  for layer in record:
    if isinstance(layer, Conv2D):
      tensors[f"base_model/conv2d{f'_{convs}' if convs else ''}/kernel"] = layer.kernel.numpy()
      convs += 1
    else:
      for field, value in _fields(layer, BN_NAMES).items():
        tensors[f"base_model/batch_normalization{f'_{bns}' if bns else ''}/{field}"] = value
      bns += 1
  for j, layer in enumerate(model._projection_head.linear_layers):
    tensors[f"head_contrastive/nl_{j}/dense/kernel"] = layer.dense.kernel.numpy()
    for field, value in _fields(layer.bn_relu.bn, BN_NAMES).items():
      tensors[f"head_contrastive/nl_{j}/batch_normalization/{field}"] = value
  if hasattr(model, "supervised_head"):
    for field, value in _fields(
      model.supervised_head.linear_layer.dense, ("kernel", "bias")
    ).items():
      tensors[f"head_supervised/linear_layer/dense/{field}"] = value
  return tensors


def with_training_state(tensors: dict[str, np.ndarray], ema_scale: float = 0.0) -> dict:
  """Adds what a TF1 training checkpoint also holds: Momentum slots, global_step, an EMA copy."""
  out = dict(tensors)
  for name, value in tensors.items():
    if not name.endswith(("moving_mean", "moving_variance")):
      out[f"{name}/Momentum"] = np.full_like(value, 0.01)
    if ema_scale:
      out[f"ema_model/{name}"] = value * ema_scale
  out["global_step"] = np.array(250228, np.int64)
  return out


def save_tf1(tensors: dict[str, np.ndarray], prefix: str) -> str:
  """Writes a name-based (TF1 `Saver`-style) checkpoint with exactly these names."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(
    prefix=prefix,
    tensor_names=names,
    shape_and_slices=[""] * len(names),
    tensors=[tf.constant(tensors[n]) for n in names],
  )
  return prefix


def save_tf2(model: Model, directory: str) -> str:
  """Writes an object-based checkpoint as SimCLR's TF2 code does: model, optimizer slots, step."""
  optimizer = tf.compat.v1.train.MomentumOptimizer(0.1, momentum=0.9)
  optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
  step = tf.Variable(250228, dtype=tf.int64)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=step)
  return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1).save()


class _Export(tf.Module):
  """SimCLR's TF2 SavedModel export module: the model plus an alias list of its variables."""

  def __init__(self, model: Model):
    super().__init__()
    self.model = model
    self.trainable_variables_list = model.trainable_variables


def save_saved_model(model: Model, directory: str) -> str:
  tf.saved_model.save(_Export(model), directory)
  return directory
