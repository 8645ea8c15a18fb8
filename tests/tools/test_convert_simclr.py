"""convert_simclr: TF1/TF2 SimCLR checkpoints -> our Orbax weights, checked against a TF forward pass.

The TensorFlow reference (simclr_tf_reference.py) follows SimCLR's structure, names and ops; it
is tiny (width 0.125, 64 px) so that the whole file stays fast on CPU.
"""

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import simclr_tf_reference as ref

from micle_jax import specs
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, sharding
from micle_jax.tools import convert_simclr as cs
from micle_jax.train import optim, steps, train_state

SIZE = 64
R50 = dict(depth=50, width=0.125)
SK = 0.0625


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  return np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
  """ResNet-50 without SK, as a TF1 training checkpoint (slots, step, EMA copy), converted."""
  model = ref.Model(**R50, seed=0)
  tmp = tmp_path_factory.mktemp("r50")
  tensors = ref.with_training_state(ref.tf1_tensors(model), ema_scale=0.5)
  prefix = ref.save_tf1(tensors, str(tmp / "tf1" / "model.ckpt-250228"))
  report = cs.convert(prefix, str(tmp / "out"))
  return model, prefix, tmp / "out", report


@pytest.fixture(scope="module")
def r50_sk(tmp_path_factory):
  """ResNet-50 with SK, as a SavedModel export (variables aliased as trainable_variables_list)."""
  model = ref.Model(**R50, sk_ratio=SK, seed=1)
  tmp = tmp_path_factory.mktemp("r50_sk")
  saved_model = ref.save_saved_model(model, str(tmp / "saved_model"))
  report = cs.convert(saved_model, str(tmp / "out"))
  return model, tmp, tmp / "out", report


def _apply(out, report, images):
  params, batch_stats, _ = checkpoint.load_weights(out)
  model = resnet.create_model(cs.Architecture(**_arch_fields(report)).spec())
  apply = jax.jit(functools.partial(model.apply, train=False))
  return apply({"params": params, "batch_stats": batch_stats}, images)


def _arch_fields(report):
  keys = ("depth", "width", "sk_ratio", "num_proj_layers", "proj_out_dim", "num_classes")
  return {k: report[k] for k in keys}


def _assert_outputs_match(outputs, reference):
  for key in ("features", "projection", "logits"):
    np.testing.assert_allclose(outputs[key], reference[key], rtol=1e-4, atol=1e-4, err_msg=key)


def _assert_same_weights(out_a, out_b, scale=1.0):
  a, b = checkpoint.load_weights(out_a)[:2], checkpoint.load_weights(out_b)[:2]
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
    np.testing.assert_array_equal(x, np.float32(scale) * y, err_msg=jax.tree_util.keystr(path))


def test_tf1_checkpoint_matches_tf_forward(r50, images):
  model, prefix, out, report = r50
  assert json.loads((out / "conversion.json").read_text()) == report
  assert report["format"] == "tf1_checkpoint"
  assert report["model"] == {
    "depth": 50,
    "width": 0.125,
    "sk_ratio": 0.0,
    "stem": "imagenet",
    "num_proj_layers": 3,
    "proj_out_dim": 16,
  }
  assert report["num_classes"] == 5
  model_tensors = len(ref.tf1_tensors(model))
  assert report["tensors"]["used"] == model_tensors
  assert report["tensors"]["skipped_by_rule"] == {
    "optimizer slot": 169,  # one /Momentum per trainable tensor
    "other weight copy (see --variables)": model_tensors,  # ema_model/...
    "training step counter": 1,
  }
  assert report["tensors"]["total"] == model_tensors + 169 + model_tensors + 1
  _assert_outputs_match(_apply(out, report, images), model(images))


def test_tf1_ema_copy_is_selected_explicitly(r50, tmp_path):
  _, prefix, out, _ = r50
  report = cs.convert(prefix, str(tmp_path / "ema"), variables="ema_model")
  assert report["variables"] == "ema_model"
  assert (
    report["tensors"]["skipped_by_rule"]["other weight copy (see --variables)"]
    == (report["tensors"]["used"])
  )
  _assert_same_weights(tmp_path / "ema", out, scale=0.5)


def test_flags_are_checked_against_the_tensors(r50, tmp_path):
  _, prefix, _, _ = r50
  for flag, message in (
    (dict(depth=101), "--depth=101, but the checkpoint holds a ResNet-50"),
    (dict(width=1.0), "--width=1.0, but the checkpoint has width 0.125"),
    (dict(sk_ratio=SK), "--sk_ratio=0.0625, but the checkpoint's ResNet-50 has no selective"),
  ):
    with pytest.raises(cs.ConversionError, match=message):
      cs.convert(prefix, str(tmp_path / "bad"), **flag)
  assert not (tmp_path / "bad").exists()
  report = cs.convert(prefix, str(tmp_path / "ok"), depth=50, width=0.125, sk_ratio=0.0)
  assert report["depth"] == 50


