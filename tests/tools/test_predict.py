"""Batch prediction from a fine-tuning workdir, against a direct `model.apply` on eval views."""

import csv
import json
import logging

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import finetune_derm
from micle_jax import finetune
from micle_jax.data import augment_presets
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint
from micle_jax.tools import predict
from micle_jax.train import train_state

LABELS = ("nevus", "melanoma", "other")
# (relative path, case, (height, width)): mixed formats, sizes, nesting and suffix case.
IMAGES = (
  ("a/1.jpg", "case_a", (40, 48)),
  ("a/2.png", "case_a", (36, 36)),
  ("a/3.JPEG", "case_a", (50, 40)),
  ("b/4.jpg", "case_b", (32, 32)),
  ("b/deep/5.png", "case_b", (64, 48)),
  ("c/6.jpeg", "case_c", (45, 45)),
  ("c/7.png", "case_c", (33, 60)),
  ("c/8.jpg", "case_c", (48, 40)),
  ("d/9.png", "case_d", (40, 40)),
)


def _write_image(path, shape, seed):
  image = tf.random.stateless_uniform((*shape, 3), (seed, 0), maxval=256, dtype=tf.int32)
  image = tf.cast(image, tf.uint8)
  encode = tf.io.encode_png if path.suffix == ".png" else tf.io.encode_jpeg
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(encode(image).numpy())


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _probs(rows):
  return np.asarray([[float(r[predict.PROB_PREFIX + n]) for n in LABELS] for r in rows])


