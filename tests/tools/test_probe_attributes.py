"""The attribute probe: a pretraining workdir's frozen features against per-image truths."""

import pathlib

import jax
import numpy as np
import optax
import pytest
from tiny_models import tiny_spec

from configs import cxr
from data_builders.synthetic import chexpert_layout
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, run_files, sharding
from micle_jax.tools import probe_attributes
from micle_jax.train import train_state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cxr_data_dir):
  """A pretraining workdir as `main` leaves one: config.json (a tiny CXR demo) and weights."""
  config = cxr.get_config("demo,method=simclr")
  with config.unlocked():
    config.dataset.data_dir = cxr_data_dir
    config.model.update(depth=18, width=0.25, stem="cifar", num_proj_layers=2, proj_out_dim=16)
    config.augment.image_size = 32
    config.probe.update(max_images=40, k=5, batch_size=16)
  path = tmp_path_factory.mktemp("pretrained")
  run_files.write_config(path, config)
  spec = tiny_spec(num_proj_layers=2, proj_out_dim=16)
  state = train_state.create_train_state(
    resnet.create_model(spec), optax.sgd(0.1), seed=3, image_shape=(32, 32, 3),
    mesh=sharding.create_mesh(),
  )  # fmt: skip
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  checkpoint.save_weights(path, params, batch_stats, step=7)  # into path/checkpoints/
  return path


def _truth(cxr_data_dir) -> pathlib.Path:
  return pathlib.Path(cxr_data_dir).parent / "manual" / chexpert_layout.TRUTH_FILE


def test_a_workdir_is_probed_for_each_attribute(workdir, cxr_data_dir):
  attributes = probe_attributes.read_attributes(_truth(cxr_data_dir), "Path")
  assert list(attributes) == list(chexpert_layout.TRUTH_HEADER[1:])
  report = probe_attributes.probe_workdir(workdir, attributes)
  assert (report["step"], report["images"], report["k"]) == (7, 40, 5)
  assert set(report["r2"]) == set(attributes)
  assert all(np.isfinite(v) and v <= 1.0 for v in report["r2"].values())
  assert {"mean_auc", "auc/Cardiomegaly"} <= set(report["probe"])
  # The probe set is the config's: frontal images only, so every image has a ratio.
  spec, weights = probe_attributes.load(workdir)
  assert spec.probe.views == "frontal" and weights.step == 7
  ratios = attributes["cardiothoracic_ratio"]
  assert sum(np.isfinite(v) for v in ratios.values()) < len(ratios)  # the laterals' are blank
  table = probe_attributes.format_table([report, report]).splitlines()
  assert len(table) == 3 and "r2/cardiothoracic_ratio" in table[0]
  smaller = probe_attributes.probe_workdir(workdir, attributes, max_images=20)
  assert smaller["images"] == 20


def test_a_probe_image_missing_from_the_attributes_is_named(workdir, cxr_data_dir):
  attributes = probe_attributes.read_attributes(_truth(cxr_data_dir), "Path", ["gamma"])
  first = sorted(attributes["gamma"])[0]
  del attributes["gamma"][first]
  with pytest.raises(ValueError, match=r"truth.csv: column 'gamma' has no row for 1 image"):
    probe_attributes.probe_workdir(workdir, attributes, source="truth.csv")


@pytest.mark.parametrize(
  "text, columns, message",
  [
    ("image,x\na.jpg,1\n", (), r"truth.csv: no column 'Path'"),
    ("Path,x\na.jpg,1\n", ("y",), r"no column\(s\) \['y'\]"),
    ("Path,x\na.jpg,1\nb.jpg,big\n", (), r"truth.csv, row 3: column 'x' holds 'big', not a number"),
    (
      "Path,x\na/b.jpg,1\n./a/b.jpg,2\n",
      (),
      r"truth.csv, row 3: 'a/b.jpg' again \(first in row 2\)",
    ),
  ],
)
def test_bad_attribute_files_are_named(tmp_path, text, columns, message):
  (tmp_path / "truth.csv").write_text(text)
  with pytest.raises(ValueError, match=message):
    probe_attributes.read_attributes(tmp_path / "truth.csv", "Path", columns)


def test_blank_cells_are_unknown(tmp_path):
  (tmp_path / "truth.csv").write_text("Path,x,y\na.jpg,,2\nb.jpg,1.5,3\n")
  values = probe_attributes.read_attributes(tmp_path / "truth.csv", "Path")
  assert np.isnan(values["x"]["a.jpg"]) and values["x"]["b.jpg"] == 1.5
  assert values["y"] == {"a.jpg": 2.0, "b.jpg": 3.0}
