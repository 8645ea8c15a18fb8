"""The SimCLR ResNet of micle_jax in PyTorch, for the weights `micle_jax.export_torch` writes.

Dependency-free: this file imports only torch and the standard library (and safetensors inside
`read_export`), never JAX or the rest of the package, so it can be copied on its own into a
PyTorch project. In eval mode it computes what `micle_jax.models.resnet.ContrastiveModel`
computes with `train=False` (to float rounding) for every architecture the project trains:
ResNet 18/34 (basic blocks) and 50/101/152/200 (bottlenecks, stride on the 3×3 conv), any width
multiplier, selective kernels (`sk_ratio > 0`, with the ResNet-D stem and avg-pool shortcut),
the `imagenet` and `cifar` stems, the projection head and the supervised head.

    model = from_export("model.safetensors")  # eval mode, weights loaded with strict=True
    out = model(images)  # images: float32 [N, 3, H, W], RGB in [0, 1], no mean/std
    out["features"], out["projection"], out.get("logits")

The padding rules are SimCLR's (TensorFlow's): every kernel is odd, so a strided convolution's
fixed padding (k - 1 split evenly, then VALID) and a stride-1 convolution's SAME are both the
symmetric `padding=k // 2`; the stem's 3×3/2 max-pool is TF 'SAME', which pads an even input
only at the end (`MaxPool2dSame`); ResNet-D's 2×2 avg-pool shortcut pads at the end and, at
stride 1, averages only the valid inputs (`AvgPool2dShortcut`). BatchNorm: ε 1e-5; PyTorch's
momentum 0.1 is Flax's 0.9.

State-dict keys follow torchvision's ResNet (`conv1`, `bn1`, `layer{1-4}.{b}.conv1/bn1/...`,
`downsample.0/1`, `fc`), extended for what torchvision lacks: the ResNet-D stem is
`conv1.{0,1,3,4,6}` + `bn1` and its shortcut `downsample.{1,2}` after the parameter-free pool
(timm's names), a selective kernel replaces `conv2`/`bn2` by `sk.{conv,bn,fc_conv,fc_bn,
mixing_conv}`, the projection head is `projection_head.{j}.{linear,bn}`, and the supervised head
is `fc` when it reads the backbone features (`supervised_input_layer` 0) and `head_supervised`
when it reads a projection layer (so that it is never loaded into torchvision's `fc` by mistake).
`make_torchvision_exact` and `torchvision_state_dict` take a width-1 model without selective
kernels into `torchvision.models.resnet{18,34,50,101,152}`; docs/export_torch.md says why.
"""

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EXPORT_FORMAT = "micle_jax.export_torch/1"
METADATA_KEY = "micle_jax_export"  # the safetensors metadata entry holding the sidecar's JSON
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: 1 - Flax's momentum 0.9
SK_MIN_DIM = 32
# depth -> (block kind, blocks per group), as in micle_jax.models.resnet
RESNET_LAYERS: dict[int, tuple[str, tuple[int, ...]]] = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
  200: ("bottleneck", (3, 24, 36, 3)),
}
STEMS = ("imagenet", "cifar")
VARIANTS = ("simclr", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What an export holds, in micle_jax's `model` config terms.

  Attributes:
    depth: 18, 34, 50, 101, 152 or 200.
    width: channel multiplier (every channel count is `max(1, round(base * width))`).
    sk_ratio: selective-kernel ratio; > 0 also switches on the ResNet-D stem and shortcut.
    stem: "imagenet" (7×7/2 conv or ResNet-D's three 3×3 convs, then a 3×3/2 max-pool) or
      "cifar" (one 3×3/1 conv, no pooling).
    num_proj_layers: layers of the projection head as trained.
    proj_out_dim: width of its last layer.
    proj_layers_kept: how many of them the export holds (-1 = all).
    supervised_input_layer: which `hiddens[k]` feeds the supervised head (0 = the features).
    num_classes: supervised head outputs (0 = none).
    variant: "simclr", or "torchvision" (weights imported from torchvision/timm): the model
      normalises its [0, 1] input with ImageNet's mean and std, the stem's max-pool pads both
      ends, and only shape-changing blocks project their shortcut, as in torchvision.
  """

  depth: int = 50
  width: float = 1.0
  sk_ratio: float = 0.0
  stem: str = "imagenet"
  num_proj_layers: int = 3
  proj_out_dim: int = 128
  proj_layers_kept: int = -1
  supervised_input_layer: int = 0
  num_classes: int = 0
  variant: str = "simclr"

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} not in {list(VARIANTS)}")
    if self.variant == "torchvision" and (self.stem != "imagenet" or self.sk_ratio > 0):
      raise ValueError(f"variant='torchvision' needs stem='imagenet' and sk_ratio=0: {self}")
    if self.depth not in RESNET_LAYERS:
      raise ValueError(f"depth={self.depth!r} not in {list(RESNET_LAYERS)}")
    if self.stem not in STEMS:
      raise ValueError(f"stem={self.stem!r} not in {list(STEMS)}")
    if not self.width > 0 or self.sk_ratio < 0 or self.num_proj_layers < 0:
      raise ValueError(f"width > 0, sk_ratio >= 0 and num_proj_layers >= 0 needed: {self}")
    if self.projection_layers_built > self.num_proj_layers:
      raise ValueError(f"proj_layers_kept={self.proj_layers_kept} > {self.num_proj_layers}")
    if not 0 <= self.supervised_input_layer <= self.projection_layers_built:
      raise ValueError(
        f"supervised_input_layer={self.supervised_input_layer} not in "
        f"[0, {self.projection_layers_built}]"
      )

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Architecture":
    """The architecture of a sidecar's "architecture" entry (other, derived keys are ignored)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})

  @property
  def block(self) -> str:
    return RESNET_LAYERS[self.depth][0]

  @property
  def expansion(self) -> int:
    return 1 if self.block == "basic" else 4

  def channels(self, base: int) -> int:
    return max(1, int(round(base * self.width)))

  @property
  def num_features(self) -> int:
    """Width of the backbone's pooled features."""
    return self.expansion * self.channels(64 * 2**3)

  @property
  def projection_layers_built(self) -> int:
    return self.num_proj_layers if self.proj_layers_kept < 0 else self.proj_layers_kept

  @property
  def supervised_head_name(self) -> str:
    """`fc` for a head on the backbone features, `head_supervised` for one on a projection."""
    return "fc" if self.supervised_input_layer == 0 else "head_supervised"

  def hidden_dim(self, k: int) -> int:
    """Width of `hiddens[k]`: the features (k = 0) or projection layer k-1's output."""
    return self.proj_out_dim if k == self.num_proj_layers and k > 0 else self.num_features

  @property
  def torchvision_name(self) -> str | None:
    """The torchvision ResNet whose keys the backbone has (width 1, no SK, ImageNet stem)."""
    same = self.width == 1 and self.sk_ratio == 0 and self.stem == "imagenet"
    return f"resnet{self.depth}" if same and self.depth in TORCHVISION_DEPTHS else None


def _bn2d(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def _conv(cin: int, cout: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
  """SimCLR's convolution: for odd kernels fixed padding (strided) and SAME are both k // 2."""
  return nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False)


def _same_pads(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding (before, after) of one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


class MaxPool2dSame(nn.Module):
  """Max pooling with TensorFlow's 'SAME' padding (SimCLR's stem: 3×3, stride 2).

  TF pads `total // 2` before and the rest after, from the input size: an even side is padded
  by one only at the end, an odd side by one on both ends. `nn.MaxPool2d(3, 2, padding=1)`
  (torchvision) always pads both ends, which shifts every window of an even input by one pixel.
  """

  def __init__(self, kernel_size: int = 3, stride: int = 2):
    super().__init__()
    self.kernel_size, self.stride = kernel_size, stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    (top, bottom), (left, right) = (
      _same_pads(x.shape[-2], self.kernel_size, self.stride),
      _same_pads(x.shape[-1], self.kernel_size, self.stride),
    )
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2dShortcut(nn.Module):
  """ResNet-D's 2×2 average pool in the projection shortcut, as SimCLR (and Flax here) does it.

  Stride 1: TF 'SAME' pooling, which pads the bottom/right edge and averages only the valid
  inputs (Flax's `count_include_pad=False`). Stride 2: SimCLR's `fixed_padding(x, 2)` (one zero
  row/column at the end), then VALID pooling, so on an odd side the padded zeros are averaged in.
  """

  def __init__(self, stride: int):
    super().__init__()
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(x, (0, 1, 0, 1))
    if self.stride > 1:
      return F.avg_pool2d(padded, 2, self.stride)
    valid = F.pad(x.new_ones((1, 1, *x.shape[-2:])), (0, 1, 0, 1))
    return F.avg_pool2d(padded, 2, 1) / F.avg_pool2d(valid, 2, 1)


def _downsample(cin: int, cout: int, stride: int, resnet_d: bool) -> nn.Sequential:
  """The projection shortcut: 1×1 conv + BN, or (ResNet-D) avg-pool, 1×1 conv, BN."""
  if resnet_d:
    return nn.Sequential(AvgPool2dShortcut(stride), _conv(cin, cout, 1), _bn2d(cout))
  return nn.Sequential(_conv(cin, cout, 1, stride), _bn2d(cout))


class SelectiveKernel(nn.Module):
  """SimCLRv2's selective kernel: one 3×3 conv to two streams, mixed by a softmax per channel."""

  def __init__(self, cin: int, filters: int, stride: int, sk_ratio: float):
    super().__init__()
    mid = max(int(filters * sk_ratio), SK_MIN_DIM)
    self.conv = _conv(cin, 2 * filters, 3, stride)
    self.bn = _bn2d(2 * filters)
    self.fc_conv = _conv(filters, mid, 1)
    self.fc_bn = _bn2d(mid)
    self.mixing_conv = _conv(mid, 2 * filters, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    streams = torch.stack(F.relu(self.bn(self.conv(x))).chunk(2, dim=1))  # [2, N, C, H, W]
    pooled = streams.sum(0).mean(dim=(2, 3), keepdim=True)
    pooled = F.relu(self.fc_bn(self.fc_conv(pooled)))
    mixing = torch.softmax(torch.stack(self.mixing_conv(pooled).chunk(2, dim=1)), dim=0)
    return (streams * mixing).sum(0)


class BasicBlock(nn.Module):
  """Two 3×3 convs (ResNet-18/34); torchvision's `BasicBlock` names."""

  def __init__(self, cin: int, filters: int, stride: int, downsample: nn.Module | None):
    super().__init__()
    self.conv1 = _conv(cin, filters, 3, stride)
    self.bn1 = _bn2d(filters)
    self.conv2 = _conv(filters, filters, 3)
    self.bn2 = _bn2d(filters)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
  """1×1 → 3×3 (stride here, as torchvision) or selective kernel → 1×1 with 4× expansion."""

  def __init__(
    self, cin: int, filters: int, stride: int, downsample: nn.Module | None, sk_ratio: float
  ):
    super().__init__()
    self.conv1 = _conv(cin, filters, 1)
    self.bn1 = _bn2d(filters)
    self.selective = sk_ratio > 0
    if self.selective:
      self.sk = SelectiveKernel(filters, filters, stride, sk_ratio)
    else:
      self.conv2 = _conv(filters, filters, 3, stride)
      self.bn2 = _bn2d(filters)
    self.conv3 = _conv(filters, 4 * filters, 1)
    self.bn3 = _bn2d(4 * filters)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.sk(out) if self.selective else F.relu(self.bn2(self.conv2(out)))
    return F.relu(self.bn3(self.conv3(out)) + shortcut)


class ProjectionLayer(nn.Module):
  """One projection-head layer: Linear (no bias) → BatchNorm (the last has no β) → ReLU."""

  def __init__(self, cin: int, cout: int, last: bool):
    super().__init__()
    self.linear = nn.Linear(cin, cout, bias=False)
    self.bn = nn.BatchNorm1d(cout, eps=BN_EPSILON, momentum=BN_MOMENTUM)
    if last:
      self.bn.bias = None  # SimCLR's last projection layer has no β
    self.last = last

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.bn(self.linear(x))
    return x if self.last else F.relu(x)


class SimCLRResNet(nn.Module):
  """The backbone, projection head and supervised head of micle_jax's `ContrastiveModel`.

  `forward` returns a dict like the Flax model's: `features` [N, C] (the globally average-pooled
  backbone output), `hiddens` (the features, then each projection layer's output), `projection`
  (`hiddens[-1]`) and, with a supervised head, `logits` (from `hiddens[supervised_input_layer]`).
  To fine-tune with a new head, `model.reset_head(C)` (or assign `model.fc` when the head reads
  the features).
  """

  def __init__(self, arch: Architecture):
    super().__init__()
    self.arch = arch
    self.num_features = arch.num_features
    width = arch.channels(64)
    if arch.stem == "cifar":
      self.conv1 = _conv(3, width, 3)
    elif arch.sk_ratio > 0:  # ResNet-D stem (timm's `conv1.{0..6}` names)
      half = width // 2
      self.conv1 = nn.Sequential(
        _conv(3, half, 3, 2), _bn2d(half), nn.ReLU(), _conv(half, half, 3), _bn2d(half),
        nn.ReLU(), _conv(half, width, 3),
      )  # fmt: skip
    else:
      self.conv1 = _conv(3, width, 7, 2)
    self.bn1 = _bn2d(width)
    torchvision = arch.variant == "torchvision"
    if arch.stem == "cifar":
      self.maxpool = nn.Identity()
    else:
      self.maxpool = nn.MaxPool2d(3, 2, padding=1) if torchvision else MaxPool2dSame()
    if torchvision:
      self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
      self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
    _, layers = RESNET_LAYERS[arch.depth]
    cin = width
    for g, (num_blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2), strict=True)):
      filters = arch.channels(64 * 2**g)
      blocks = []
      for b in range(num_blocks):
        s = stride if b == 0 else 1
        # SimCLR projects the shortcut of every group's first block (torchvision: only when the
        # shape changes, so not in ResNet-18/34's layer1.0).
        reshapes = s > 1 or cin != arch.expansion * filters
        project = b == 0 and (reshapes or not torchvision)
        down = _downsample(cin, arch.expansion * filters, s, arch.sk_ratio > 0) if project else None
        if arch.block == "basic":
          blocks.append(BasicBlock(cin, filters, s, down))
        else:
          blocks.append(Bottleneck(cin, filters, s, down, arch.sk_ratio))
        cin = arch.expansion * filters
      self.add_module(f"layer{g + 1}", nn.Sequential(*blocks))
    built = arch.projection_layers_built
    self.projection_head = nn.ModuleList(
      ProjectionLayer(arch.num_features, arch.hidden_dim(j + 1), last=j == arch.num_proj_layers - 1)
      for j in range(built)
    )
    if arch.num_classes:
      head = nn.Linear(arch.hidden_dim(arch.supervised_input_layer), arch.num_classes)
      self.add_module(arch.supervised_head_name, head)

  def reset_head(self, num_classes: int, input_layer: int = 0) -> nn.Linear:
    """Replaces the supervised head by a new `nn.Linear` on `hiddens[input_layer]`; returns it.

    The head is `fc` on the features (`input_layer` 0), else `head_supervised`, with PyTorch's
    default initialisation (fine-tuning here starts it at zero: apply `nn.init.zeros_`).
    """
    for name in ("fc", "head_supervised"):
      if hasattr(self, name):
        delattr(self, name)
    self.arch = dataclasses.replace(
      self.arch, num_classes=num_classes, supervised_input_layer=input_layer
    )
    head = nn.Linear(self.arch.hidden_dim(input_layer), num_classes)
    self.add_module(self.arch.supervised_head_name, head)
    return head

  def forward_features(self, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features [N, C] of images [N, 3, H, W] (RGB in [0, 1])."""
    if self.arch.variant == "torchvision":
      x = (x - self.input_mean) / self.input_std
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for g in range(1, 5):
      x = getattr(self, f"layer{g}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, x: torch.Tensor) -> dict[str, Any]:
    features = self.forward_features(x)
    hiddens = [features]
    for layer in self.projection_head:
      hiddens.append(layer(hiddens[-1]))
    out: dict[str, Any] = {
      "features": features,
      "hiddens": tuple(hiddens),
      "projection": hiddens[-1],
    }
    head = getattr(self, self.arch.supervised_head_name, None)
    if head is not None:
      out["logits"] = head(hiddens[self.arch.supervised_input_layer])
    return out


def sidecar_path(path: str | pathlib.Path) -> pathlib.Path:
  """`model.safetensors` -> `model.json`."""
  return pathlib.Path(path).with_suffix(".json")


def read_export(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
  """(export info, state_dict) of an export; the info is the JSON sidecar, or if that is absent
  the copy kept in the safetensors metadata."""
  from safetensors import safe_open
  from safetensors.torch import load_file

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  sidecar = sidecar_path(path)
  if sidecar.is_file():
    info = json.loads(sidecar.read_text())
  else:
    with safe_open(str(path), framework="pt") as f:
      metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
      raise ValueError(f"{path}: no {sidecar.name} beside it and no {METADATA_KEY!r} metadata")
    info = json.loads(metadata[METADATA_KEY])
  if info.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{path}: format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
  return info, load_file(str(path))


def from_export(path: str | pathlib.Path) -> SimCLRResNet:
  """The model of an export, weights loaded with `strict=True`, in eval mode.

  Its `export_info` attribute holds the sidecar (architecture, label names, input convention).
  """
  info, state_dict = read_export(path)
  model = SimCLRResNet(Architecture.from_dict(info["architecture"]))
  model.load_state_dict(state_dict, strict=True)
  model.export_info = info
  return model.eval()


def torchvision_state_dict(
  state_dict: Mapping[str, torch.Tensor], *, with_fc: bool = True
) -> dict[str, torch.Tensor]:
  """The entries a torchvision ResNet holds: the backbone and (`with_fc`) `fc`, no heads else.

  Only `fc` reads the backbone features; `head_supervised` (a head on a projection layer) and
  `projection_head.*` are left out.
  """
  drop = ("projection_head.", "head_supervised.") + (() if with_fc else ("fc.",))
  return {k: v for k, v in state_dict.items() if not k.startswith(drop)}


def make_torchvision_exact(model: nn.Module, *, stem: str = "imagenet") -> nn.Module:
  """Patches a torchvision `resnet{18,34,50,101,152}` (in place) to compute the SimCLR ResNet.

  - the stem's max-pool becomes TF 'SAME' (`MaxPool2dSame`); with the cifar stem, conv1 is a
    3×3/1 conv and there is no max-pool;
  - ResNet-18/34's `layer1.0` gets the 1×1 conv + BN projection shortcut SimCLR gives every
    group's first block (torchvision has none there, as the shape does not change).

  Everything else already agrees: the 3×3 convs' and 7×7 conv's symmetric padding equals
  SimCLR's fixed/SAME padding, the bottleneck stride sits on the 3×3 conv in both, and BatchNorm
  ε is 1e-5. Returns `model`.
  """
  if stem not in STEMS:
    raise ValueError(f"stem={stem!r} not in {list(STEMS)}")
  if stem == "cifar":
    model.conv1 = _conv(3, model.conv1.out_channels, 3)
    model.maxpool = nn.Identity()
  else:
    model.maxpool = MaxPool2dSame()
  first = model.layer1[0]
  if first.downsample is None:
    cin, cout = first.conv1.in_channels, first.bn2.num_features
    first.downsample = nn.Sequential(_conv(cin, cout, 1), _bn2d(cout))
  return model
