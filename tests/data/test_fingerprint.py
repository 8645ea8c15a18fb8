"""The fingerprint of a prepared dataset: what it is, whatever folder it is in."""

import json
import shutil

from micle_jax.data import fingerprint


def test_the_same_data_elsewhere_matches_and_other_data_does_not(cxr_data_dir, tmp_path):
  first = fingerprint.of_dataset("chexpert_micle/images", cxr_data_dir)
  assert first == fingerprint.of_dataset("chexpert_micle/images", cxr_data_dir)
  assert (first["name"], first["config"], first["version"]) == ("chexpert_micle", "images", "1.0.0")
  assert first["splits"]["train"]["examples"] > 0 and len(first["content_sha256"]) == 64
  moved = tmp_path / "moved"
  shutil.copytree(cxr_data_dir, moved)
  elsewhere = fingerprint.of_dataset("chexpert_micle/images", str(moved))
  assert elsewhere["data_dir"] != first["data_dir"]
  assert fingerprint.identity(elsewhere) == fingerprint.identity(first)
  # Other examples under the same names and sizes: a byte of a data file changed.
  folder = moved / "chexpert_micle" / "images" / "1.0.0"
  shard = next(p for p in folder.iterdir() if "train.tfrecord" in p.name)
  data = bytearray(shard.read_bytes())
  data[len(data) // 3] ^= 0xFF
  shard.write_bytes(bytes(data))
  changed = fingerprint.of_dataset("chexpert_micle/images", str(moved))
  assert changed["content_sha256"] != first["content_sha256"]
  # A synthetic generator's stamp beside the build is part of the fingerprint.
  (moved / "chexpert_micle" / fingerprint.STAMP).write_text(json.dumps({"seed": 1, "version": 2}))
  stamped = fingerprint.of_dataset("chexpert_micle/images", str(moved))
  assert stamped["synthetic"] == {"seed": 1, "version": 2}
