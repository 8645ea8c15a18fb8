"""How SimCLR's TensorFlow checkpoints name their tensors, and where each lands in our Flax model.

Two namings exist (google-research/simclr):

- TF1 (`model.ckpt-NNNN`, name-based): the backbone is flat under `base_model/`, as
  `conv2d[_k]/kernel` and `batch_normalization[_k]/{gamma,beta,moving_mean,moving_variance}`,
  numbered separately in creation order; the heads are `head_contrastive/nl_{j}/dense/kernel`,
  `head_contrastive/nl_{j}/batch_normalization/...` and `head_supervised/linear_layer/dense/...`.
- TF2 (object-based `tf.train.Checkpoint(model=...)`, or a SavedModel's `variables/variables`):
  paths follow the Keras attributes, e.g. `resnet_model/block_groups/{g}/layers/{b}/
  conv_relu_dropblock_layers/{i}/conv2d/kernel`, `_projection_head/linear_layers/{j}/dense/kernel`
  and `supervised_head/linear_layer/dense/...`. Positions (`{i}`) hold parameter-free layers too
  and shift with selective kernels, so layers are matched by structure and order, never by index
  value or by Keras' numeric name suffixes.

Both are parsed into one `SourceLayout`: the backbone's convolutions and BatchNorms each in TF
creation order, the projection head's layers and the supervised head. `backbone_order` lists our
modules in the same creation order, so the k-th source convolution fills the k-th target one.
"""

import dataclasses
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from micle_jax.models.resnet import RESNET_LAYERS

# TF field -> (Flax collection, leaf name).
CONV_FIELDS = {"kernel": ("params", "kernel")}
DENSE_FIELDS = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
BN_FIELDS = {
  "gamma": ("params", "scale"),
  "beta": ("params", "bias"),
  "moving_mean": ("batch_stats", "mean"),
  "moving_variance": ("batch_stats", "var"),
}
FIELDS = {"conv": CONV_FIELDS, "dense": DENSE_FIELDS, "bn": BN_FIELDS}

# Documented skip rules (every skipped tensor is counted under its rule in conversion.json).
SKIP_STEP = "training step counter"
SKIP_SLOT = "optimizer slot"
SKIP_OTHER_COPY = "other weight copy (see --variables)"
SKIP_OUTSIDE = "outside the model (optimizer state, counters)"
SKIP_METADATA = "checkpoint metadata"
TF1_SLOT_SUFFIXES = ("/Momentum", "/Adam", "/Adam_1")
TF1_NON_MODEL = ("global_step", "beta1_power", "beta2_power")
EMA_PREFIX = "ema_model/"
VARIABLE_CHOICES = ("model", "ema_model")


@dataclasses.dataclass
class SourceLayer:
  """One TF layer: `fields` maps a field ('kernel', 'gamma', ...) to its checkpoint key.

  Attributes:
    kind: 'conv', 'bn' or 'dense'.
    name: the layer's name in the checkpoint (used to name a missing field).
    fields: present fields and their checkpoint keys.
    key_format: builds the key of a field, for error messages about missing ones.
    order: sort key giving TF creation order.
  """

  kind: str
  name: str
  fields: dict[str, str] = dataclasses.field(default_factory=dict)
  key_format: str = "{name}/{field}"
  order: tuple = ()

  def key(self, field: str) -> str:
    return self.fields.get(field) or self.key_format.format(name=self.name, field=field)


@dataclasses.dataclass
class SourceLayout:
  """The model tensors of a checkpoint, grouped by layer; plus what was skipped and not understood.

  Attributes:
    backbone_convs: convolution kernels in TF creation order.
    backbone_bns: BatchNorms in TF creation order.
    head: projection-head layers j = 0.. as (dense, bn) pairs (either may be None).
    supervised: the supervised head's dense layer, if any.
    skipped: checkpoint key -> skip rule.
    extra: model tensors whose names match no known layer.
  """

  backbone_convs: list[SourceLayer] = dataclasses.field(default_factory=list)
  backbone_bns: list[SourceLayer] = dataclasses.field(default_factory=list)
  head: list[tuple[SourceLayer | None, SourceLayer | None]] = dataclasses.field(
    default_factory=list
  )
  supervised: SourceLayer | None = None
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  extra: list[str] = dataclasses.field(default_factory=list)


