"""import_torch and torch_files: torchvision/timm ResNet weights -> our model, computing the same.

The reference is torchvision's forward pass in eval mode: here the written-out torchvision ResNet
(`torchvision_clone.py`, in every `make test`), and in `test_real_torchvision_and_timm_import_
exactly` real torchvision and timm, every depth, in their own venv. The images' side makes the
stem's max-pool input even, where torchvision's symmetric padding differs from SimCLR's.
"""

import argparse
import collections
import dataclasses
import functools
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision_clone import randomize_batchnorm, tv_resnet
from torchvision_venv import torchvision_python

from micle_jax import specs
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, restore_rules, run_files
from micle_jax.tools import import_torch, torch_files

REPO = pathlib.Path(__file__).resolve().parents[2]
SIDE = 72  # stem output 36: even, so torchvision's max-pool padding matters
MEAN = torch.tensor(resnet.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(resnet.IMAGENET_STD).view(1, 3, 1, 1)


def images(n: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (n, SIDE, SIDE, 3)).astype(np.float32)


def torch_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
  """torchvision's eval outputs on NHWC [0, 1] images normalised as its transforms do, computed
  in float64 (an independent reference for our float32 model)."""
  model = model.double()
  inputs = (torch.from_numpy(x).double().permute(0, 3, 1, 2) - MEAN.double()) / STD.double()
  with torch.no_grad():
    logits = model(inputs).numpy()
    fc, model.fc = model.fc, torch.nn.Identity()
    features = model(inputs).numpy()
    model.fc = fc
  return {"logits": logits, "features": features}


def flax_outputs(out_dir: pathlib.Path, x: np.ndarray) -> dict[str, np.ndarray]:
  """Our model's eval outputs on the raw images, built from the import's recorded `model` keys."""
  report = json.loads((out_dir / run_files.CONVERSION_FILE).read_text())
  params, batch_stats, _ = checkpoint.load_weights(out_dir)
  spec = specs.from_config(specs.ModelSpec, report["model"], "model")
  spec = dataclasses.replace(spec, num_classes=report["num_classes"])
  out = _forward(spec)({"params": params, "batch_stats": batch_stats}, x)
  return {"logits": np.asarray(out["logits"]), "features": np.asarray(out["features"])}


@functools.cache
def _forward(spec: specs.ModelSpec):
  """The model's jitted eval forward pass, compiled once per architecture."""
  return jax.jit(lambda v, x: resnet.create_model(spec).apply(v, x, train=False))


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
  scale = float(np.abs(expected).max())
  assert scale > 1e-3, f"{what}: degenerate output"
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


@pytest.mark.parametrize("depth", [18, 50])
def test_imported_weights_compute_as_torchvision(depth, tmp_path):
  model = randomize_batchnorm(tv_resnet(depth, 10), seed=depth)
  weights = tmp_path / "model.pth"
  torch.save(model.state_dict(), weights)  # float32, as users save them
  report = import_torch.import_weights(str(weights), str(tmp_path / "out"), arch=f"resnet{depth}")
  x = images()
  expected, actual = torch_outputs(model, x), flax_outputs(tmp_path / "out", x)
  for name in ("features", "logits"):
    assert_close(actual[name], expected[name], f"resnet{depth} {name}")
  assert report["model"] == {
    "depth": depth,
    "width": 1.0,
    "sk_ratio": 0.0,
    "stem": "imagenet",
    "variant": "torchvision",
    "num_proj_layers": 0,
    "proj_out_dim": 128,
  }
  state = model.state_dict()
  counters = [k for k in state if k.endswith("num_batches_tracked")]
  assert report["tensors"] == {
    "total": len(state),
    "used": len(state) - len(counters),
    "skipped": len(counters),
  }
  assert sorted(report["mapping"]) == sorted(set(state) - set(counters))
  assert report["mapping"]["conv1.weight"] == "params/backbone/stem_conv_0/kernel"
  assert report["mapping"]["fc.bias"] == "params/head_supervised/bias"
  assert report["source"]["format"] == "torch_save_zip" and report["num_classes"] == 10
  # SimCLR's computation of the same weights differs (the max-pool's padding, ResNet-18's first
  # shortcut): the variant is what makes the import exact.
  simclr = {**report["model"], "variant": "simclr"}
  if depth == 50:
    params, stats, _ = checkpoint.load_weights(tmp_path / "out")
    spec = specs.ModelSpec(**{**simclr, "num_classes": 10})
    out = resnet.create_model(spec).apply({"params": params, "batch_stats": stats}, x, train=False)
    assert np.abs(np.asarray(out["features"]) - expected["features"]).max() > 1e-2


def test_simclr_variant_refuses_imported_weights(tmp_path):
  """A config without model.variant=torchvision cannot init from the import, naming the fix."""
  torch.save(randomize_batchnorm(tv_resnet(18, 4), 0).state_dict(), tmp_path / "m.pth")
  import_torch.import_weights(str(tmp_path / "m.pth"), str(tmp_path / "out"))
  run_files.check_init_variant(str(tmp_path / "out"), "torchvision")
  with pytest.raises(ValueError, match=r"model.variant='torchvision'.*--config.model.variant="):
    run_files.check_init_variant(str(tmp_path / "out" / "checkpoints"), "simclr")


def _state(depth: int = 18) -> dict[str, torch.Tensor]:
  return tv_resnet(depth, 5).state_dict()


def _import_error(tmp_path, state, **kwargs) -> str:
  weights = tmp_path / "bad.safetensors"
  save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
  with pytest.raises((import_torch.WeightsMismatchError, torch_files.WeightsFileError)) as e:
    import_torch.import_weights(str(weights), str(tmp_path / "out"), **kwargs)
  message = str(e.value)
  assert "\n" not in message and str(weights) in message, message
  return message


def test_mismatches_are_one_line_naming_the_key(tmp_path):
  state = _state()
  del state["layer2.1.bn1.running_var"]
  assert "missing layer2.1.bn1.running_var" in _import_error(tmp_path, state)
  state = _state() | {"layer1.0.downsample.0.weight": torch.zeros(64, 64, 1, 1)}
  assert "extra layer1.0.downsample.0.weight [64, 64, 1, 1]" in _import_error(tmp_path, state)
  state = _state() | {"layer3.0.conv2.weight": torch.zeros(256, 256, 5, 5)}
  assert "layer3.0.conv2.weight has shape [256, 256, 5, 5]" in _import_error(tmp_path, state)
  state = _state() | {"layer1.0.bn1.weight": torch.zeros(64, dtype=torch.int64)}
  assert "layer1.0.bn1.weight is int64, not a float" in _import_error(tmp_path, state)


def test_wrong_architecture_and_other_files(tmp_path):
  assert "holds a resnet18, not --arch=resnet50" in _import_error(
    tmp_path, _state(), arch="resnet50"
  )
  vit = {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "head.weight": torch.zeros(2, 8)}
  assert "not a torchvision/timm ResNet state_dict" in _import_error(tmp_path, vit)
  resnet_d = {"conv1.0.weight": torch.zeros(32, 3, 3, 3)} | {
    k: v for k, v in _state().items() if not k.startswith("conv1.")
  }
  assert "ResNet-D stem" in _import_error(tmp_path, resnet_d)
  text = tmp_path / "notes.pth"
  text.write_text("not weights")
  with pytest.raises(torch_files.WeightsFileError, match="notes.pth: not a zip archive"):
    import_torch.import_weights(str(text), str(tmp_path / "out2"))


def test_torch_save_read_without_torch_equals_torch_load(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = collections.OrderedDict(
    plain=torch.randn(3, 4, 5),
    transposed=base.t(),  # a strided view of a shared storage
    offset=base[1:, 2:],
    half=torch.randn(7).half(),
    bf16=torch.randn(2, 3).bfloat16(),
    counter=torch.tensor(5),
    param=torch.nn.Parameter(torch.randn(2, 2)),
  )
  checkpoint_file = tmp_path / "train.pth.tar"
  torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state}, checkpoint_file)
  loaded, found = torch_files.read_tensors(checkpoint_file)
  assert found["container"] == "state_dict" and found["format"] == "torch_save_zip"
  reference = torch.load(checkpoint_file, weights_only=True)["state_dict"]
  assert list(loaded) == list(reference)
  for key, value in reference.items():
    expected = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    got = loaded[key].astype(np.float32) if loaded[key].dtype == ml_dtypes.bfloat16 else loaded[key]
    np.testing.assert_array_equal(got, expected, err_msg=key)
    assert got.shape == tuple(value.shape), key
  # DataParallel's prefix goes; the safetensors reader agrees with safetensors' own.
  torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")
  assert list(torch_files.read_tensors(tmp_path / "dp.pt")[0]) == list(state)
  save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp_path / "s.safetensors"))
  from_safetensors, _ = torch_files.read_tensors(tmp_path / "s.safetensors")
  for key in state:
    np.testing.assert_array_equal(from_safetensors[key], loaded[key], err_msg=key)


