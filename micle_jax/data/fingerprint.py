"""What data a run read: a prepared TFDS dataset's identity and a fingerprint of its content.

TFDS's `dataset_info.json` says which builder, config and version prepared a dataset and how many
examples and bytes each split holds, but not what the examples are: the same builder run on other
manual files (another draw of the synthetic data, a corrected CSV) writes the same names. So the
fingerprint also hashes each data file's size and its first and last 64 KiB, which reads a
fixed amount whatever the dataset's size. Synthetic data carries its generator's stamp
(`SYNTHETIC.json`: layout, arguments including the seed, generator version), found in the build
folder or above it.

`data_dir` is recorded but is not part of the identity: data moved elsewhere is the same data.
"""

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from etils import epath

from micle_jax import specs
from micle_jax.data import finetune_input, input_pipeline

STAMP = "SYNTHETIC.json"
_EDGE = 1 << 16
# Keys of a fingerprint that say where the data is, not what it is.
LOCATION_KEYS = ("data_dir",)


def _content_digest(folder: epath.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(folder.iterdir(), key=lambda p: p.name):
    if path.name in ("dataset_info.json", "features.json") or path.is_dir():
      continue
    size = path.stat().length
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
      digest.update(f.read(_EDGE))
      if size > 2 * _EDGE:
        f.seek(size - _EDGE)
        digest.update(f.read(_EDGE))
  return digest.hexdigest()


def _synthetic_stamp(folder: epath.Path) -> dict[str, Any] | None:
  for parent in (folder, *list(folder.parents)[:3]):
    path = parent / STAMP
    if path.exists():
      return json.loads(path.read_text())
  return None


def fingerprint(builder: Any) -> dict[str, Any]:
  """{"name", "config", "version", "splits" ({split: {"examples", "bytes"}}), "content_sha256",
  "synthetic" (the generator's stamp, or None), "data_dir"} of a prepared TFDS builder."""
  info = builder.info
  folder = epath.Path(builder.data_dir)
  config = getattr(builder, "builder_config", None)
  return {
    "name": info.name,
    "config": config.name if config is not None else None,
    "version": str(info.version),
    "splits": {
      name: {"examples": split.num_examples, "bytes": int(split.num_bytes)}
      for name, split in sorted(info.splits.items())
    },
    "content_sha256": _content_digest(folder),
    "synthetic": _synthetic_stamp(folder),
    "data_dir": str(folder),
  }


def identity(fingerprints: Mapping[str, Any]) -> dict[str, Any]:
  """The fingerprints without their locations: what must match for data to be the same."""
  if isinstance(fingerprints, Mapping):
    return {k: identity(v) for k, v in fingerprints.items() if k not in LOCATION_KEYS}
  return fingerprints


def of_dataset(name: str, data_dir: str | None) -> dict[str, Any]:
  """`fingerprint` of the prepared dataset `name` ("builder/config") in `data_dir`."""
  return fingerprint(input_pipeline.builder(name, data_dir))


def finetune_data(spec: specs.FinetuneSpec) -> dict[str, Any]:
  """{"train": ..., "eval/<key>": ...}: the fingerprints of every dataset a fine-tuning reads."""
  out = {"train": of_dataset(spec.dataset.name, spec.dataset.data_dir)}
  for target in finetune_input.eval_targets(spec):
    out[f"eval/{target.key}"] = of_dataset(target.name, target.data_dir)
  return out
