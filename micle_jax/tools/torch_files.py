"""PyTorch weight files read into NumPy without PyTorch: `.safetensors` and `torch.save`'s zip.

`read_tensors(path)` returns {name: np.ndarray} and the container it found. Neither format needs
torch or the safetensors package here:

- **safetensors**: an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
  data_offsets}}, and `__metadata__`), then the raw little-endian bytes.
- **`torch.save`** (PyTorch ≥ 1.6, the default since): a zip archive holding `<name>/data.pkl`,
  a pickle whose tensors point at storages `<name>/data/<key>` by persistent id, in the byte
  order of its `byteorder` record. It is read by an unpickler that builds only what a state_dict
  holds (dicts, lists, numbers, strings, `OrderedDict`, tensors and parameters, `torch.Size`); an object of any other class becomes an inert name (`_Opaque`), its constructor never
  run, and is refused if it sits among the weights. A tensor that would reach outside its storage
  is refused.

Training checkpoints that nest the weights (`{"state_dict": ..., "args": Namespace(...)}`,
`{"model": ...}`) are unwrapped by `state_dict` (another entry, e.g. timm's `state_dict_ema`, by
naming it), and DataParallel's `module.` prefix is dropped.
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
# torch's storage classes (as `torch.save` pickles them) -> NumPy dtypes.
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
  if 8 + size > len(data):
    raise WeightsFileError(f"{path}: its header claims {size} bytes; the file has {len(data)}")
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
    try:
      dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
      shape = [int(n) for n in entry["shape"]]
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise WeightsFileError(
        f"{path}: tensor {name}: an entry this reader cannot use ({e!r})"
      ) from e
    if not (0 <= begin <= end <= len(body)) or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise WeightsFileError(
        f"{path}: tensor {name} of shape {shape} ({dtype.name}) has data offsets "
        f"[{begin}, {end}] in a body of {len(body)} bytes"
      )
    array = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<"))
    out[name] = array.reshape(shape).astype(dtype)
  return out, metadata


class _Tensor:
  """A tensor's place in a storage, until the storage is read."""

  def __init__(self, storage: tuple[str, Any, int | None], offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def read(self, storages: "_Storages") -> np.ndarray:
    key, storage_dtype, numel = self.storage
    flat = storages.get(key, np.dtype(storage_dtype), numel)
    count = int(np.prod(self.size)) if self.size else 1
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
    if (
      len(self.stride) != len(self.size)
      or self.offset < 0
      or min(self.stride, default=0) < 0
      or (count > 0 and last >= flat.size)
    ):
      raise WeightsFileError(
        f"{storages.path}: a tensor of size {list(self.size)}, stride {list(self.stride)} and "
        f"offset {self.offset} reaches outside its storage data/{key} ({flat.size} elements)"
      )
    if count == 0:
      return np.zeros(self.size, flat.dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :],
      shape=self.size,
      strides=[s * flat.dtype.itemsize for s in self.stride],
      writeable=False,
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


class _Storages:
  """The archive's storages, each read once (parameters may share one), in its byte order."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: pathlib.Path):
    self.archive, self.prefix, self.path = archive, prefix, path
    names = set(archive.namelist())
    order = (
      archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
    )
    if order not in ("little", "big"):
      raise WeightsFileError(f"{path}: unknown byteorder record {order!r}")
    self.order = "<" if order == "little" else ">"
    self.cache: dict[tuple[str, str], np.ndarray] = {}

  def get(self, key: str, dtype: np.dtype, numel: int | None) -> np.ndarray:
    dtype = dtype.newbyteorder(self.order)
    if (key, dtype.str) not in self.cache:
      try:
        data = self.archive.read(f"{self.prefix}data/{key}")
      except KeyError as e:
        raise WeightsFileError(f"{self.path}: no storage data/{key} in the archive") from e
      if len(data) % dtype.itemsize or (numel is not None and len(data) < numel * dtype.itemsize):
        raise WeightsFileError(
          f"{self.path}: storage data/{key} holds {len(data)} bytes, not {numel} × {dtype.itemsize}"
        )
      self.cache[(key, dtype.str)] = np.frombuffer(data, dtype=dtype)
    return self.cache[(key, dtype.str)]


class _Opaque:
  """What an object of any class but the allowed ones unpickles to: its name, nothing run.

  Training checkpoints hold such objects beside the weights (`args` as an argparse.Namespace,
  `torch.device`, NumPy scalars); they are kept inert, and refused only if the weights hold one.
  The unpickler hands out a subclass per name (`_opaque_class`), since pickle's NEWOBJ needs a
  type; its state and items are dropped.
  """

  name = "?"

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state: Any) -> None:
    pass

  def __setitem__(self, key: Any, value: Any) -> None:
    pass

  def append(self, value: Any) -> None:
    pass

  def extend(self, values: Any) -> None:
    pass

  def __repr__(self) -> str:
    return f"<{self.name}>"


def _opaque_class(name: str) -> type:
  return type("_Opaque", (_Opaque,), {"name": name})


def _rebuild_tensor(storage, offset, size, stride, *_args, **_kwargs) -> _Tensor:
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_args) -> _Tensor:
  return data


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
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
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, pid: Any) -> tuple[str, Any, int | None]:
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise WeightsFileError(f"{self.path}: unknown persistent id {pid!r}")
    if isinstance(pid[1], type) and issubclass(pid[1], _Opaque):
      raise WeightsFileError(f"{self.path}: a storage of type {pid[1].name}, not read")
    numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
    return str(pid[2]), pid[1], numel


def _resolve(tree: Any, storages: _Storages) -> Any:
  if isinstance(tree, _Tensor):
    return tree.read(storages)
  if isinstance(tree, Mapping):
    return {key: _resolve(value, storages) for key, value in tree.items()}
  if isinstance(tree, list | tuple):
    return type(tree)(_resolve(value, storages) for value in tree)
  return tree


def read_torch_zip(path: pathlib.Path) -> Any:
  """The object `torch.save` wrote to `path`, tensors as NumPy arrays, objects of other classes
  as inert `_Opaque` names."""
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
    return _resolve(tree, _Storages(archive, prefix, path))


def state_dict(
  tree: Any, path: pathlib.Path, container: str | None = None
) -> tuple[dict[str, np.ndarray], str | None]:
  """({name: array}, the container key it was found under or None) of a loaded file.

  A training checkpoint's weights are taken from `container`, else from its first
  `CONTAINER_KEYS` entry (timm's `state_dict`, not its `state_dict_ema`: name that to take it);
  DataParallel's `module.` prefix is dropped when every name has it.
  """
  if container is not None:
    if not (isinstance(tree, Mapping) and isinstance(tree.get(container), Mapping)):
      keys = sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
      raise WeightsFileError(f"{path}: no state_dict under {container!r} (top level: {keys})")
    tree = tree[container]
  elif isinstance(tree, Mapping) and not all(isinstance(v, np.ndarray) for v in tree.values()):
    container = next((k for k in CONTAINER_KEYS if isinstance(tree.get(k), Mapping)), None)
    if container is not None:
      tree = tree[container]
    elif not any(isinstance(v, np.ndarray) for v in tree.values()):
      raise WeightsFileError(
        f"{path}: not a state_dict (top-level keys {sorted(map(str, tree))[:8]}) and none of "
        f"{list(CONTAINER_KEYS)} holds one"
      )
  if not isinstance(tree, Mapping) or not tree:
    raise WeightsFileError(f"{path}: holds no tensors ({type(tree).__name__})")
  tensors = {str(k): v for k, v in tree.items()}
  bad = [f"{k} ({v!r})" for k, v in tensors.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise WeightsFileError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
  if all(k.startswith("module.") for k in tensors):
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
  return tensors, container


def read_tensors(
  path: str | pathlib.Path, container: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """({name: array}, {"format", "container", "metadata"}) of a .safetensors or torch.save file;
  `container` names the entry of a training checkpoint that holds the weights."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--weights={path}: no such file")
  if path.suffix == ".safetensors":
    tensors, metadata = read_safetensors(path)
    return tensors, {"format": "safetensors", "container": None, "metadata": metadata}
  tensors, container = state_dict(read_torch_zip(path), path, container)
  return tensors, {"format": "torch_save_zip", "container": container, "metadata": {}}