def _add(
  layers: dict, layer_id: Hashable, kind: str, name: str, field: str, key: str, **kw: Any
) -> bool:
  """Adds `field` to the layer `layer_id` (created on first use); False if it clashes."""
  layer = layers.setdefault(layer_id, SourceLayer(kind, name, **kw))
  if layer.kind != kind or field in layer.fields:
    return False
  layer.fields[field] = key
  return True


def _head_pairs(
  dense: dict, bns: dict, layout: SourceLayout, fmt: str, name: Callable[[int, str], str]
) -> None:
  """Fills `layout.head` with layers 0..max(j), naming absent ones so they are reported missing."""
  count = max([*dense, *bns], default=-1) + 1
  for j in range(count):
    layout.head.append(
      (
        dense.get(j, SourceLayer("dense", name(j, "dense"), key_format=fmt)),
        bns.get(j, SourceLayer("bn", name(j, "bn"), key_format=fmt)),
      )
    )


# ---------------------------------------------------------------------------------------------- TF1

_TF1_BACKBONE = re.compile(r"base_model/(conv2d|batch_normalization)(?:_(\d+))?/(\w+)")
_TF1_HEAD = re.compile(r"head_contrastive/n?l_(\d+)/(dense|batch_normalization)/(\w+)")
_TF1_SUPERVISED = re.compile(r"head_supervised/linear_layer/dense/(\w+)")


def _tf1_skip_rule(name: str, variables: str) -> str | None:
  if name in TF1_NON_MODEL:
    return SKIP_STEP if name == "global_step" else SKIP_SLOT
  if name.endswith(TF1_SLOT_SUFFIXES):
    return SKIP_SLOT
  if name.startswith(EMA_PREFIX) != (variables == "ema_model"):
    return SKIP_OTHER_COPY
  return None


def parse_tf1(names: Iterable[str], variables: str = "model") -> SourceLayout:
  """Groups TF1 checkpoint names into layers; `variables` picks `ema_model/...` or the plain copy."""
  layout = SourceLayout()
  prefix = EMA_PREFIX if variables == "ema_model" else ""
  convs, bns, dense, head_bns, sup = {}, {}, {}, {}, {}
  for name in sorted(names):
    rule = _tf1_skip_rule(name, variables)
    if rule:
      layout.skipped[name] = rule
      continue
    rel = name[len(prefix) :]
    ok = False
    if m := _TF1_BACKBONE.fullmatch(rel):
      kind = "conv" if m[1] == "conv2d" else "bn"
      index = int(m[2] or 0)
      ok = _add(convs if kind == "conv" else bns, index, kind, name.rsplit("/", 1)[0], m[3], name)
    elif m := _TF1_HEAD.fullmatch(rel):
      kind = "dense" if m[2] == "dense" else "bn"
      table = dense if kind == "dense" else head_bns
      ok = _add(table, int(m[1]), kind, name.rsplit("/", 1)[0], m[3], name)
    elif m := _TF1_SUPERVISED.fullmatch(rel):
      ok = _add(sup, 0, "dense", name.rsplit("/", 1)[0], m[1], name)
    if not ok:
      layout.extra.append(name)

  def numbered(table: dict, kind: str, base: str) -> list[SourceLayer]:
    count = max(table, default=-1) + 1
    return [
      table.get(k, SourceLayer(kind, f"{prefix}base_model/{base}{f'_{k}' if k else ''}"))
      for k in range(count)
    ]

  layout.backbone_convs = numbered(convs, "conv", "conv2d")
  layout.backbone_bns = numbered(bns, "bn", "batch_normalization")
  head_name = lambda j, kind: (  # noqa: E731
    f"{prefix}head_contrastive/nl_{j}/{'dense' if kind == 'dense' else 'batch_normalization'}"
  )
  _head_pairs(dense, head_bns, layout, "{name}/{field}", head_name)
  layout.supervised = sup.get(0)
  return layout


