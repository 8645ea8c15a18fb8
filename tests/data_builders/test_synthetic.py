"""Tests of the synthetic generators: real layouts, documented counts, identical bytes per seed."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders import build, common, synthetic
from data_builders.synthetic import __main__ as synthetic_main
from data_builders.synthetic import (
  chexpert_layout,
  demo,
  derm,
  drawing,
  findings,
  ham10000_layout,
  nih_layout,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _digests(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _csv(path: pathlib.Path) -> list[list[str]]:
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_chexpert_builds_with_real_builder_and_counts_match(tmp_path):
  counts = synthetic.write_chexpert(tmp_path / "manual", num_patients=12, seed=3, image_size=48)
  assert (counts.train_patients, counts.valid_patients) == (12, 1)
  for name in ("images", "patients", "studies"):
    (builder,) = build.build(
      f"chexpert_micle/{name}", manual_dir=str(tmp_path / "manual"), data_dir=str(tmp_path / "tfds")
    )
    splits = {s: i.num_examples for s, i in builder.info.splits.items()}
    expected = {
      "images": (counts.train_images, counts.valid_images),
      "patients": (counts.train_patients, counts.valid_patients),
      "studies": (counts.train_studies, counts.valid_studies),
    }[name]
    assert (splits["train"], splits["validation"]) == expected
  rows = _csv(tmp_path / "manual" / chexpert_layout.ROOT / "train.csv")
  assert rows[0] == chexpert_layout.HEADER
  cells = {c for row in rows[1:] for c in row[5:]}
  assert cells == {"", "0.0", "1.0", "-1.0"}
  valid = _csv(tmp_path / "manual" / chexpert_layout.ROOT / "valid.csv")
  assert {c for row in valid[1:] for c in row[5:]} <= {"0.0", "1.0"}
  heights = {
    tf.io.decode_jpeg((tmp_path / "manual" / r[0]).read_bytes()).shape[0] for r in rows[1:]
  }
  assert len(heights) > 3 and min(heights) >= 48 - 14


def test_default_chexpert_counts_are_documented():
  structure = chexpert_layout._structure(300, (0.45, 0.35, 0.2))
  assert (sum(map(len, structure)), sum(len(v) for s in structure for v in s)) == (516, 609)


def test_chexpert_multi_image_studies_have_the_real_shares():
  """The real train.csv: a lateral in 16.7% of studies, two or more images in 18.1%."""
  studies = [v for s in chexpert_layout._structure(40_000, (0.45, 0.35, 0.2)) for v in s]
  assert all(v[0] == "frontal" and v.count("lateral") <= 1 for v in studies)
  assert abs(np.mean(["lateral" in v for v in studies]) - 0.167) < 0.005
  assert abs(np.mean([len(v) >= 2 for v in studies]) - 0.181) < 0.005
  assert np.mean([v.count("frontal") == 2 for v in studies]) > 0.012


def test_chexpert_truth_records_each_image(tmp_path):
  """truth.csv: one row per written image; a frontal's cardiothoracic ratio is what was drawn
  (above 0.5 with a certain Cardiomegaly, below without), the same for a study's frontals."""
  counts = synthetic.write_chexpert(tmp_path, num_patients=60, seed=1, image_size=24)
  truth = _csv(tmp_path / chexpert_layout.TRUTH_FILE)
  assert tuple(truth[0]) == chexpert_layout.TRUTH_HEADER
  train = _csv(tmp_path / chexpert_layout.ROOT / "train.csv")
  valid = _csv(tmp_path / chexpert_layout.ROOT / "valid.csv")
  labels = {r[0]: r for r in train[1:] + valid[1:]}
  assert [r[0] for r in truth[1:]] == list(labels)
  assert len(truth) - 1 == counts.train_images + counts.valid_images
  column = train[0].index("Cardiomegaly")
  by_study: dict[str, set[str]] = {}
  for path, ratio, *acquisition in truth[1:]:
    assert (ratio == "") == path.endswith("_lateral.jpg")
    assert all(0.0 < float(v) < 2.0 for v in acquisition)
    if ratio:
      by_study.setdefault(path.rsplit("/", 1)[0], set()).add(ratio)
      cell = labels[path][column]
      assert (float(ratio) > 0.5) if cell == "1.0" else (cell == "-1.0" or float(ratio) < 0.5)
  assert all(len(ratios) == 1 for ratios in by_study.values())