def _random_variables(model, size):
  """Random weights without running the initialisers (slow to compile on CPU): He-scaled
  kernels, and BatchNorm statistics far from (0, 1), so restoring them shows in the outputs."""
  abstract = jax.eval_shape(
    lambda: train_state.init_variables(model, jax.random.PRNGKey(0), (size, size, 3))
  )
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if "kernel" in name:
      return rng.normal(size=shape).astype(np.float32) * np.sqrt(2.0 / np.prod(shape[:-1]))
    if "var" in name:
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if "scale" in name:
      return rng.uniform(0.5, 1.0, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A fine-tuning workdir written without training: config, labels and random weights."""
  config = finetune_derm.get_config("demo")
  path = tmp_path_factory.mktemp("ft")
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  (path / "results.json").write_text(json.dumps({"labels": list(LABELS)}))
  spec = finetune.model_spec(finetune.validate(config), len(LABELS))
  model = resnet.create_model(spec)
  size = config.augment.image_size
  variables = _random_variables(model, size)
  checkpoint.save_weights(path, variables["params"], variables["batch_stats"])
  return path, model, variables, size


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for seed, (rel, _, shape) in enumerate(IMAGES):
    _write_image(root / rel, shape, seed)
  (root / "notes.txt").write_text("not an image")
  with open(root / "list.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image_path", "case_id", "site"])
    writer.writerows((rel, case, "x") for rel, case, _ in IMAGES)
  return root


def test_csv_with_cases_matches_a_direct_apply(workdir, image_dir, tmp_path):
  path, model, variables, size = workdir
  out = tmp_path / "preds.csv"
  preds = predict.run(
    path, image_dir / "list.csv", out, case_column="case_id", batch_size=8
  )  # 9 images: two batches on 8 devices, the last one padded

  rows = _read_csv(out)
  assert [r["image"] for r in rows] == [rel for rel, _, _ in IMAGES]
  assert [r["case_id"] for r in rows] == [case for _, case, _ in IMAGES]
  assert list(rows[0]) == ["image", "case_id", *(f"prob_{n}" for n in LABELS), "predicted"]
  probs = _probs(rows)
  assert np.all((probs >= 0) & (probs <= 1))
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
  assert [r["predicted"] for r in rows] == [LABELS[i] for i in probs.argmax(axis=1)]
  np.testing.assert_allclose(probs, preds.probs, atol=1e-7)

  views = np.stack(
    [
      augment_presets.eval_preprocess(
        tf.constant((image_dir / rel).read_bytes()), size=size, preset="derm"
      )
      for rel, _, _ in IMAGES
    ]
  )
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])(variables, views)
  expected = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(preds.probs, expected, atol=1e-5)
  assert np.ptp(expected, axis=0).max() > 1e-3  # the images are told apart

  cases = _read_csv(tmp_path / "preds_cases.csv")
  assert [c["case_id"] for c in cases] == ["case_a", "case_b", "case_c", "case_d"]
  assert [int(c["num_images"]) for c in cases] == [3, 2, 3, 1]
  case_of = np.asarray([case for _, case, _ in IMAGES])
  for case, case_probs in zip(cases, _probs(cases), strict=True):
    np.testing.assert_allclose(case_probs, probs[case_of == case["case_id"]].mean(0), atol=1e-7)
    assert case["predicted"] == LABELS[int(case_probs.argmax())]


def test_folder_lists_images_recursively_sorted(image_dir):
  root, paths, cases = predict.list_images(image_dir)
  assert root == image_dir
  assert paths == sorted(rel for rel, _, _ in IMAGES)
  assert cases is None
  with pytest.raises(ValueError, match="needs a CSV"):
    predict.list_images(image_dir, case_column="case_id")


def test_csv_paths_must_stay_inside_its_folder(tmp_path):
  for bad in ("../escape.jpg", "/etc/passwd", "a/../../x.png"):
    (tmp_path / "list.csv").write_text(f"image_path\n{bad}\n")
    with pytest.raises(ValueError, match="not inside"):
      predict.list_images(tmp_path / "list.csv")
  (tmp_path / "list.csv").write_text("image_path\nmissing.jpg\n")
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    predict.list_images(tmp_path / "list.csv")
  with pytest.raises(ValueError, match="no column 'case'"):
    predict.list_images(tmp_path / "list.csv", case_column="case")


def test_unreadable_image_fails_naming_it_or_is_skipped(workdir, image_dir, tmp_path):
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  for rel, _, shape in IMAGES[:2]:
    _write_image(tmp_path / rel, shape, 0)
  paths = ["broken.jpg", *(rel for rel, _, _ in IMAGES[:2])]
  predictor = predict.load_predictor(workdir[0])
  with pytest.raises(ValueError, match="broken.jpg"):
    predict.predict_images(predictor, tmp_path, paths)
  preds = predict.predict_images(predictor, tmp_path, paths, skip_unreadable=True)
  assert preds.skipped == ["broken.jpg"]
  assert preds.images == paths[1:] and preds.probs.shape == (2, len(LABELS))


def test_skip_unreadable_drops_a_truncated_jpeg_and_a_non_image_logging_each(
  workdir, tmp_path, caplog
):
  folder = tmp_path / "images"
  for rel, _, shape in IMAGES[:2]:
    _write_image(folder / rel, shape, 0)
  _write_image(folder / "whole.jpg", (40, 40), 1)
  jpeg = (folder / "whole.jpg").read_bytes()
  (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # a copy that stopped halfway
  (folder / "notes.png").write_text("not an image at all\n")
  (folder / "readme.txt").write_text("never listed: not an image extension\n")
  with pytest.raises(ValueError, match="notes.png: cannot decode the image"):
    predict.run(workdir[0], folder, tmp_path / "preds.csv")
  caplog.set_level(logging.WARNING)
  preds = predict.run(workdir[0], folder, tmp_path / "preds.csv", skip_unreadable=True)
  assert sorted(preds.skipped) == ["notes.png", "truncated.jpg"]
  assert sorted(preds.images) == sorted([IMAGES[0][0], IMAGES[1][0], "whole.jpg"])
  with open(tmp_path / "preds.csv", newline="") as f:
    assert sorted(row["image"] for row in csv.DictReader(f)) == sorted(preds.images)
  messages = [r.getMessage() for r in caplog.records]
  for name in ("notes.png", "truncated.jpg"):
    assert sum(m.startswith("Skipped ") and name in m for m in messages) == 1, name
  assert any(m.startswith("Skipped 2 of 5 files") for m in messages)


def test_missing_workdir_files_are_named(workdir, tmp_path):
  source = workdir[0]
  with pytest.raises(FileNotFoundError, match="config.json"):
    predict.load_predictor(tmp_path)
  (tmp_path / "config.json").write_text((source / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="results.json"):
    predict.load_predictor(tmp_path)
  (tmp_path / "results.json").write_text((source / "results.json").read_text())
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    predict.load_predictor(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint"):
    predict.load_predictor(tmp_path)


def test_multilabel_outputs_have_no_predicted_column(tmp_path):
  preds = predict.Predictions(
    labels=LABELS,
    task="multilabel",
    images=["x.png", "y.png", "z.png"],
    case_ids=["p1", "p2", "p1"],
    probs=np.asarray([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]], np.float32),
    skipped=[],
  )
  written = predict.write_predictions(preds, tmp_path / "out" / "cxr.csv")
  assert written == [tmp_path / "out" / "cxr.csv", tmp_path / "out" / "cxr_cases.csv"]
  rows = _read_csv(written[0])
  assert list(rows[0]) == ["image", "case_id", *(f"prob_{n}" for n in LABELS)]
  np.testing.assert_allclose(_probs(rows), preds.probs, atol=1e-7)
  cases = _read_csv(written[1])
  assert list(cases[0]) == ["case_id", "num_images", *(f"prob_{n}" for n in LABELS)]
  np.testing.assert_allclose(_probs(cases), [[0.7, 0.7, 0.4], [0.2, 0.3, 0.4]], atol=1e-7)