def test_every_mismatch_is_listed_and_nothing_written(tmp_path):
  tensors = ref.tf1_tensors(ref.Model(**R50, seed=3))
  del tensors["base_model/batch_normalization_3/moving_variance"]
  del tensors["base_model/conv2d_7/kernel"]
  tensors["base_model/conv2d_2/bias"] = np.zeros(8, np.float32)
  tensors["base_model/se_layer/kernel"] = np.zeros(8, np.float32)
  kernel = tensors["base_model/conv2d_5/kernel"]
  tensors["base_model/conv2d_5/kernel"] = np.zeros(
    (*kernel.shape[:3], kernel.shape[3] + 1), np.float32
  )
  prefix = ref.save_tf1(tensors, str(tmp_path / "model.ckpt-1"))
  with pytest.raises(cs.ConversionError) as error:
    cs.convert(prefix, str(tmp_path / "out"))
  message = str(error.value)
  assert "5 problems" in message, message
  for line in (
    "missing: base_model/batch_normalization_3/moving_variance (for batch_stats/backbone/"
    "block_group_0_block_0/bn_1/var [8])",
    "missing: base_model/conv2d_7/kernel (for params/backbone/block_group_0_block_1/conv_2/",
    "extra: base_model/conv2d_2/bias [8] has no place in the model",
    "extra: base_model/se_layer/kernel [8] matches no SimCLR layer name",
    "wrong shape: base_model/conv2d_5/kernel [1, 1, 32, 9] -> params/backbone/"
    "block_group_0_block_1/conv_0/kernel expects [1, 1, 32, 8]",
  ):
    assert line in message, message
  assert not (tmp_path / "out").exists()


def test_saved_model_with_selective_kernels_matches_tf_forward(r50_sk, images):
  """SK models match, ResNet-D avg-pool shortcut included (SAME pooling averages valid inputs)."""
  model, _, out, report = r50_sk
  assert report["format"] == "tf2_saved_model"
  assert report["model"]["sk_ratio"] == SK
  assert report["tensors"]["skipped_by_rule"] == {"checkpoint metadata": 1}
  _assert_outputs_match(_apply(out, report, images), model(images))


def test_tf2_checkpoint_and_tf1_names_give_the_same_weights(r50_sk):
  model, tmp, out, _ = r50_sk
  ref.save_tf2(model, str(tmp / "tf2"))
  report = cs.convert(str(tmp / "tf2"), str(tmp / "out_tf2"), sk_ratio=SK)
  assert report["format"] == "tf2_checkpoint"
  assert report["tensors"]["skipped_by_rule"] == {
    "checkpoint metadata": 1,
    "optimizer slot": 239,
    "outside the model (optimizer state, counters)": 2,  # global_step, save_counter
  }
  _assert_same_weights(tmp / "out_tf2", out)
  prefix = ref.save_tf1(ref.tf1_tensors(model), str(tmp / "tf1" / "model.ckpt-1"))
  assert cs.convert(prefix, str(tmp / "out_tf1"))["format"] == "tf1_checkpoint"
  _assert_same_weights(tmp / "out_tf1", out)


def test_basic_blocks_convert_load_and_train(tmp_path):
  # 96 px keeps the last feature map at 3×3, not 2×2 (slow conv gradients on CPU).
  images = np.random.default_rng(1).uniform(size=(2, 96, 96, 3)).astype(np.float32)
  model = ref.Model(depth=18, width=0.125, num_proj_layers=2, proj_out_dim=8, num_classes=3)
  ref.save_tf2(model, str(tmp_path / "tf2"))
  report = cs.convert(str(tmp_path / "tf2"), str(tmp_path / "out"))
  assert report["model"]["depth"] == 18 and report["num_classes"] == 3
  _assert_outputs_match(_apply(tmp_path / "out", report, images), model(images))

  # What `init_from` does: the loaded trees take the place of a fresh init's (same structure).
  params, batch_stats, _ = checkpoint.load_weights(tmp_path / "out")
  flax_model = resnet.create_model(cs.Architecture(**_arch_fields(report)).spec())
  fresh = jax.eval_shape(
    lambda: train_state.init_variables(flax_model, jax.random.PRNGKey(0), images.shape[1:])
  )
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)  # noqa: E731
  assert shapes({"params": params, "batch_stats": batch_stats}) == shapes(dict(fresh))
  tx = optim.create_optimizer(specs.OptimizerSpec(name="lars"), learning_rate=0.1)
  state = train_state.TrainState(
    step=np.zeros((), np.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    apply_fn=flax_model.apply,
    tx=tx,
  )
  mesh = sharding.create_mesh(jax.devices()[:1])
  step = steps.compile_pretrain_step(mesh, temperature=0.1, label_loss="multiclass")
  batch = {"view1": images, "view2": images[:, ::-1], "label": np.array([0, 2], np.int32)}
  new_state, metrics = step(state, sharding.make_global_batch(batch, mesh))
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), new_state.params, params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_command_line_and_a_model_without_projection_head(tmp_path):
  """SimCLRv1's published weights have no projection head: num_proj_layers=0."""
  model = ref.Model(depth=18, width=0.125, num_proj_layers=0, seed=4)
  tensors = ref.with_training_state(ref.tf1_tensors(model))
  prefix = ref.save_tf1(tensors, str(tmp_path / "ckpt" / "model.ckpt-7"))
  command = [sys.executable, "-m", "micle_jax.convert_simclr", f"--checkpoint={prefix}"]
  result = subprocess.run(
    [*command, f"--out={tmp_path / 'out'}", "--depth=18"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed["model"]["depth"] == 18 and printed["model"]["num_proj_layers"] == 0
  report = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert report["tensors"]["skipped_by_rule"]["training step counter"] == 1
  params, _, step = checkpoint.load_weights(tmp_path / "out")
  assert step == 0 and sorted(params) == ["backbone", "head_supervised"]
