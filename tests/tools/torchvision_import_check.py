"""Real torchvision and timm ResNets written out for the import's test, as a user's files would be.

    python tests/tools/torchvision_import_check.py OUT_DIR IMAGES.npy [DEPTH ...]

Runs in the venv of `make torchvision-env` (torch, torchvision, timm; no JAX), which
`test_import_torch.test_real_torchvision_and_timm_import_exactly` starts. For each depth, a
randomly initialised `torchvision.models.resnet{d}` and `timm.create_model("resnet{d}")` (no
download) get random BatchNorm statistics and affine parameters (a fresh model's are trivial);
their state_dicts are saved as a user would save them (torchvision: `torch.save` of the
state_dict; timm: a float16 `.safetensors`, the model then run at the weights' rounding), and
their eval-mode logits and features (`fc` removed) on IMAGES.npy (NHWC, RGB in [0, 1],
normalised with ImageNet's mean and std the way torchvision's transforms do) go to
`{lib}_resnet{d}.npz`. Prints one JSON line with the versions and files.
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision_clone import randomize_batchnorm

from micle_jax.tools import torch_resnet  # torch only, as this venv has

MEAN = torch.tensor(torch_resnet.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(torch_resnet.IMAGENET_STD).view(1, 3, 1, 1)


def _outputs(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, np.ndarray]:
  with torch.no_grad():
    logits = model(inputs).numpy()
    fc = model.fc
    model.fc = torch.nn.Identity()
    features = model(inputs).numpy()
    model.fc = fc
  return {"logits": logits, "features": features}


def main(out: pathlib.Path, images: pathlib.Path, depths: list[int]) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  raw = torch.from_numpy(np.load(images)).permute(0, 3, 1, 2).contiguous()
  inputs = (raw - MEAN) / STD
  files = []
  for depth in depths:
    name = f"resnet{depth}"
    torch.manual_seed(depth)
    model = getattr(torchvision.models, name)(weights=None)
    randomize_batchnorm(model, depth)
    torch.save(model.state_dict(), out / f"torchvision_{name}.pth")
    np.savez(out / f"torchvision_{name}.npz", **_outputs(model, inputs))

    model = timm.create_model(name, pretrained=False)
    randomize_batchnorm(model, depth + 1)
    model = model.half().float().eval()  # the weights as the float16 file holds them
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()
               if v.is_floating_point()} | {k: v for k, v in model.state_dict().items()
               if not v.is_floating_point()}, str(out / f"timm_{name}.safetensors"))  # fmt: skip
    np.savez(out / f"timm_{name}.npz", **_outputs(model, inputs))
    files += [f"torchvision_{name}.pth", f"timm_{name}.safetensors"]
  return {
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "timm": timm.__version__,
    "jax_importable": importlib.util.find_spec("jax") is not None,
    "files": files,
  }


if __name__ == "__main__":
  report = main(
    pathlib.Path(sys.argv[1]),
    pathlib.Path(sys.argv[2]),
    [int(d) for d in sys.argv[3:]] or [18, 34, 50, 101, 152],
  )
  print(json.dumps(report))