class _Pointer:
  """Pickles as a tensor over storage "0" with any size, stride and offset (a crafted file)."""

  def __init__(self, size, stride, offset=0):
    self.args = (offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, (_STORAGE, *self.args)


_STORAGE = object()


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is _STORAGE else None


def _crafted(path: pathlib.Path, tree, storage: bytes, byteorder: bytes = b"little") -> None:
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump(tree)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", byteorder)
    archive.writestr("archive/data/0", storage)


def test_what_a_training_checkpoint_holds_beside_the_weights_is_never_run(tmp_path):
  """A timm/torchvision-references checkpoint: its `args` and devices stay inert names; the
  weights load; an object among the weights is refused; another entry is chosen by name."""
  ema = {k: v + 1 for k, v in _state().items() if v.is_floating_point()}
  checkpoint_file = tmp_path / "train.pth.tar"
  torch.save(
    {"args": argparse.Namespace(lr=0.1), "device": torch.device("cpu"), "epoch": 3,
     "state_dict": _state(), "state_dict_ema": ema},
    checkpoint_file,
  )  # fmt: skip
  tensors, found = torch_files.read_tensors(checkpoint_file)
  assert found["container"] == "state_dict" and len(tensors) == len(_state())
  tensors, found = torch_files.read_tensors(checkpoint_file, container="state_dict_ema")
  assert found["container"] == "state_dict_ema" and len(tensors) == len(ema)
  with pytest.raises(torch_files.WeightsFileError, match="no state_dict under 'model'"):
    torch_files.read_tensors(checkpoint_file, container="model")
  torch.save(_state() | {"bad": argparse.Namespace()}, tmp_path / "a.pth")
  with pytest.raises(torch_files.WeightsFileError, match=r"not tensors: bad \(<argparse.Names"):
    torch_files.read_tensors(tmp_path / "a.pth")
  torch.save(_state(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  with pytest.raises(torch_files.WeightsFileError, match=r"legacy.pth: not a zip archive"):
    torch_files.read_tensors(tmp_path / "legacy.pth")


def test_crafted_files_cannot_read_outside_their_data(tmp_path):
  four = np.arange(4, dtype="<f4").tobytes()
  _crafted(tmp_path / "ok.pth", {"w": _Pointer((2, 2), (1, 2), offset=0)}, four)
  np.testing.assert_array_equal(
    torch_files.read_tensors(tmp_path / "ok.pth")[0]["w"], [[0, 2], [1, 3]]
  )
  for name, pointer in [
    ("far", _Pointer((100,), (1000,))),
    ("offset", _Pointer((2,), (1,), offset=3)),
    ("negative", _Pointer((2,), (-1,), offset=1)),
  ]:
    _crafted(tmp_path / f"{name}.pth", {"w": pointer}, four)
    with pytest.raises(torch_files.WeightsFileError, match="reaches outside its storage"):
      torch_files.read_tensors(tmp_path / f"{name}.pth")
  # A big-endian machine's file: read in its byte order.
  _crafted(
    tmp_path / "big.pth", {"w": _Pointer((4,), (1,))}, np.arange(4, dtype=">f4").tobytes(), b"big"
  )
  np.testing.assert_array_equal(
    torch_files.read_tensors(tmp_path / "big.pth")[0]["w"], [0, 1, 2, 3]
  )
  # safetensors whose offsets do not fit the shape, or the body.
  save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "s.safetensors"))
  data = (tmp_path / "s.safetensors").read_bytes()
  (tmp_path / "short.safetensors").write_bytes(data[:-4])
  with pytest.raises(torch_files.WeightsFileError, match=r"short.safetensors: tensor w of shape"):
    torch_files.read_tensors(tmp_path / "short.safetensors")


def test_reading_needs_no_torch(tmp_path):
  torch.save(_state(), tmp_path / "m.pth")
  code = (
    "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
    "from micle_jax.tools import torch_files\n"
    f"tensors, _ = torch_files.read_tensors({str(tmp_path / 'm.pth')!r})\n"
    "print(len(tensors), tensors['conv1.weight'].shape)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
  )
  assert out.stdout.split() == [str(len(_state())), "(64,", "3,", "7,", "7)"]


# --- real torchvision and timm ----------------------------------------------------------------


@pytest.mark.slow
def test_real_torchvision_and_timm_import_exactly(tmp_path):
  """Every depth of torchvision's and timm's ResNets, randomly initialised in their own venv and
  saved as users save them, imports and computes their features and logits."""
  python = torchvision_python()
  x = images(2, seed=3)
  np.save(tmp_path / "images.npy", x)
  check = REPO / "tests" / "tools" / "torchvision_import_check.py"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(REPO)}
  done = subprocess.run(
    [str(python), str(check), str(tmp_path / "files"), str(tmp_path / "images.npy")],
    capture_output=True, text=True, env=env, cwd=tmp_path,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  assert not report["jax_importable"] and len(report["files"]) == 10
  for name in report["files"]:
    weights = tmp_path / "files" / name
    out = tmp_path / name.replace(".", "_")
    arch = weights.stem.split("_")[1]
    import_torch.import_weights(str(weights), str(out), arch=arch)
    expected = np.load(weights.with_suffix(".npz"))
    actual = flax_outputs(out, x)
    for key in ("features", "logits"):
      assert_close(actual[key], expected[key], f"{name} {key}")
    weights.unlink()


def test_imported_weights_start_a_pretraining(tmp_path):
  """ImageNet → SimCLR/MICLe: the imported backbone restores into a model with a projection head
  under the pretraining rule without that head (the weights have none: asking for it fails, as
  does SimCLR's ResNet-18, which has a first-block shortcut they lack)."""
  torch.save(randomize_batchnorm(tv_resnet(18, 7), 1).state_dict(), tmp_path / "m.pth")
  import_torch.import_weights(str(tmp_path / "m.pth"), str(tmp_path / "out"))
  params, _, _ = checkpoint.load_weights(tmp_path / "out")

  def target(variant: str) -> dict:
    spec = import_torch.model_spec(18, 3)
    spec = dataclasses.replace(spec, variant=variant, num_proj_layers=2, proj_out_dim=16)
    model = resnet.create_model(spec)
    x = np.zeros((1, 32, 32, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])

  rule = restore_rules.pretrain_init_rule(init_projection_head=False)
  restored, report = restore_rules.restore_allowed(target("torchvision"), params, rule, source="t")
  assert {p.split("/")[0] for p in report.restored} == {"backbone"}
  assert {p.split("/")[0] for p in report.fresh} == {"projection_head", "head_supervised"}
  np.testing.assert_array_equal(
    restored["backbone"]["stem_conv_0"]["kernel"], params["backbone"]["stem_conv_0"]["kernel"]
  )
  with pytest.raises(ValueError, match="projection_head/dense_0/kernel: expected shape"):
    restore_rules.restore_allowed(
      target("torchvision"), params, restore_rules.pretrain_init_rule(True), source="t"
    )
  with pytest.raises(ValueError, match="block_group_0_block_0/shortcut/conv/kernel"):
    restore_rules.restore_allowed(target("simclr"), params, rule, source="t")
