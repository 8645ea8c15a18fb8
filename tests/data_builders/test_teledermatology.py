"""The synthetic teledermatology cases: each property the generative model states, and the files."""

import csv
import dataclasses
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders import build
from data_builders.synthetic import drawing, skin_conditions, teledermatology
from data_builders.synthetic import teledermatology_layout as layout


def _cases(external: bool = False, n: int = 3000, seed: int = 0) -> list[teledermatology.Case]:
  rng = np.random.default_rng(seed)
  clinic = teledermatology.make_clinic("external" if external else "home", rng, external=external)
  return list(teledermatology.sample_cases(clinic, n, rng, lambda r: "train"))


@pytest.fixture(scope="module")
def home() -> list[teledermatology.Case]:
  return _cases()


@pytest.fixture(scope="module")
def external() -> list[teledermatology.Case]:
  return _cases(external=True, n=1000)


def test_conditions_imbalanced_with_other(home):
  assert (
    len(skin_conditions.LOOKS) >= 8 and skin_conditions.OTHER in teledermatology.CONDITION_PROBS
  )
  counts = {c: sum(case.condition == c for case in home) for c in teledermatology.CONDITION_PROBS}
  for condition, p in teledermatology.CONDITION_PROBS.items():
    assert abs(counts[condition] / len(home) - p) < 4 * np.sqrt(p * (1 - p) / len(home)) + 1e-3
  assert max(counts.values()) / min(counts.values()) > 3  # a clinic's caseload, not balanced
  # "other" is a mix of rarer conditions, each drawn.
  looks = {case.shots[0].lesion.look for case in home if case.condition == skin_conditions.OTHER}
  assert looks == set(skin_conditions.OTHER_LOOKS.values())


def test_photos_per_case_skewed_toward_few(home):
  counts = np.array([len(case.shots) for case in home])
  assert counts.min() == 1 and counts.max() == 6
  shares = np.bincount(counts, minlength=7)[1:] / len(counts)
  assert all(shares[i] > shares[i + 1] for i in range(5))  # fewer photos are commoner
  np.testing.assert_allclose(shares, teledermatology.PHOTO_COUNTS, atol=0.03)
  assert 0.5 < np.mean(counts > 1) < 0.65


def test_a_case_has_one_condition_and_its_photos_show_one_lesion_or_another(home):
  further = [shot for case in home for shot in case.shots[1:]]
  new = 0
  for case in home:
    looks = {shot.lesion.look for shot in case.shots}
    assert len(looks) == 1  # one condition per case, whatever the lesion
    seen = set()
    for k, shot in enumerate(case.shots):
      if shot.lesion_index not in seen and k > 0:
        new += 1
        first = case.shots[0].lesion
        assert shot.lesion.seed != first.seed  # another lesion: its own shape and texture
        if len(shot.lesion.look.sites) > 1:
          previous = next(s.lesion for s in case.shots if s.lesion_index == shot.lesion_index - 1)
          assert shot.lesion.site != previous.site  # at another body site
      seen.add(shot.lesion_index)
  share = new / len(further)
  assert abs(share - teledermatology.ANOTHER_LESION) < 0.04
  # Photos of one lesion are different photos: their cameras differ.
  for case in home[:200]:
    photos = [shot.photo for shot in case.shots]
    assert len({(p.rotation, p.tilt, p.distance, p.seed) for p in photos}) == len(photos)


def test_photos_mostly_come_from_the_cases_device(home):
  """Each photo is the case's device with p = SAME_DEVICE + (1 - SAME_DEVICE) / 5 (a random pick
  of the clinic's five may fall on it), else one of the other four: two photos of a case share a
  device with p = q² + (1 - q)² / 4."""
  q = teledermatology.SAME_DEVICE + (1 - teledermatology.SAME_DEVICE) / 5
  expected = q**2 + (1 - q) ** 2 / 4
  same = [shot.device == case.shots[0].device for case in home for shot in case.shots[1:]]
  assert abs(np.mean(same) - expected) < 4 * np.sqrt(expected * (1 - expected) / len(same))


def test_patients_keep_their_skin_tone_across_cases(home):
  tones: dict[str, set[float]] = {}
  for case in home:
    tones.setdefault(case.patient.patient_id, set()).add(case.patient.tone)
  assert all(len(t) == 1 for t in tones.values())
  cases_per_patient = np.bincount(
    np.unique([c.patient.patient_id for c in home], return_counts=True)[1]
  )
  assert cases_per_patient[2] > 0 and cases_per_patient[1] > 5 * cases_per_patient[2]


def test_external_clinic_is_shifted(home, external):
  home_gains = {shot.device.white_balance for case in home for shot in case.shots}
  external_gains = {shot.device.white_balance for case in external for shot in case.shots}
  assert len(home_gains) == 5 and len(external_gains) == 3 and not home_gains & external_gains

  def mean(cases, value):
    return np.mean([value(case, shot) for case in cases for shot in case.shots])

  # Darker skin, cooler white balance, more blur and noise, lower JPEG quality, dimmer and more
  # directional light.
  assert mean(external, lambda c, s: c.patient.tone) > mean(home, lambda c, s: c.patient.tone) + 0.2
  ratio = lambda c, s: s.photo.white_balance[2] / s.photo.white_balance[0]  # noqa: E731
  assert mean(external, ratio) > mean(home, ratio) + 0.1
  for key, sign in (("blur", 1), ("noise", 1), ("light_strength", 1), ("jpeg_quality", -1),
                    ("ambient", -1)):  # fmt: skip
    photo_value = lambda c, s, key=key: getattr(s.photo, key)  # noqa: E731
    assert sign * (mean(external, photo_value) - mean(home, photo_value)) > 0, key
  # Same conditions in both clinics.
  assert {c.condition for c in external} == {c.condition for c in home}