# ---------------------------------------------------------------------------------------------- TF2

TF2_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
_TF2_STEM = re.compile(r"resnet_model/initial_conv_relu_max_pool/(\d+)/(.+)/(\w+)")
_TF2_BLOCK = re.compile(
  r"resnet_model/block_groups/(\d+)/layers/(\d+)/"
  r"(projection_layers|shortcut_layers|conv_relu_dropblock_layers|conv2d_bn_layers)/(\d+)/(.+)/(\w+)"
)
_TF2_HEAD = re.compile(r"_projection_head/linear_layers/(\d+)/(dense|bn_relu/bn)/(\w+)")
_TF2_SUPERVISED = re.compile(r"supervised_head/linear_layer/dense/(\w+)")
# Sub-layer path inside one list slot -> (kind, creation rank); SK_Conv2D holds five layers.
_TF2_SLOT_LAYERS = {
  "conv2d": ("conv", 0),
  "bn": ("bn", 0),
  "conv2d_fixed_padding/conv2d": ("conv", 0),
  "batch_norm_relu/bn": ("bn", 1),
  "conv2d_0": ("conv", 2),
  "batch_norm_relu_1/bn": ("bn", 3),
  "conv2d_1": ("conv", 4),
}
_SHORTCUT_LISTS = ("projection_layers", "shortcut_layers")


def _tf2_backbone_slot(path: str) -> tuple[str, str, tuple] | None:
  """(kind, field, creation order) of a backbone variable path, or None if it is not one."""
  if m := _TF2_STEM.fullmatch(path):
    slot, sub, field = int(m[1]), m[2], m[3]
    order = (0, 0, 0, 0, slot)
  elif m := _TF2_BLOCK.fullmatch(path):
    slot, sub, field = int(m[4]), m[5], m[6]
    part = 0 if m[3] in _SHORTCUT_LISTS else 1
    order = (1, int(m[1]), int(m[2]), part, slot)
  else:
    return None
  if sub not in _TF2_SLOT_LAYERS:
    return None
  kind, rank = _TF2_SLOT_LAYERS[sub]
  return kind, field, (*order, rank)


def parse_tf2(paths: Mapping[str, str], root: str, skipped: Mapping[str, str]) -> SourceLayout:
  """Groups TF2 variables into layers.

  Args:
    paths: checkpoint key -> object path below the root object `root` (e.g.
      `resnet_model/block_groups/0/layers/0/projection_layers/0/conv2d/kernel`).
    root: the root object's child holding the model ('model' or 'ema_model'), for messages.
    skipped: keys already skipped by the reader, with their rules.
  """
  layout = SourceLayout(skipped=dict(skipped))
  fmt = "{name}/{field}" + TF2_VALUE
  backbone, dense, head_bns, sup = {}, {}, {}, {}
  for key, path in sorted(paths.items()):
    ok = False
    name = f"{root}/{path.rsplit('/', 1)[0]}"
    if slot := _tf2_backbone_slot(path):
      kind, field, order = slot
      ok = _add(backbone, name, kind, name, field, key, key_format=fmt, order=order)
    elif m := _TF2_HEAD.fullmatch(path):
      kind = "dense" if m[2] == "dense" else "bn"
      table = dense if kind == "dense" else head_bns
      ok = _add(table, int(m[1]), kind, name, m[3], key, key_format=fmt)
    elif m := _TF2_SUPERVISED.fullmatch(path):
      ok = _add(sup, 0, "dense", name, m[1], key, key_format=fmt)
    if not ok:
      layout.extra.append(key)
  ordered = sorted(backbone.values(), key=lambda layer: layer.order)
  layout.backbone_convs = [layer for layer in ordered if layer.kind == "conv"]
  layout.backbone_bns = [layer for layer in ordered if layer.kind == "bn"]
  head_name = lambda j, kind: (  # noqa: E731
    f"{root}/_projection_head/linear_layers/{j}/{'dense' if kind == 'dense' else 'bn_relu/bn'}"
  )
  _head_pairs(dense, head_bns, layout, fmt, head_name)
  layout.supervised = sup.get(0)
  return layout


