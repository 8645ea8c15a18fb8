"""PyTorch weight files read into NumPy without PyTorch: `.safetensors` and `torch.save`'s zip.

`read_tensors(path)` returns {name: np.ndarray} and the container it found. Neither format needs
torch or the safetensors package here:

- **safetensors**: an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
  data_offsets}}, and `__metadata__`), then the raw little-endian bytes.
- **`torch.save`** (PyTorch ≥ 1.6, the default since): a zip archive holding `<name>/data.pkl`,
  a pickle whose tensors point at storages `<name>/data/<key>` by persistent id. It is read by an
  unpickler that knows only what a state_dict or training checkpoint of tensors holds (dicts,
  lists, numbers, strings, `OrderedDict`, tensors and parameters, `torch.Size`, dtypes); anything
  else is refused by name, never executed (as `torch.load(weights_only=True)` does).

Training checkpoints that nest the weights (`{"state_dict": ...}`, `{"model": ...}`, timm's
`state_dict_ema`) are unwrapped by `state_dict`, and DataParallel's `module.` prefix is dropped.
"""

import collections
import json
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
# torch's storage classes (as `torch.save` pickles them) and dtypes -> NumPy.
STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
TORCH_DTYPES = {
  "float64": np.float64,
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "int32": np.int32,
  "int16": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
}
# Where a training checkpoint keeps its weights, in the order they are looked for.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")


class WeightsFileError(ValueError):
  """A file that is not a readable PyTorch weights file; the message names it and why."""


def read_safetensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: array}, metadata) of a .safetensors file."""
  data = path.read_bytes()
  if len(data) < 8:
    raise WeightsFileError(f"{path}: too short for a safetensors file")
  (size,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8 : 8 + size])
  except ValueError as e:
    raise WeightsFileError(f"{path}: not a safetensors file (its header is not JSON)") from e
  if not isinstance(header, dict):
    raise WeightsFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
  metadata = header.pop("__metadata__", None) or {}
  body = memoryview(data)[8 + size :]
  out = {}
  for name, entry in header.items():
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
      raise WeightsFileError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, not read")
    begin, end = entry["data_offsets"]
    array = np.frombuffer(body[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
    out[name] = array.reshape(entry["shape"]).astype(dtype)
  return out, metadata


class _Tensor:
  """A tensor's place in a storage, until the storage is read."""

  def __init__(self, storage: tuple[str, Any], offset: int, size, stride, dtype=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
    self.dtype = dtype

  def read(self, archive: zipfile.ZipFile, prefix: str) -> np.ndarray:
    key, storage_dtype = self.storage
    dtype = np.dtype(self.dtype or storage_dtype).newbyteorder("<")
    flat = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype)
    if not self.size:
      return np.array(flat[self.offset], dtype=dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :],
      shape=self.size,
      strides=[s * dtype.itemsize for s in self.stride],
      writeable=False,
    )
    return np.array(view, dtype=dtype.newbyteorder("="))


def _rebuild_tensor(storage, offset, size, stride, *_args, **_kwargs) -> _Tensor:
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, _grad, _hooks, dtype, *_args) -> _Tensor:
  return _Tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, *_args) -> _Tensor:
  return data


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, path: pathlib.Path):
    super().__init__(file)
    self.path = path

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return STORAGE_DTYPES[name]
    if module == "torch" and name in TORCH_DTYPES:
      return TORCH_DTYPES[name]
    raise WeightsFileError(
      f"{self.path}: holds a {module}.{name}, which is not part of a state_dict of tensors; "
      "load it with torch and save `model.state_dict()` (or as .safetensors)"
    )

  def persistent_load(self, pid: Any) -> tuple[str, Any]:
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise WeightsFileError(f"{self.path}: unknown persistent id {pid!r}")
    return str(pid[2]), pid[1]


def _resolve(tree: Any, archive: zipfile.ZipFile, prefix: str) -> Any:
  if isinstance(tree, _Tensor):
    return tree.read(archive, prefix)
  if isinstance(tree, Mapping):
    return {key: _resolve(value, archive, prefix) for key, value in tree.items()}
  if isinstance(tree, list | tuple):
    return type(tree)(_resolve(value, archive, prefix) for value in tree)
  return tree


def read_torch_zip(path: pathlib.Path) -> Any:
  """The object `torch.save` wrote to `path`, tensors as NumPy arrays."""
  if not zipfile.is_zipfile(path):
    raise WeightsFileError(
      f"{path}: not a zip archive, so not torch.save's format since PyTorch 1.6 (a legacy file: "
      "load it with torch and save it again, or as .safetensors)"
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise WeightsFileError(f"{path}: a zip archive without exactly one data.pkl ({pickles})")
    prefix = pickles[0][: -len("data.pkl")]
    with archive.open(pickles[0]) as f:
      try:
        tree = _Unpickler(f, path).load()
      except WeightsFileError:
        raise
      except Exception as e:  # noqa: BLE001 -- any unpickling failure names the file
        raise WeightsFileError(f"{path}: its data.pkl cannot be read ({e})") from e
    return _resolve(tree, archive, prefix)


def state_dict(tree: Any, path: pathlib.Path) -> tuple[dict[str, np.ndarray], str | None]:
  """({name: array}, the container key it was found under or None) of a loaded file.

  A training checkpoint's weights are taken from its first `CONTAINER_KEYS` entry; DataParallel's
  `module.` prefix is dropped when every name has it.
  """
  container = None
  if isinstance(tree, Mapping) and not all(isinstance(v, np.ndarray) for v in tree.values()):
    container = next((k for k in CONTAINER_KEYS if isinstance(tree.get(k), Mapping)), None)
    if container is None:
      raise WeightsFileError(
        f"{path}: not a state_dict (top-level keys {sorted(map(str, tree))[:8]}) and none of "
        f"{list(CONTAINER_KEYS)} holds one"
      )
    tree = tree[container]
  if not isinstance(tree, Mapping) or not tree:
    raise WeightsFileError(f"{path}: holds no tensors ({type(tree).__name__})")
  tensors = {str(k): v for k, v in tree.items()}
  bad = [k for k, v in tensors.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise WeightsFileError(f"{path}: entries that are not tensors: {bad[:5]}")
  if all(k.startswith("module.") for k in tensors):
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
  return tensors, container


def read_tensors(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """({name: array}, {"format", "container", "metadata"}) of a .safetensors or torch.save file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--weights={path}: no such file")
  if path.suffix == ".safetensors":
    tensors, metadata = read_safetensors(path)
    return tensors, {"format": "safetensors", "container": None, "metadata": metadata}
  tensors, container = state_dict(read_torch_zip(path), path)
  return tensors, {"format": "torch_save_zip", "container": container, "metadata": {}}
