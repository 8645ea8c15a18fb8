"""An export into real torchvision, as docs/export_torch.md tells a user to do it.

    python tests/tools/torchvision_check.py EXPORT.safetensors EXPECTED.npz

Runs in the venv of `make torchvision-env` (torch 2.14.1, torchvision 0.29.1, no JAX), which
`test_export_torch.test_real_torchvision_loads_an_export` starts; EXPECTED.npz holds the images
(NHWC) and the Flax model's `logits` and `features` for them. Checks, for the `torchvision`
model the sidecar names:

- stock torchvision differs: ResNet-18/34 refuse the export with `strict=True` (SimCLR's
  `layer1.0` projection shortcut), deeper ones load it and compute something else;
- after `torch_resnet.make_torchvision_exact`, `strict=True` loads the backbone and `fc`, and the
  logits and (with `fc = Identity`) the features equal Flax's to 1e-4 relative;
- the backbone alone (`with_fc=False`) loads with `strict=True` too.

Prints one JSON line (versions, whether JAX is importable here); any failure raises.
"""

import importlib.util
import json
import sys

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

from micle_jax.tools import torch_resnet


def _close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
  scale = float(np.abs(expected).max())
  assert scale > 1e-3, f"{what}: degenerate output"
  np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def check(export: str, expected_npz: str) -> dict:
  with open(torch_resnet.sidecar_path(export)) as f:
    info = json.load(f)
  name = info["architecture"]["torchvision"]
  assert name, f"{export}: the sidecar names no torchvision model"
  num_classes = info["architecture"]["num_classes"]
  expected = np.load(expected_npz)
  inputs = torch.from_numpy(expected["images"]).permute(0, 3, 1, 2)
  state_dict = torch_resnet.torchvision_state_dict(load_file(export))

  def build() -> torch.nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

  stock = build().eval()
  if info["architecture"]["block"] == "basic":
    try:
      stock.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
      unexpected = str(e).split("Unexpected key(s) in state_dict:")[-1]
      assert "Missing key" not in str(e) and '"layer1.0.downsample.0.weight"' in unexpected, e
    else:
      raise AssertionError(f"stock {name} loaded SimCLR's layer1.0 shortcut")
  else:
    stock.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
      gap = float((stock(inputs).numpy() - expected["logits"]).__abs__().max())
    assert gap > 1e-3 * float(np.abs(expected["logits"]).max()), "stock torchvision is exact?"

  model = torch_resnet.make_torchvision_exact(build()).eval()
  model.load_state_dict(state_dict, strict=True)
  with torch.no_grad():
    _close(model(inputs), expected["logits"], f"{name} logits")
    model.fc = torch.nn.Identity()
    _close(model(inputs), expected["features"], f"{name} features")

  backbone = torch_resnet.make_torchvision_exact(build())
  backbone.fc = torch.nn.Identity()
  backbone.load_state_dict(
    torch_resnet.torchvision_state_dict(load_file(export), with_fc=False), strict=True
  )
  return {
    "model": name,
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "jax_importable": importlib.util.find_spec("jax") is not None,
  }


if __name__ == "__main__":
  print(json.dumps(check(*sys.argv[1:3])))