def _plain(photo: teledermatology.Photo, **changes) -> teledermatology.Photo:
  """`photo` without what is drawn in image coordinates (light gradient, flash, clothing, ruler,
  blur, noise), so that the image shows only the skin plane."""
  return dataclasses.replace(
    photo,
    **{
      "tilt": (0.0, 0.0),
      "offset": (0.0, 0.0),
      "ambient": 1.0,
      "light_strength": 0.0,
      "flash": (0.0, 0.0, 0.0),
      "white_balance": (1.0, 1.0, 1.0),
      "clothing": None,
      "ruler": -1,
      "blur": 0.0,
      "noise": 0.0,
      **changes,
    },
  )


@pytest.mark.parametrize("condition", ["psoriasis", "seborrheic_keratosis", "basal_cell_carcinoma"])
def test_texture_lives_on_the_lesion_not_on_the_pixels(home, condition):
  """Turning the camera by 90° turns the whole picture, texture and hairs included: they are
  drawn on the skin plane. A texture drawn on the pixel grid would stay put."""
  case = next(c for c in home if c.condition == condition)
  shot = case.shots[0]
  lesion = dataclasses.replace(shot.lesion, site="leg")  # a hairy site
  upright = _plain(shot.photo, rotation=0.0, distance=1.0)
  turned = _plain(shot.photo, rotation=np.pi / 2, distance=1.0)
  a = teledermatology.render(lesion, case.patient, upright, height=48).astype(int)
  b = teledermatology.render(lesion, case.patient, turned, height=48).astype(int)
  assert np.abs(a - np.rot90(a, k=1)).mean() > 3  # the picture is not symmetric
  rotated = min(np.abs(b - np.rot90(a, k=k)).max() for k in (1, -1))
  assert rotated <= 1  # uint8 rounding of the same plane sampled at the same points
  # And from further away, the same lesion covers fewer pixels: the texture scales with it.
  far = teledermatology.render(lesion, case.patient, _plain(upright, distance=1.3), height=48)
  near_ink = np.abs(a - np.median(a, axis=(0, 1))).sum(-1) > 60
  far_ink = np.abs(far.astype(int) - np.median(far, axis=(0, 1))).sum(-1) > 60
  assert far_ink.sum() < near_ink.sum()


def test_plane_noise_is_a_function_of_the_plane():
  u, v = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 9), indexing="ij")
  full = drawing.plane_noise(5, u, v, frequency=4.0)
  # The same points sampled by another grid (every other one) get the same values.
  np.testing.assert_array_equal(
    drawing.plane_noise(5, u[::2, ::2], v[::2, ::2], frequency=4.0), full[::2, ::2]
  )
  assert not np.allclose(drawing.plane_noise(6, u, v, frequency=4.0), full)


def test_camera_nuisances_change_the_photo(home):
  """Directional light makes a gradient across the photo; white balance scales the channels."""
  case = home[0]
  shot = case.shots[0]
  base = _plain(shot.photo)
  flat = teledermatology.render(shot.lesion, case.patient, base, height=32).astype(float)
  lit = teledermatology.render(
    shot.lesion, case.patient, _plain(shot.photo, light_strength=0.5, light_angle=0.0), height=32
  ).astype(float)
  ratio = lit.mean(axis=(1, 2)) / flat.mean(axis=(1, 2))  # per row, y from top to bottom
  assert ratio[-4:].mean() > ratio[:4].mean() + 0.3
  warm = teledermatology.render(
    shot.lesion, case.patient, _plain(shot.photo, white_balance=(1.1, 1.0, 0.9)), height=32
  ).astype(float)
  assert warm[..., 0].mean() > flat[..., 0].mean() and warm[..., 2].mean() < flat[..., 2].mean()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("tele") / "manual"
  layout.write_teledermatology(out, num_cases=40, num_external_cases=12, seed=3, image_size=32)
  return out


def test_writes_a_generic_case_csv_with_an_external_split(written, tmp_path):
  rows = list(csv.DictReader(open(written / layout.CSV_NAME)))
  assert list(rows[0]) == layout.HEADER
  assert {r["split"] for r in rows if r["clinic"] == "external"} == {"external"}
  assert {r["split"] for r in rows if r["clinic"] == "home"} <= {"train", "validation", "test"}
  by_patient: dict[str, set[str]] = {}
  for r in rows:
    by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert (written / r["image_path"]).exists()
  assert all(len(s) == 1 for s in by_patient.values())  # patient-level splits
  again = tmp_path / "again"
  layout.write_teledermatology(again, num_cases=40, num_external_cases=12, seed=3, image_size=32)
  files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  assert all((written / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_the_generic_builder_reads_it_with_the_external_split(written, tmp_path):
  build.build("derm/generic_cases", manual_dir=str(written), data_dir=str(tmp_path))
  builder = tfds.builder("derm/generic_cases", data_dir=str(tmp_path))
  rows = list(csv.DictReader(open(written / layout.CSV_NAME)))
  assert set(builder.info.splits) == {r["split"] for r in rows}
  assert builder.info.features["label"].names == sorted({r["label"] for r in rows})
  external = list(tfds.as_numpy(builder.as_dataset(split="external")))
  assert len(external) == 12
  photos = sum(ex["num_images"] for ex in external)
  assert photos == sum(r["split"] == "external" for r in rows)
