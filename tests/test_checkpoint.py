"""Orbax weights: relative and gs:// workdirs, lookup errors, and strict merging for init_from."""

import numpy as np
import pytest

from micle_jax import checkpoint


def _tree(**shapes):
  return {name: {"kernel": np.full(shape, 1.0, np.float32)} for name, shape in shapes.items()}


def test_save_and_load_weights_with_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params = {"backbone": _tree(conv=(2, 3))}
  checkpoint.save_weights("weights", params, {"backbone": {"bn": {"mean": np.zeros(3)}}}, step=4)
  loaded, batch_stats, step = checkpoint.load_weights("weights")
  assert step == 4
  np.testing.assert_array_equal(
    loaded["backbone"]["conv"]["kernel"], params["backbone"]["conv"]["kernel"]
  )
  assert batch_stats["backbone"]["bn"]["mean"].shape == (3,)


def test_cloud_workdirs_are_kept_as_uris(tmp_path, monkeypatch):
  # Orbax needs absolute paths, but only local ones may be resolved against the cwd: a gs://
  # workdir must reach Orbax (tensorstore's GCS driver) unchanged.
  monkeypatch.chdir(tmp_path)
  for uri in ("gs://bucket/runs/cxr", "gs://bucket/runs/cxr/"):
    path = checkpoint._absolute(uri)
    assert str(path).rstrip("/") == "gs://bucket/runs/cxr"
    assert str(path / checkpoint.CHECKPOINT_DIR) == "gs://bucket/runs/cxr/checkpoints"
  assert str(checkpoint._absolute("runs/cxr")) == str(tmp_path / "runs/cxr")


def test_missing_checkpoint_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    checkpoint.load_weights(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint found"):
    checkpoint.load_weights(tmp_path)


def test_merge_copies_matching_leaves_and_keeps_the_rest_fresh():
  target = {"backbone": _tree(a=(2,), b=(3,)), "head_supervised": _tree(h=(4, 5))}
  loaded = {
    "backbone": {k: {"kernel": v["kernel"] * 7} for k, v in target["backbone"].items()},
    "head_supervised": _tree(h=(4, 1000)),
    "projection_head": _tree(p=(2,)),
  }
  merged, restored, fresh = checkpoint.merge_pretrained(
    target, loaded, required_prefixes=("backbone",), exact_prefixes=("backbone",)
  )
  assert merged["backbone"]["a"]["kernel"][0] == 7 and sorted(restored) == [
    "backbone/a/kernel",
    "backbone/b/kernel",
  ]
  assert merged["head_supervised"]["h"]["kernel"][0, 0] == 1  # other class count: fresh
  assert "head_supervised/h/kernel" in fresh and "projection_head/p/kernel" in fresh


def test_merge_lists_every_mismatch():
  target = {"backbone": _tree(a=(2,), b=(3,))}
  loaded = {"backbone": {**_tree(a=(5,)), **_tree(extra=(1,))}}
  with pytest.raises(ValueError) as error:
    checkpoint.merge_pretrained(
      target, loaded, required_prefixes=("backbone",), exact_prefixes=("backbone",)
    )
  message = str(error.value)
  assert "3 mismatched parameters" in message
  assert "backbone/a/kernel: expected shape (2,), checkpoint has shape (5,)" in message
  assert "backbone/b/kernel: expected shape (3,), checkpoint has none" in message
  assert "backbone/extra/kernel: in the checkpoint but not in the model" in message