@pytest.mark.parametrize(
  "write, kwargs",
  [
    (synthetic.write_chexpert, {"num_patients": 6}),
    (synthetic.write_ham10000, {"num_lesions": 8}),
    (synthetic.write_nih, {"num_patients": 6, "images_per_folder": 5}),
  ],
  ids=["chexpert", "ham10000", "nih"],
)
def test_same_seed_same_bytes(tmp_path, write, kwargs):
  write(tmp_path / "a", seed=5, image_size=40, **kwargs)
  write(tmp_path / "b", seed=5, image_size=40, **kwargs)
  write(tmp_path / "c", seed=6, image_size=40, **kwargs)
  assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
  assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_ham10000_layout(tmp_path):
  counts = synthetic.write_ham10000(tmp_path, num_lesions=30, seed=0, image_size=40)
  rows = _csv(tmp_path / "HAM10000_metadata.csv")
  assert rows[0] == ham10000_layout.HEADER and len(rows) - 1 == counts.images
  per_lesion = {}
  for lesion_id, image_id, dx, *_ in rows[1:]:
    per_lesion.setdefault(lesion_id, set()).add(dx)
    matches = list(tmp_path.glob(f"HAM10000_images_part_[12]/{image_id}.jpg"))
    assert len(matches) == 1
  assert len(per_lesion) == counts.lesions == 30
  assert all(len(dxs) == 1 for dxs in per_lesion.values())
  sizes = {sum(1 for r in rows[1:] if r[0] == lesion) for lesion in per_lesion}
  assert max(sizes) <= 6 and min(sizes) == 1
  image = tf.io.decode_jpeg(matches[0].read_bytes())
  assert image.shape == (40, 53, 3)


def test_ham10000_texture_turns_with_the_lesion():
  """No identity shortcut: the texture is a function of the lesion plane, so a photo turned by
  90° shows the texture turned by 90° (the same plane sampled at the same points), not the
  same pixels."""
  lesion = derm.sample_lesion("bkl", np.random.default_rng(3))
  y, x = drawing.grid(32, 32)
  upright = derm.texture(lesion, y, x)
  turned = derm.texture(lesion, x, -y)  # the coordinates of a photo turned by 90°
  assert np.abs(upright - np.rot90(upright)).mean() > 0.05  # not symmetric: the test can fail
  assert min(np.abs(turned - np.rot90(upright, k=k)).max() for k in (1, -1)) < 1e-5
  other = derm.texture(dataclasses.replace(lesion, seed=lesion.seed + 1), y, x)
  assert np.abs(other - upright).mean() > 0.05  # each lesion its own


@pytest.mark.parametrize("legacy", [False, True])
def test_nih_layout(tmp_path, legacy):
  counts = synthetic.write_nih(
    tmp_path, num_patients=10, seed=0, image_size=32, images_per_folder=8, legacy_csv=legacy
  )
  name = "Data_Entry_2017.csv" if legacy else "Data_Entry_2017_v2020.csv"
  raw = (tmp_path / name).read_bytes()
  assert (b"\r\n" in raw) == legacy
  rows = list(common.read_csv(tmp_path / name, nih_layout.HEADER.split(",")))
  assert len(rows) == counts.images
  listed = [t for _, t in common.read_lines(tmp_path / "train_val_list.txt")]
  test = [t for _, t in common.read_lines(tmp_path / "test_list.txt")]
  assert (
    sorted(listed + test) == sorted(r["Image Index"] for r in rows)
    and len(test) == counts.test_images
  )
  patients = lambda names: {n.split("_")[0] for n in names}  # noqa: E731
  assert not patients(listed) & patients(test)
  pngs = sorted(tmp_path.glob("images_*/images/*.png"))
  assert len(pngs) == counts.images and len({p.parent.parent for p in pngs}) > 1
  assert tf.io.decode_png(pngs[0].read_bytes()).shape == (32, 32, 1)


