"""CheXpert as a TFDS builder, grouped by patient or study for MICLe (`chexpert_micle`).

Reads the manual download (`CheXpert-v1.0-small/` or `CheXpert-v1.0/` inside the manual dir):
train.csv -> `train`, valid.csv -> `validation`. Configs: `images` (one example per image),
`patients` (one per patient, the MICLe case) and `studies` (one per study). Labels are stored raw
(int8 codes, see `labels.py`); the uncertainty policy is applied when reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_builders import common
from data_builders.chexpert import labels

ROOTS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SPLIT_FILES = {"train": "train.csv", "validation": "valid.csv"}
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
REQUIRED_COLUMNS = META_COLUMNS + labels.OBSERVATIONS
_VIEWS = {"Frontal": "frontal", "Lateral": "lateral"}
_AP_PA = {value: value for value in ("AP", "PA", "LL", "RL", "")}
_SEXES = {value: value for value in ("Male", "Female", "Unknown", "")}
_PATIENT = re.compile(r"^patient\d+$")
_STUDY = re.compile(r"^study\d+$")

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register at https://stanfordmlgroup.github.io/competitions/chexpert/ and download
CheXpert-v1.0-small.zip (about 11 GB; the full-resolution CheXpert-v1.0 also works). Unzip it
into the manual dir, so that it contains `CheXpert-v1.0-small/train.csv`,
`CheXpert-v1.0-small/valid.csv`, `CheXpert-v1.0-small/train/` and `CheXpert-v1.0-small/valid/`.
Then: python -m data_builders.build chexpert_micle --manual_dir=DIR --data_dir=DIR
"""


class ImageRecord(NamedTuple):
  """Metadata of one CSV row: small strings only, image bytes are read later."""

  image_id: str  # path relative to the manual dir
  patient_id: str  # e.g. patient00001
  study_id: str  # e.g. patient00001/study1
  view: str  # frontal | lateral
  ap_pa: str  # AP | PA | LL | RL | '' (blank, e.g. laterals)
  sex: str
  age: int  # -1 if unknown
  observations: bytes  # 14 int8 codes in labels.OBSERVATIONS order
  source: str  # the CSV file, for error messages
  line: int  # 1-based line in the CSV


class ChexpertMicleConfig(tfds.core.BuilderConfig):
  """Selects the example unit: images, or cases grouped by patient or by study."""

  def __init__(self, *, case_by: str | None, **kwargs):
    """Args: case_by: None (one example per image), 'patient' or 'study'."""
    super().__init__(**kwargs)
    self.case_by = case_by


def parse_row(row: common.CsvRow) -> ImageRecord:
  """Checks and converts one CSV row; raises `common.DataError` naming file and line."""
  image_id = common.resolve_under("", row["Path"], source=row.source, line=row.line)
  parts = image_id.split("/")
  if len(parts) < 3 or not _PATIENT.match(parts[-3]) or not _STUDY.match(parts[-2]):
    raise row.error(f"Path {row['Path']!r} is not .../patientNNNNN/studyN/FILE")
  age_text = row["Age"]
  if age_text and not age_text.isdigit():
    raise row.error(f"invalid value {age_text!r} in column 'Age' (expected an integer or blank)")
  codes = [row.parse(name, labels.CELL_CODES) for name in labels.OBSERVATIONS]
  return ImageRecord(
    image_id=image_id,
    patient_id=parts[-3],
    study_id=f"{parts[-3]}/{parts[-2]}",
    view=row.parse("Frontal/Lateral", _VIEWS),
    ap_pa=row.parse("AP/PA", _AP_PA),
    sex=row.parse("Sex", _SEXES),
    age=int(age_text) if age_text else -1,
    observations=np.array(codes, np.int8).tobytes(),
    source=row.source,
    line=row.line,
  )


def read_records(csv_path: epath.PathLike) -> list[ImageRecord]:
  """Parses every row of a CheXpert CSV (metadata only) and rejects duplicated paths."""
  unique = common.UniqueKeys("path")
  records = []
  for row in common.read_csv(csv_path, REQUIRED_COLUMNS):
    record = parse_row(row)
    unique.add(record.image_id, source=row.source, line=row.line)
    records.append(record)
  return records


def _observations(record: ImageRecord) -> np.ndarray:
  return np.frombuffer(record.observations, np.int8)


