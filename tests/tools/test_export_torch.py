"""export_torch and torch_resnet: Flax checkpoints -> PyTorch, checked forward for forward.

Every model here has random weights and random, non-trivial BatchNorm statistics, and the PyTorch
module's eval outputs are compared with the Flax model's `apply(..., train=False)` on the same
images (NHWC for Flax, NCHW for PyTorch). Image sides are chosen so that the feature maps include
odd sizes (SimCLR's padding rules differ from PyTorch's defaults exactly there) and the last one
is never 2×2; widths are small where the test is about equality, 1 where it is about
torchvision's key names.
"""

import ast
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as flax_nn  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # requirements-test.txt installs torch (CPU) and safetensors
from torch import nn  # noqa: E402
from torchvision_clone import tv_resnet as _tv_resnet  # noqa: E402
from torchvision_venv import torchvision_python  # noqa: E402

from micle_jax import specs  # noqa: E402
from micle_jax.models import layers, resnet  # noqa: E402
from micle_jax.runtime import checkpoint, run_files  # noqa: E402
from micle_jax.tools import export_torch as et  # noqa: E402
from micle_jax.tools import torch_names  # noqa: E402
from micle_jax.tools import torch_resnet as tr  # noqa: E402

SK = 0.0625
HEADS = dict(num_proj_layers=2, proj_out_dim=16, num_classes=3)
LABELS = ["Atelectasis", "Cardiomegaly", "Edema"]


def random_variables(spec: specs.ModelSpec, seed: int) -> dict:
  """The model's {'params', 'batch_stats'} filled with random values (no zero-initialised γ)."""
  model = resnet.create_model(spec)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5 if name == "scale" else 2.0, shape)
    return rng.normal(0.0, 0.2, shape)  # bias, mean

  filled = jax.tree_util.tree_map_with_path(lambda p, x: fill(p, x).astype(np.float32), abstract)
  return {"params": filled["params"], "batch_stats": filled["batch_stats"]}


def images(side: int, seed: int = 0, n: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, side, side, 3)).astype(np.float32)


def flax_outputs(spec: specs.ModelSpec, variables: dict, x: np.ndarray) -> dict:
  apply = jax.jit(functools.partial(resnet.create_model(spec).apply, train=False))
  return jax.tree_util.tree_map(np.asarray, apply(variables, x))


def torch_outputs(model: nn.Module, x: np.ndarray) -> dict:
  with torch.no_grad():
    out = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
  return {
    k: tuple(h.numpy() for h in v) if isinstance(v, tuple) else v.numpy() for k, v in out.items()
  }


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
  """Equal to 1e-4 relative (elementwise, with a floor of 1e-4 of the output's scale)."""
  assert actual.shape == expected.shape, what
  scale = float(np.abs(expected).max())
  assert scale > 1e-3, f"{what}: degenerate output"
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def assert_outputs_match(torch_out: dict, flax_out: dict) -> None:
  assert set(torch_out) == set(flax_out)
  for key in ("features", "projection", "logits"):
    if key in flax_out:
      assert_close(torch_out[key], flax_out[key], key)
  assert len(torch_out["hiddens"]) == len(flax_out["hiddens"])
  for k, (a, b) in enumerate(zip(torch_out["hiddens"], flax_out["hiddens"], strict=True)):
    assert_close(a, b, f"hiddens[{k}]")


def torch_model(spec: specs.ModelSpec, variables: dict) -> tr.SimCLRResNet:
  """The exported state_dict loaded with strict=True into the module the sidecar describes."""
  tensors = torch_names.torch_state_dict(variables["params"], variables["batch_stats"], spec)
  model = tr.SimCLRResNet(tr.Architecture.from_dict(et.architecture(spec)))
  assert sorted(tensors) == sorted(model.state_dict())
  model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  return model


# depth, sk_ratio, stem, image side, model keys. Feature maps: imagenet 70 px -> max-pool input
# 35 (odd: TF pads both ends) -> 18, 9, 5, 3; 72 px -> 36 (even: TF pads only the end) -> 18, 9,
# 5, 3; cifar 35 px -> 35, 18, 9, 5 (odd maps into the strided convs and SK avg-pools); 36 px ->
# 36, 18, 9, 5.
# Each block type with and without selective kernels, each stem, odd and even maps (sampled:
# the padding rules are checked op by op below, on every side).
CASES = [
  (18, 0.0, "imagenet", 70, {}),
  (18, SK, "cifar", 36, dict(supervised_input_layer=1)),
  (50, SK, "imagenet", 72, dict(proj_layers_kept=1, supervised_input_layer=1)),
  (50, 0.0, "cifar", 35, dict(num_proj_layers=3, supervised_input_layer=2)),
]