def test_unknown_or_missing_builder_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown builder 'nope'"):
    build.build("nope", manual_dir=str(tmp_path), data_dir=str(tmp_path))
  build.BUILDERS["ghost"] = "data_builders.ghost_package"
  try:
    with pytest.raises(ValueError, match="data_builders.ghost_package, which does not exist"):
      build.build("ghost", manual_dir=str(tmp_path), data_dir=str(tmp_path))
  finally:
    del build.BUILDERS["ghost"]


def test_synthetic_command_writer(tmp_path):
  counts = synthetic_main.write("chexpert", str(tmp_path), seed=1, num_cases=4, image_size=40)
  assert counts.train_patients == 4 and (tmp_path / chexpert_layout.ROOT / "valid.csv").exists()
  assert (
    synthetic_main.write("ham10000", str(tmp_path / "h"), num_cases=2, image_size=32).lesions == 2
  )
  with pytest.raises(ValueError, match="'mri'"):
    synthetic_main.write("mri", str(tmp_path))


@pytest.mark.slow
def test_build_command_line(tmp_path):
  synthetic.write_chexpert(tmp_path / "m", num_patients=4, seed=1, image_size=40)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  command = [sys.executable, "-m", "data_builders.build", "chexpert_micle/patients"]
  command += [f"--manual_dir={tmp_path}/m", f"--data_dir={tmp_path}/tfds"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "chexpert_micle/patients/1.0.0: {'train': 4, 'validation': 1}" in result.stdout


def test_build_run_prints_bad_input_as_one_line(tmp_path, capsys):
  synthetic.write_chexpert(tmp_path / "m", num_patients=3, seed=0, image_size=40)
  csv_path = tmp_path / "m" / "CheXpert-v1.0-small" / "train.csv"
  csv_path.write_text("Path,Sex\n")
  code = build.run(
    "chexpert_micle/images", manual_dir=str(tmp_path / "m"), data_dir=str(tmp_path / "t")
  )
  assert code == 1
  last_line = capsys.readouterr().err.splitlines()[-1]  # After TFDS's progress bars.
  assert last_line.startswith(f"error: {csv_path}, line 1: missing required column(s)")


def test_findings_model_persistence_carry_over_and_prevalence():
  rng = np.random.default_rng(0)
  num_patients, num_studies = 20_000, 3
  chronic = [findings.sample_patient(rng) for _ in range(num_patients)]
  studies = []
  for has in chronic:
    shown, series = None, []
    for _ in range(num_studies):
      shown = findings.sample_study(rng, has, shown)
      series.append(shown)
    studies.append(series)
  for name, prevalence in findings.CHRONIC.items():
    has = np.array([name in c for c in chronic])
    shown = np.array([[s[name] for s in series] for series in studies])
    assert abs(has.mean() - prevalence) < 0.015, name
    assert abs(shown[has].mean() - findings.PERSISTENCE) < 0.01, name
    assert not shown[~has].any(), name  # never shown by a patient who does not have it
    assert abs(shown.mean() - findings.study_prevalence(name)) < 0.015, name
  for name, prevalence in findings.ACUTE.items():
    shown = np.array([[s[name] for s in series] for series in studies])
    for k in range(num_studies):  # the same prevalence at every study (the chain is stationary)
      assert abs(shown[:, k].mean() - prevalence) < 0.015, (name, k)
    after_positive = shown[:, 1:][shown[:, :-1]]
    expected = findings.CARRY_OVER + (1 - findings.CARRY_OVER) * prevalence
    assert abs(after_positive.mean() - expected) < 0.03, name


def _nih_follow_up_series(folder: pathlib.Path) -> dict[str, list[set[str]]]:
  rows = common.read_csv(folder / "Data_Entry_2017_v2020.csv", nih_layout.HEADER.split(","))
  series: dict[str, list[tuple[int, set[str]]]] = {}
  for row in rows:
    labels = set(row["Finding Labels"].split("|"))
    series.setdefault(row["Patient ID"], []).append((int(row["Follow-up #"]), labels))
  return {p: [labels for _, labels in sorted(s)] for p, s in series.items()}


def _rate_after_positive(series: dict[str, list[set[str]]], names) -> float:
  after = [
    name in later
    for studies in series.values()
    for earlier, later in zip(studies[:-1], studies[1:], strict=True)
    for name in names
    if name in earlier
  ]
  return float(np.mean(after))


def test_nih_writer_follows_the_findings_model(tmp_path):
  counts = synthetic.write_nih(tmp_path, num_patients=400, seed=0, image_size=16, test_fraction=0.5)
  series = _nih_follow_up_series(tmp_path)
  assert len(series) == counts.patients == 400
  test_patients = {n.split("_")[0] for _, n in common.read_lines(tmp_path / "test_list.txt")}
  assert 0.42 < len(test_patients) / 400 < 0.58
  # A chronic finding seen at one follow-up is seen at the next 90% of the time; an acute one
  # 0.5 + 0.5 × 0.2 = 60% of the time (findings.py).
  assert _rate_after_positive(series, ("Cardiomegaly", "Effusion")) > 0.8
  assert 0.45 < _rate_after_positive(series, ("Atelectasis", "Consolidation", "Edema")) < 0.75
  images = [labels for studies in series.values() for labels in studies]
  for nih_name, name in [("Cardiomegaly", "Cardiomegaly"), ("Effusion", "Pleural Effusion")]:
    rate = np.mean([nih_name in labels for labels in images])
    assert abs(rate - findings.study_prevalence(name)) < 0.06, nih_name
  assert np.mean(["Hernia" in labels for labels in images]) < 0.08


def test_chexpert_writer_follows_the_findings_model(tmp_path):
  counts = synthetic.write_chexpert(
    tmp_path, num_patients=400, num_valid_patients=300, seed=0, image_size=24
  )
  assert (counts.train_patients, counts.valid_patients, counts.valid_studies) == (400, 300, 300)
  valid = _csv(tmp_path / chexpert_layout.ROOT / "valid.csv")
  header, rows = valid[0], valid[1:]
  assert len(rows) == counts.valid_images
  first_view = {}
  for row in rows:  # one study per valid patient; its frontal and lateral rows share the labels
    first_view.setdefault(row[0].rsplit("/", 1)[0], row)
  assert len(first_view) == 300
  for name in ("Cardiomegaly", "Pleural Effusion", "Atelectasis", "Edema"):
    rate = np.mean([r[header.index(name)] == "1.0" for r in first_view.values()])
    assert abs(rate - findings.study_prevalence(name)) < 0.07, name
  # Train cells code a finding as "1.0" 80% of the time (else uncertain); per study.
  train = _csv(tmp_path / chexpert_layout.ROOT / "train.csv")
  header, rows = train[0], train[1:]
  series: dict[str, dict[str, set[str]]] = {}
  for row in rows:
    _, _, patient, study, _ = row[0].split("/")
    series.setdefault(patient, {})[study] = {n for n in header[5:] if row[header.index(n)] == "1.0"}
  ordered = {p: [s[k] for k in sorted(s)] for p, s in series.items()}
  chronic = _rate_after_positive(ordered, tuple(findings.CHRONIC))
  acute = _rate_after_positive(ordered, tuple(findings.ACUTE))
  assert chronic > 0.6 and acute < 0.6 and chronic - acute > 0.12, (chronic, acute)


def test_demo_data_is_rebuilt_only_when_its_stamp_changes(tmp_path):
  sizes = {"nih": {"num_patients": 6, "test_fraction": 0.5, "seed": 0, "image_size": 16}}
  assert demo.ensure(tmp_path, ["nih"], sizes) == {"nih": True}
  built = tmp_path / "tensorflow_datasets" / "nih_cxr14" / "images"
  stamp = json.loads((tmp_path / "manual" / "nih" / demo.STAMP).read_text())
  assert stamp == {
    "layout": "nih",
    "arguments": sizes["nih"],
    "version": demo.GENERATOR_VERSIONS["nih"],
  }
  assert set(demo.GENERATOR_VERSIONS) == set(demo.DEMO) == set(demo.BUILDS)
  assert json.loads((built / demo.STAMP).read_text()) == stamp  # beside the build, for runs
  before = _digests(tmp_path / "manual")
  assert demo.ensure(tmp_path, ["nih"], sizes) == {"nih": False}
  assert _digests(tmp_path / "manual") == before
  bigger = {"nih": dict(sizes["nih"], num_patients=9)}
  assert demo.ensure(tmp_path, ["nih"], bigger) == {"nih": True}
  series = _nih_follow_up_series(tmp_path / "manual" / "nih")
  assert len(series) == 9
  (version,) = [p for p in built.iterdir() if p.is_dir()]
  splits = tfds.builder_from_directory(str(version)).info.splits
  # The TFDS build was redone from the new files (TFDS alone would keep the old one).
  assert sum(s.num_examples for s in splits.values()) == sum(map(len, series.values()))
  shutil.rmtree(built)  # a missing build is rebuilt from the (current) files
  assert demo.ensure(tmp_path, ["nih"], bigger) == {"nih": True}
  # Another draw: the same sizes with another generator seed, stamped as such.
  assert demo.ensure(tmp_path, ["nih"], bigger, seed=1) == {"nih": True}
  assert json.loads((built / demo.STAMP).read_text())["arguments"]["seed"] == 1
  assert _nih_follow_up_series(tmp_path / "manual" / "nih") != series
  foreign = tmp_path / "other"
  (foreign / "manual" / "nih").mkdir(parents=True)
  (foreign / "manual" / "nih" / "mine.csv").write_text("x\n")
  with pytest.raises(ValueError, match="mine|did not write"):
    demo.ensure(foreign, ["nih"], sizes)
  # A build the tool did not make (a user's own, under the name a layout builds) is never deleted.
  own = tmp_path / "own"
  (own / "tensorflow_datasets" / "nih_cxr14" / "images" / "1.0.0").mkdir(parents=True)
  with pytest.raises(ValueError, match="did not make"):
    demo.ensure(own, ["nih"], sizes)
  assert (own / "tensorflow_datasets" / "nih_cxr14" / "images" / "1.0.0").exists()
  with pytest.raises(ValueError, match="unknown layout 'mri'"):
    demo.ensure(tmp_path, ["mri"], sizes)


def test_ham10000_class_balance_follows_the_documented_frequencies(tmp_path):
  counts = synthetic.write_ham10000(tmp_path, num_lesions=600, seed=0, image_size=16)
  rows = _csv(tmp_path / "HAM10000_metadata.csv")[1:]
  dx_of_lesion = {lesion_id: dx for lesion_id, _, dx, *_ in rows}
  assert len(dx_of_lesion) == counts.lesions == 600 and len(rows) == counts.images
  for dx, p in ham10000_layout.DX_PROBS.items():
    rate = sum(d == dx for d in dx_of_lesion.values()) / 600
    assert abs(rate - p) < 0.05, (dx, rate, p)