class ChexpertMicle(tfds.core.GeneratorBasedBuilder):
  """CheXpert chest X-rays with patient and study ids, for SimCLR/MICLe pretraining."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, patients and studies configs; raw observation codes."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
    ChexpertMicleConfig(name="images", case_by=None, description="One example per image."),
    ChexpertMicleConfig(
      name="patients", case_by="patient", description="One example per patient (case)."
    ),
    ChexpertMicleConfig(name="studies", case_by="study", description="One example per study."),
  ]
  DEFAULT_CONFIG_NAME = "images"

  def __init__(self, *, skip_unreadable: bool = False, **kwargs):
    """Args: skip_unreadable: skip (log and count) missing or undecodable images instead of
    failing; **kwargs: passed to `tfds.core.GeneratorBasedBuilder`."""
    super().__init__(**kwargs)
    self.skip_unreadable = skip_unreadable
    self._original_state["skip_unreadable"] = skip_unreadable

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    if self.builder_config.case_by is None:
      features = {
        "image": tfds.features.Image(shape=(None, None, 1), encoding_format="jpeg"),
        "image_id": text,
        "case_id": text,
        "patient_id": text,
        "study_id": text,
        "view": text,
        "ap_pa": text,
        "sex": text,
        "age": tfds.features.Scalar(dtype=np.int32),
        "observations": tfds.features.Tensor(shape=(14,), dtype=np.int8),
      }
    else:
      features = {
        "case_id": text,
        "patient_id": text,
        "sex": text,
        "num_images": tfds.features.Scalar(dtype=np.int32),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "image_ids": tfds.features.Sequence(text),
        "study_ids": tfds.features.Sequence(text),
        "views": tfds.features.Sequence(text),
        "ap_pa": tfds.features.Sequence(text),
        "ages": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
        "observations": tfds.features.Sequence(tfds.features.Tensor(shape=(14,), dtype=np.int8)),
      }
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(features),
      supervised_keys=None,
      homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    root = common.find_subdir(manual_dir, ROOTS)
    return {
      split: self._generate_examples(root / filename, manual_dir)
      for split, filename in SPLIT_FILES.items()
    }

  def _generate_examples(self, csv_path: epath.Path, manual_dir: epath.Path):
    records = read_records(csv_path)
    reader = common.ImageReader(
      manual_dir, skip_unreadable=self.skip_unreadable, what=f"{self.name} {csv_path}"
    )
    if self.builder_config.case_by is None:
      yield from _image_examples(records, reader)
    else:
      key = "patient_id" if self.builder_config.case_by == "patient" else "study_id"
      cases = common.group_by_case(records, lambda r: getattr(r, key), what=f"rows of {csv_path}")
      yield from _case_examples(cases, reader)
    reader.skipped.report()


def _image_examples(records: list[ImageRecord], reader: common.ImageReader) -> Iterator:
  for record in records:
    data = reader.read(record.image_id, source=record.source, line=record.line)
    if data is None:
      continue
    yield (
      record.image_id,
      {
        "image": data,
        "image_id": record.image_id,
        "case_id": record.patient_id,
        "patient_id": record.patient_id,
        "study_id": record.study_id,
        "view": record.view,
        "ap_pa": record.ap_pa,
        "sex": record.sex,
        "age": record.age,
        "observations": _observations(record),
      },
    )


def _case_examples(cases: dict[str, list[ImageRecord]], reader: common.ImageReader) -> Iterator:
  for case_id, records in cases.items():
    kept, images = [], []
    for record in records:
      data = reader.read(record.image_id, source=record.source, line=record.line)
      if data is not None:
        kept.append(record)
        images.append(data)
    if not kept:
      logging.warning("skip_unreadable: case %s has no readable image left; skipped", case_id)
      continue
    yield (
      case_id,
      {
        "case_id": case_id,
        "patient_id": kept[0].patient_id,
        "sex": kept[0].sex,
        "num_images": len(kept),
        "images": images,
        "image_ids": [r.image_id for r in kept],
        "study_ids": [r.study_id for r in kept],
        "views": [r.view for r in kept],
        "ap_pa": [r.ap_pa for r in kept],
        "ages": [r.age for r in kept],
        "observations": np.stack([_observations(r) for r in kept]),
      },
    )


_CITATION = """\
@inproceedings{irvin2019chexpert,
  title={CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison},
  author={Irvin, Jeremy and Rajpurkar, Pranav and Ko, Michael and others},
  booktitle={AAAI Conference on Artificial Intelligence},
  year={2019}
}
"""
