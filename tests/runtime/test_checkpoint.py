"""Orbax weights: relative and gs:// workdirs, lookup errors, and strict merging for init_from."""

import numpy as np
import pytest

from micle_jax.runtime import checkpoint, restore_rules


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
    path = checkpoint.absolute(uri)
    assert str(path).rstrip("/") == "gs://bucket/runs/cxr"
    assert str(path / checkpoint.CHECKPOINT_DIR) == "gs://bucket/runs/cxr/checkpoints"
  assert str(checkpoint.absolute("runs/cxr")) == str(tmp_path / "runs/cxr")


def test_missing_checkpoint_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    checkpoint.load_weights(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint found"):
    checkpoint.load_weights(tmp_path)


def test_restore_takes_only_what_the_rule_allows():
  target = {
    "backbone": _tree(a=(2,), b=(3,)),
    "projection_head": {**_tree(dense_0=(2, 2)), **_tree(dense_1=(2, 2))},
    "head_supervised": _tree(h=(4, 5)),
  }
  # The checkpoint's supervised head has the target's very shape: it is still not restored.
  loaded = jax_tree_map(lambda x: x * 7, target)
  merged, report = restore_rules.restore_allowed(
    target, loaded, restore_rules.finetune_rule(1), source="test"
  )
  assert merged["backbone"]["a"]["kernel"][0] == 7
  assert merged["projection_head"]["dense_0"]["kernel"][0, 0] == 7
  assert merged["projection_head"]["dense_1"]["kernel"][0, 0] == 1  # not kept: fresh
  assert merged["head_supervised"]["h"]["kernel"][0, 0] == 1  # labelled: always fresh
  assert sorted(report.restored) == [
    "backbone/a/kernel",
    "backbone/b/kernel",
    "projection_head/dense_0/kernel",
  ]
  assert "head_supervised/h/kernel" in report.fresh and "head_supervised/h/kernel" in report.unused


def test_rule_prefixes_match_whole_path_components():
  rule = restore_rules.RestoreRule(restore=("projection_head/dense_1",))
  assert rule.allows("projection_head/dense_1/kernel")
  assert not rule.allows("projection_head/dense_10/kernel")
  assert restore_rules.WHOLE_MODEL.allows("head_supervised/kernel")
  pretrain = restore_rules.pretrain_init_rule(init_projection_head=True)
  assert pretrain.allows("projection_head/bn_2/scale") and not pretrain.allows("head_supervised/b")
  assert not restore_rules.pretrain_init_rule(False).allows("projection_head/dense_0/kernel")


def test_restore_lists_every_mismatch():
  target = {"backbone": _tree(a=(2,), b=(3,))}
  loaded = {"backbone": {**_tree(a=(5,)), **_tree(extra=(1,))}}
  with pytest.raises(ValueError) as error:
    restore_rules.restore_allowed(
      target, loaded, restore_rules.finetune_rule(0), source="init_from=x"
    )
  message = str(error.value)
  assert message.startswith("init_from=x:") and "3 mismatched parameters" in message
  assert "backbone/a/kernel: expected shape (2,), checkpoint has shape (5,)" in message
  assert "backbone/b/kernel: expected shape (3,), checkpoint has none" in message
  assert "backbone/extra/kernel: in the checkpoint but not in the model" in message


def test_a_requested_projection_head_must_match():
  target = {"backbone": _tree(a=(2,)), "projection_head": _tree(dense_0=(2, 4))}
  loaded = {"backbone": _tree(a=(2,)), "projection_head": _tree(dense_0=(2, 8))}
  with pytest.raises(ValueError, match="projection_head/dense_0/kernel: expected shape"):
    restore_rules.restore_allowed(
      target, loaded, restore_rules.pretrain_init_rule(True), source="x"
    )
  merged, report = restore_rules.restore_allowed(
    target, loaded, restore_rules.pretrain_init_rule(False), source="x"
  )
  assert report.restored == ["backbone/a/kernel"]
  assert merged["projection_head"]["dense_0"]["kernel"].shape == (2, 4)


def jax_tree_map(fn, tree):
  return {k: jax_tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def test_a_state_checkpoint_with_the_former_rng_restores_without_it(tmp_path):
  """Workdirs written while the training state still carried an (unused) rng resume."""
  tree = {
    "step": np.asarray(4, np.int32),
    "params": {"w": np.arange(3, dtype=np.float32)},
    "batch_stats": {"mean": np.ones(2, np.float32)},
    "opt_state": {"trace": np.full(3, 0.5, np.float32)},
  }
  mngr = checkpoint.manager(tmp_path, max_to_keep=2, async_save=False)
  checkpoint.save(mngr, 4, {**tree, "rng": np.zeros(2, np.uint32)}, force=True)
  mngr.wait_until_finished()
  step, restored = checkpoint.restore_newest_readable(mngr, tree)
  assert step == 4 and set(restored) == set(tree)
  for key in ("params", "batch_stats", "opt_state"):
    for name, value in tree[key].items():
      np.testing.assert_array_equal(restored[key][name], value)
  # A newer checkpoint that lacks an array of the state is still refused and set aside.
  checkpoint.save(mngr, 6, {k: v for k, v in tree.items() if k != "opt_state"}, force=True)
  mngr.wait_until_finished()
  step, _ = checkpoint.restore_newest_readable(mngr, tree)
  assert step == 4 and (tmp_path / "checkpoints" / "6.damaged").exists()


def test_reading_weights_does_not_warn_that_it_will_not_save(tmp_path, caplog):
  """Orbax warns that a read-only manager will not save; that is what was asked for."""
  checkpoint.save_weights(tmp_path, {"w": np.zeros(2)}, {}, step=1)
  with caplog.at_level("WARNING"):
    params, _, step = checkpoint.load_weights(tmp_path)
  assert step == 1 and params["w"].shape == (2,)
  assert not [r for r in caplog.records if "read only" in r.getMessage()]