@pytest.mark.parametrize(
  "depth,sk_ratio,stem,side,extra",
  CASES,
  ids=[f"r{d}-{'sk' if s else 'nosk'}-{stem}-{side}px" for d, s, stem, side, _ in CASES],
)
def test_torch_module_matches_flax(depth, sk_ratio, stem, side, extra):
  spec = specs.ModelSpec(
    depth=depth, width=0.25, sk_ratio=sk_ratio, stem=stem, **{**HEADS, **extra}
  )
  variables = random_variables(spec, seed=depth + side)
  model = torch_model(spec, variables)
  head = "fc" if spec.supervised_input_layer == 0 else "head_supervised"
  assert f"{head}.weight" in model.state_dict()
  x = images(side, seed=side)
  assert_outputs_match(torch_outputs(model, x), flax_outputs(spec, variables, x))


# --- the padding rules, op by op -------------------------------------------------------------


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("side", [5, 6, 7, 8])
def test_padding_rules_match_flax(side):
  """Max-pool (TF SAME), ResNet-D avg-pool (both strides) and convs (fixed padding / SAME)."""
  x = np.random.default_rng(side).normal(size=(1, side, side, 4)).astype(np.float32)
  pooled = flax_nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
  np.testing.assert_allclose(_nhwc(tr.MaxPool2dSame()(_nchw(x))), pooled, rtol=1e-6)
  torchvision_pool = nn.MaxPool2d(3, 2, padding=1)(_nchw(x))
  # torchvision's symmetric padding agrees for odd sides only; ceil_mode agrees for even ones.
  assert np.allclose(_nhwc(torchvision_pool), pooled) == (side % 2 == 1)
  if side % 2 == 0:
    ceil_pool = nn.MaxPool2d(3, 2, ceil_mode=True)(_nchw(x))
    np.testing.assert_allclose(_nhwc(ceil_pool), pooled, rtol=1e-6)
  for stride in (1, 2):  # resnet.Shortcut's pooling
    padded = layers.fixed_padding(x, 2) if stride > 1 else x
    expected = flax_nn.avg_pool(
      padded,
      (2, 2),
      (stride, stride),
      padding="SAME" if stride == 1 else "VALID",
      count_include_pad=False,
    )
    actual = _nhwc(tr.AvgPool2dShortcut(stride)(_nchw(x)))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6, err_msg=f"{stride=}")
  for kernel_size, stride in ((1, 2), (3, 1), (3, 2), (7, 2)):
    conv = layers.Conv(5, kernel_size, stride)
    params = conv.init(jax.random.PRNGKey(side), x)
    expected = conv.apply(params, x)
    torch_conv = tr._conv(4, 5, kernel_size, stride)
    kernel = np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1)
    torch_conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel))
    with torch.no_grad():
      actual = _nhwc(torch_conv(_nchw(x)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=f"{kernel_size=}")


# --- torchvision -----------------------------------------------------------------------------
# torchvision's ResNet (torchvision/models/resnet.py, v1.5: the bottleneck's stride on its 3×3
# conv), written out here with its module names: torchvision cannot be installed beside torch
# 2.13.0 in the main venv, so these checks run in every `make test`, and
# `test_real_torchvision_loads_an_export` repeats them with real torchvision in its own venv.


# torchvision's state_dicts (1000 classes): entries (parameters and buffers, BatchNorm's
# num_batches_tracked included) and a few names with their shapes.
TORCHVISION_KEYS = {
  18: (
    122,
    {
      "conv1.weight": (64, 3, 7, 7),
      "bn1.running_var": (64,),
      "layer1.0.conv1.weight": (64, 64, 3, 3),
      "layer2.0.conv1.weight": (128, 64, 3, 3),
      "layer2.0.downsample.0.weight": (128, 64, 1, 1),
      "layer2.0.downsample.1.num_batches_tracked": (),
      "layer4.1.bn2.bias": (512,),
      "fc.weight": (1000, 512),
      "fc.bias": (1000,),
    },
  ),
  50: (
    320,
    {
      "conv1.weight": (64, 3, 7, 7),
      "layer1.0.conv1.weight": (64, 64, 1, 1),
      "layer1.0.downsample.0.weight": (256, 64, 1, 1),
      "layer2.0.conv2.weight": (128, 128, 3, 3),
      "layer2.0.downsample.0.weight": (512, 256, 1, 1),
      "layer3.5.bn3.running_mean": (1024,),
      "layer4.2.conv3.weight": (2048, 512, 1, 1),
      "fc.weight": (1000, 2048),
    },
  ),
}


@pytest.fixture(scope="module", params=[18, 50], ids=["r18", "r50"])
def width_one(request):
  """A width-1 ImageNet-stem model without SK: its spec, random variables, export, Flax outputs."""
  spec = specs.ModelSpec(depth=request.param, **HEADS)
  variables = random_variables(spec, seed=request.param)
  tensors = torch_names.torch_state_dict(variables["params"], variables["batch_stats"], spec)
  x = images(72, seed=1)  # max-pool input 36: even, where torchvision's padding differs
  return (
    spec,
    {k: torch.from_numpy(v) for k, v in tensors.items()},
    x,
    flax_outputs(spec, variables, x),
  )


def _check_torchvision(resnet_fn, width_one) -> None:
  """Stock torchvision does not reproduce the model; with `make_torchvision_exact` it does."""
  spec, state_dict, x, expected = width_one
  backbone = tr.torchvision_state_dict(state_dict)
  assert not any(k.startswith("projection_head.") for k in backbone)
  stock = resnet_fn(spec.num_classes).eval()
  inputs = torch.from_numpy(x).permute(0, 3, 1, 2)
  if spec.depth == 18:  # SimCLR's layer1.0 has a projection shortcut; torchvision's has none
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"layer1\.0\.downsample\.0'):
      stock.load_state_dict(backbone, strict=True)
  else:
    stock.load_state_dict(backbone, strict=True)
    with torch.no_grad():
      logits = stock(inputs).numpy()
    assert np.abs(logits - expected["logits"]).max() > 1e-3 * np.abs(expected["logits"]).max()
  exact = tr.make_torchvision_exact(resnet_fn(spec.num_classes))
  exact.load_state_dict(backbone, strict=True)
  with torch.no_grad():
    assert_close(exact.eval()(inputs).numpy(), expected["logits"], "torchvision logits")
    exact.fc = nn.Identity()
    assert_close(exact(inputs).numpy(), expected["features"], "torchvision features")
  # A backbone-only load: fc replaced by Identity, no fc keys.
  features_only = tr.make_torchvision_exact(resnet_fn(1000))
  features_only.fc = nn.Identity()
  features_only.load_state_dict(tr.torchvision_state_dict(state_dict, with_fc=False), strict=True)


def test_torchvision_style_resnet_loads_the_backbone(width_one):
  spec, state_dict, _, _ = width_one
  count, samples = TORCHVISION_KEYS[spec.depth]
  reference = _tv_resnet(spec.depth, 1000).state_dict()
  assert len(reference) == count
  assert {k: tuple(reference[k].shape) for k in samples} == samples
  # The export: torchvision's names and shapes (fc sized by num_classes), plus SimCLR's layer1.0
  # projection shortcut in ResNet-18, plus the projection head under its own prefix.
  backbone = tr.torchvision_state_dict(state_dict)
  extra = (
    {k for k in backbone if k.startswith("layer1.0.downsample.")} if spec.depth == 18 else set()
  )
  assert len(extra) == (6 if spec.depth == 18 else 0)
  assert set(backbone) - extra == set(reference)
  for key, value in reference.items():
    expected = (spec.num_classes, *value.shape[1:]) if key.startswith("fc.") else value.shape
    assert tuple(backbone[key].shape) == tuple(expected), key
  assert {k.split(".")[0] for k in set(state_dict) - set(backbone)} == {"projection_head"}
  _check_torchvision(functools.partial(_tv_resnet, spec.depth), width_one)


@pytest.mark.parametrize("depth", [18, 50])
def test_a_torchvision_variant_model_exports_into_stock_torchvision(depth):
  """A model computing as torchvision does (e.g. fine-tuned from imported ImageNet weights):
  SimCLRResNet reproduces it on [0, 1] images, and stock torchvision loads the backbone and fc
  with strict=True, without make_torchvision_exact, on images normalised as its transforms do."""
  spec = specs.ModelSpec(depth=depth, variant="torchvision", **HEADS)
  variables = random_variables(spec, seed=depth + 7)
  x = images(72, seed=2)  # max-pool input 36: even, where the two paddings differ
  expected = flax_outputs(spec, variables, x)
  model = torch_model(spec, variables)
  assert_outputs_match(torch_outputs(model, x), expected)
  assert et.architecture(spec)["variant"] == "torchvision"
  stock = _tv_resnet(depth, spec.num_classes)
  stock.load_state_dict(tr.torchvision_state_dict(model.state_dict()), strict=True)
  mean = torch.tensor(resnet.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(resnet.IMAGENET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    logits = stock.eval()((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std)
  assert_close(logits.numpy(), expected["logits"], "stock torchvision logits")


REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_real_torchvision_loads_an_export(depth, tmp_path):
  """A width-1 fine-tuning workdir, exported by the command, loaded into
  `torchvision.models.resnet{depth}` the way docs/export_torch.md says, in a venv without JAX."""
  python = torchvision_python()
  spec = specs.ModelSpec(depth=depth, **HEADS)
  variables = random_variables(spec, seed=depth + 1)
  workdir = tmp_path / "ft"
  checkpoint.save_weights(workdir, variables["params"], variables["batch_stats"], step=3)
  heads = {k: v for k, v in HEADS.items() if k != "num_classes"}  # from results.json's labels
  config = {
    "mode": "full",
    "model": {"depth": depth, "width": 1.0, "stem": "imagenet", **heads, "dtype": "float32"},
    "augment": {"preset": "cxr_small", "image_size": 72},
    "labels": {"task": "chexpert"},
  }
  run_files.write_json(workdir / run_files.CONFIG_FILE, config)
  run_files.write_json(workdir / run_files.RESULTS_FILE, {"labels": LABELS, "task": "chexpert"})
  out = tmp_path / "model.safetensors"
  assert et.export(workdir, out)["architecture"]["torchvision"] == f"resnet{depth}"
  x = images(72, seed=1)  # max-pool input 36: even, where stock torchvision's padding differs
  expected = flax_outputs(spec, variables, x)
  npz = tmp_path / "expected.npz"
  np.savez(npz, images=x, logits=expected["logits"], features=expected["features"])
  check = REPO / "tests" / "tools" / "torchvision_check.py"
  result = subprocess.run(
    [str(python), str(check), str(out), str(npz)],
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["model"] == f"resnet{depth}"
  assert report["torchvision"].startswith("0.") and not report["jax_importable"]


def test_torchvision_style_resnet_with_the_cifar_stem():
  """Width 1, cifar stem: torchvision's names load after `make_torchvision_exact(stem="cifar")`
  (no Flax run: SimCLRResNet is the reference, checked against Flax above)."""
  spec = specs.ModelSpec(depth=18, stem="cifar", **HEADS)
  variables = random_variables(spec, seed=3)
  reference = torch_model(spec, variables).eval()
  backbone = tr.torchvision_state_dict(reference.state_dict())
  tv = tr.make_torchvision_exact(_tv_resnet(18, spec.num_classes), stem="cifar").eval()
  tv.load_state_dict(backbone, strict=True)
  x = torch.from_numpy(images(32, seed=2)).permute(0, 3, 1, 2)
  with torch.no_grad():
    assert_close(tv(x).numpy(), reference(x)["logits"].numpy(), "torchvision cifar logits")


def test_reset_head_puts_a_new_head_under_its_name():
  arch = tr.Architecture(depth=18, width=0.125, stem="cifar", **HEADS, supervised_input_layer=1)
  model = tr.SimCLRResNet(arch)
  assert "head_supervised.weight" in model.state_dict() and not hasattr(model, "fc")
  head = model.reset_head(4)
  assert model.fc is head and not hasattr(model, "head_supervised")
  assert "fc.weight" in model.state_dict()
  assert not any(k.startswith("head_supervised") for k in model.state_dict())
  x = torch.from_numpy(images(32, n=3)).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = model.eval()(x)
    assert torch.equal(out["logits"], head(out["features"]))
    model.reset_head(2, input_layer=2)  # on the projection output (proj_out_dim 16)
    out = model(x)
  assert out["logits"].shape == (3, 2) and model.head_supervised.in_features == 16
  with pytest.raises(ValueError, match="supervised_input_layer=3"):
    model.reset_head(2, input_layer=3)


# --- checkpoints on disk and the command line ------------------------------------------------

FINETUNE_SPEC = dict(depth=18, width=0.25, stem="cifar", **HEADS, proj_layers_kept=1)


@pytest.fixture(scope="module")
def finetune_workdir(tmp_path_factory):
  """A fine-tuning workdir as finetune.py leaves it: config.json, results.json, checkpoint."""
  workdir = tmp_path_factory.mktemp("ft")
  spec = specs.ModelSpec(**FINETUNE_SPEC, supervised_input_layer=1)
  variables = random_variables(spec, seed=7)
  checkpoint.save_weights(workdir, variables["params"], variables["batch_stats"], step=12)
  model = {k: v for k, v in FINETUNE_SPEC.items() if k != "num_classes"}
  config = {
    "mode": "full",
    "model": {**model, "supervised_input_layer": 1, "dtype": "float32"},
    "augment": {"preset": "cxr_small", "image_size": 32},
    "labels": {"task": "chexpert"},
  }
  run_files.write_json(workdir / run_files.CONFIG_FILE, config)
  run_files.write_json(workdir / run_files.RESULTS_FILE, {"labels": LABELS, "task": "chexpert"})
  return workdir, spec, variables


def test_command_line_end_to_end(finetune_workdir, tmp_path):
  workdir, spec, variables = finetune_workdir
  out = tmp_path / "export" / "model.safetensors"
  command = [sys.executable, "-m", "micle_jax.export_torch", f"--checkpoint={workdir}"]
  result = subprocess.run([*command, f"--out={out}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed["architecture"]["depth"] == 18 and printed["architecture"]["num_classes"] == 3

  info = json.loads(out.with_suffix(".json").read_text())
  assert out.stat().st_mode == out.with_suffix(".json").stat().st_mode  # not safetensors' 0600
  assert info["format"] == tr.EXPORT_FORMAT == et.EXPORT_FORMAT
  assert info["labels"] == LABELS and info["task"] == "chexpert"
  assert info["source"] == {
    "checkpoint": str(workdir),
    "kind": "finetune",
    "architecture_from": str(workdir / "config.json"),
    "step": 12,
  }
  assert info["architecture"] == {
    "depth": 18,
    "width": 0.25,
    "sk_ratio": 0.0,
    "stem": "cifar",
    "num_proj_layers": 2,
    "proj_out_dim": 16,
    "proj_layers_kept": 1,
    "supervised_input_layer": 1,
    "num_classes": 3,
    "variant": "simclr",
    "block": "basic",
    "num_features": 128,
    "projection_layers_built": 1,
    "projection_dim": 128,
    "torchvision": None,
  }
  assert info["input"]["range"] == [0.0, 1.0] and info["input"]["mean"] is None
  assert info["input"]["layout"] == "NCHW" and info["input"]["image_size"] == 32
  assert info["input"]["preset"] == "cxr_small"
  assert info["outputs"]["logits_activation"] == "sigmoid"
  assert info["state_dict"]["supervised_head"] == "head_supervised"

  model = tr.from_export(out)
  assert not model.training and model.export_info == info
  x = images(32, seed=3)
  expected = flax_outputs(spec, variables, x)
  assert_outputs_match(torch_outputs(model, x), expected)

  out.with_suffix(".json").unlink()  # the safetensors metadata holds the same sidecar
  assert tr.from_export(out).export_info == info

  with pytest.raises(FileExistsError, match="pass --overwrite"):
    et.export(workdir, out)
  assert et.export(workdir, out, overwrite=True) == info

  missing = tmp_path / "nowhere"
  command = [sys.executable, "-m", "micle_jax.export_torch", f"--checkpoint={missing}"]
  result = subprocess.run([*command, f"--out={out}"], capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: --checkpoint={missing}: no such file or directory"
  )


def test_a_step_or_checkpoints_folder_reads_the_workdirs_config(finetune_workdir):
  workdir = finetune_workdir[0]
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "12"):
    source = et.locate(path)
    assert source.arch_file == workdir / "config.json" and source.labels == LABELS


def _copy_workdir(workdir, target, config=None):
  shutil.copytree(workdir / "checkpoints", target / "checkpoints")
  if config is not None:
    run_files.write_json(target / "config.json", config)
  return target


def test_bad_input_fails_naming_it(finetune_workdir, tmp_path):
  workdir = finetune_workdir[0]
  out = tmp_path / "m.safetensors"
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match=re.escape(f"--checkpoint={missing}: no such file")):
    et.export(missing, out)
  no_config = _copy_workdir(workdir, tmp_path / "no_config")
  with pytest.raises(
    FileNotFoundError, match=re.escape(f"no config.json or conversion.json in {no_config}")
  ):
    et.export(no_config, out)
  empty = tmp_path / "empty"
  run_files.write_json(empty / "config.json", {"model": {"depth": 18}})
  with pytest.raises(
    FileNotFoundError, match=re.escape(f"--checkpoint={empty}: no Orbax checkpoint")
  ):
    et.export(empty, out)

  cases = {
    "no_model": ({"seed": 0}, "config.json: no 'model' section, so the architecture is unknown"),
    "depth": (
      {"model": {"depth": 42}},
      r"config.json: unknown architecture: config.model.depth=42 not in \[18, 34, 50",
    ),
    "key": (
      {"model": {"widht": 2}},
      r"config.json: unknown architecture: .*unknown keys \['widht'",
    ),
  }
  for name, (config, message) in cases.items():
    bad = _copy_workdir(workdir, tmp_path / name, config)
    with pytest.raises(et.ExportError, match=re.escape(f"{bad}/") + message):
      et.export(bad, out)

  # An architecture that the weights do not have: every mismatched leaf is counted.
  model = {k: v for k, v in FINETUNE_SPEC.items() if k != "num_classes"}
  wrong = _copy_workdir(workdir, tmp_path / "wrong", {"model": {**model, "depth": 34}})
  with pytest.raises(et.ExportError) as error:
    et.export(wrong, out)
  message = str(error.value)
  assert f"--checkpoint={wrong} (step 12) does not fit the architecture in {wrong}/config.json" in (
    message
  )
  assert "params/backbone/block_group_0_block_2/conv_0/kernel: expected [3, 3, 16, 16], the " in (
    message
  )
  with pytest.raises(et.ExportError, match="must end in .safetensors"):
    et.export(workdir, tmp_path / "m.pt")
  with pytest.raises(et.ExportError, match="supervised_input_layer=5"):
    et.export(workdir, out, supervised_input_layer=5)
  assert not out.exists()


def test_simclr_conversion_round_trip(tmp_path):
  """A TF SimCLRv2 checkpoint -> convert_simclr -> export -> PyTorch gives the same outputs as the
  Flax model from the converted checkpoint (and as TensorFlow)."""
  import simclr_tf_reference as ref

  from micle_jax.tools import convert_simclr as cs

  model = ref.Model(depth=50, width=0.125, sk_ratio=SK, seed=5)
  prefix = ref.save_tf1(ref.tf1_tensors(model), str(tmp_path / "tf1" / "model.ckpt-9"))
  report = cs.convert(prefix, str(tmp_path / "converted"))
  info = et.export(tmp_path / "converted", tmp_path / "r50_sk.safetensors")
  assert info["source"]["kind"] == "simclr_conversion"
  assert info["architecture"]["sk_ratio"] == SK and info["architecture"]["num_classes"] == 5
  assert info["state_dict"]["supervised_head"] == "fc"

  x = images(72, seed=4)
  params, batch_stats, _ = checkpoint.load_weights(tmp_path / "converted")
  spec = dataclasses.replace(specs.ModelSpec(**report["model"]), num_classes=5)
  expected = flax_outputs(spec, {"params": params, "batch_stats": batch_stats}, x)
  actual = torch_outputs(tr.from_export(tmp_path / "r50_sk.safetensors"), x)
  assert_outputs_match(actual, expected)
  for key, value in model(x).items():
    assert_close(actual[key], value, f"TensorFlow {key}")


def test_torch_resnet_imports_only_torch_and_the_standard_library():
  path = tr.__file__
  tree = ast.parse(open(path).read())
  tops = {
    alias.name.split(".")[0]
    for node in ast.walk(tree)
    if isinstance(node, ast.Import)
    for alias in node.names
  } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  assert tops - set(sys.stdlib_module_names) == {"torch", "safetensors"}
  code = (
    "import sys; import micle_jax.tools.torch_resnet as tr; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('jax', 'flax', 'tensorflow', 'absl', 'safetensors', 'etils')))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


def test_the_torch_module_builds_the_architectures_of_the_schema():
  """torch_resnet.py imports nothing of micle_jax, so its tables are checked against ours here."""
  assert tr.RESNET_LAYERS == resnet.RESNET_LAYERS
  assert set(tr.STEMS) == set(specs.STEMS) and tr.SK_MIN_DIM == resnet.SK_MIN_DIM
  assert tr.BN_EPSILON == layers.BN_EPSILON
  assert tr.BN_MOMENTUM == pytest.approx(1 - layers.BN_MOMENTUM)  # PyTorch's convention
