"""torchvision's ResNet (torchvision/models/resnet.py, v1.5: the bottleneck's stride on its 3×3
conv), written out with its module names: torchvision cannot be installed beside torch 2.13.0 in
the main venv, so the export's and the import's checks against it run in every `make test`, and
the tests against real torchvision repeat them in its own venv (`make torchvision-env`), where
`randomize_batchnorm` serves too (this file imports only torch and `torch_resnet`)."""

import torch
from torch import nn

from micle_jax.tools import torch_resnet as tr


class _TVBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class _TVBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class _TVResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet(depth: int, num_classes: int) -> _TVResNet:
  block = _TVBasicBlock if depth in (18, 34) else _TVBottleneck
  return _TVResNet(block, list(tr.RESNET_LAYERS[depth][1]), num_classes)


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
  """Random BatchNorm statistics and affine parameters (a fresh model's are trivial: a test of
  eval mode with them would not see a misplaced one); returns the model in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      n = module.num_features
      module.weight.data = 0.5 + torch.rand(n, generator=generator)
      module.bias.data = 0.2 * torch.randn(n, generator=generator)
      module.running_mean = 0.2 * torch.randn(n, generator=generator)
      module.running_var = 0.5 + 1.5 * torch.rand(n, generator=generator)
  return model.eval()