# ------------------------------------------------------------------------------------------- target

ModulePath = tuple[str, ...]
TargetPath = tuple[str, ...]  # ('params' | 'batch_stats', module..., leaf)


def backbone_order(depth: int, selective_kernel: bool) -> tuple[list[ModulePath], list[ModulePath]]:
  """Our backbone's convolutions and BatchNorms, each in SimCLR's TF creation order.

  TF creates a block's projection shortcut first, then its main path; a selective-kernel unit
  creates its 3×3 conv (2× filters) and BN, then the 1×1 fc conv and BN, then the mixing conv.
  """
  kind, layers = RESNET_LAYERS[depth]
  stem = range(3 if selective_kernel else 1)
  convs: list[ModulePath] = [(f"stem_conv_{i}",) for i in stem]
  bns: list[ModulePath] = [(f"stem_bn_{i}",) for i in stem]
  for g, num_blocks in enumerate(layers):
    for b in range(num_blocks):
      block = f"block_group_{g}_block_{b}"
      if b == 0:
        convs.append((block, "shortcut", "conv"))
        bns.append((block, "shortcut", "bn"))
      if kind == "basic":
        names = ["0", "1"]
      elif selective_kernel:
        names = ["0", "sk", "2"]
      else:
        names = ["0", "1", "2"]
      for n in names:
        if n == "sk":
          convs += [(block, "sk", "conv"), (block, "sk", "fc_conv"), (block, "sk", "mixing_conv")]
          bns += [(block, "sk", "bn"), (block, "sk", "fc_bn")]
        else:
          convs.append((block, f"conv_{n}"))
          bns.append((block, f"bn_{n}"))
  return convs, bns


def backbone_counts() -> dict[tuple[int, bool], tuple[int, int]]:
  """(depth, selective_kernel) -> (number of convolutions, number of BatchNorms)."""
  counts = {}
  for depth in RESNET_LAYERS:
    for sk in (False, True):
      convs, bns = backbone_order(depth, sk)
      counts[depth, sk] = (len(convs), len(bns))
  return counts


def pair_tensors(layout: SourceLayout, depth: int, selective_kernel: bool) -> dict[TargetPath, str]:
  """Target leaf ('params'|'batch_stats', module..., leaf) -> source key (present or not).

  Source layers beyond the model's are left out (so reported as extra); targets beyond the
  source's get no key (reported as missing).
  """
  pairs: dict[TargetPath, str] = {}

  def pair(layer: SourceLayer | None, module: TargetPath) -> None:
    if layer is None:
      return
    for field, (collection, leaf) in FIELDS[layer.kind].items():
      pairs[(collection, *module, leaf)] = layer.key(field)

  convs, bns = backbone_order(depth, selective_kernel)
  for sources, targets in ((layout.backbone_convs, convs), (layout.backbone_bns, bns)):
    for layer, module in zip(sources, targets, strict=False):
      pair(layer, ("backbone", *module))
  for j, (dense, bn) in enumerate(layout.head):
    pair(dense, ("projection_head", f"dense_{j}"))
    pair(bn, ("projection_head", f"bn_{j}"))
  pair(layout.supervised, ("head_supervised",))
  return pairs
