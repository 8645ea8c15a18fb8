"""TFDS builder `nih_cxr14`: NIH ChestX-ray14 images (config `images`) and patients (`patients`).

The official `train_val_list.txt` / `test_list.txt` give the `train` / `test` splits (they are
patient-disjoint; the `patients` config checks it). Images stay 1-channel PNGs. See README.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_builders import common
from data_builders.nih_cxr14 import labels, metadata

IMAGES = "images"
PATIENTS = "patients"
_NUM_FINDINGS = len(labels.NIH_FINDINGS)
_NUM_CHEXPERT = len(labels.CHEXPERT5)


@dataclasses.dataclass(eq=False)
class NihCxr14Config(tfds.core.BuilderConfig):
  """Attributes: level: 'images' (one example per image) or 'patients' (one per patient)."""

  level: str = IMAGES


class NihCxr14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14 with findings, CheXpert-5 labels and patient ids (case = patient)."""

  name = "nih_cxr14"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    NihCxr14Config(name=IMAGES, description="One example per image.", level=IMAGES),
    NihCxr14Config(
      name=PATIENTS,
      description="One example per patient: encoded bytes of all their images.",
      level=PATIENTS,
    ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = IMAGES
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  From https://nihcc.app.box.com/v/ChestXray-NIHCC put in the manual dir:
  Data_Entry_2017_v2020.csv (or the older Data_Entry_2017.csv), train_val_list.txt,
  test_list.txt and the extracted images_001/images/ ... images_012/images/ folders.
  """

  def __init__(self, *, skip_unreadable: bool = False, **kwargs: Any):
    """Args: skip_unreadable: skip (log and count) missing or undecodable images instead of
    raising `DataError`; kwargs: passed to `tfds.core.GeneratorBasedBuilder`."""
    super().__init__(**kwargs)
    self._skip_unreadable = skip_unreadable
    self._original_state["skip_unreadable"] = skip_unreadable  # Kept when TFDS re-creates it.

  def _info(self) -> tfds.core.DatasetInfo:
    findings = tfds.features.Tensor(shape=(_NUM_FINDINGS,), dtype=tf.int8)
    chexpert5 = tfds.features.Tensor(shape=(_NUM_CHEXPERT,), dtype=tf.int8)
    int32 = tfds.features.Scalar(dtype=tf.int32)
    text = tfds.features.Text()
    ids = {"case_id": text, "patient_id": text}
    per_image = {
      "follow_up": int32,
      "age": int32,
      "sex": text,
      "view": text,
      "findings": findings,
      "chexpert5": chexpert5,
    }
    if self.builder_config.level == IMAGES:
      features = {
        "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "image_id": text,
        **ids,
        **per_image,
      }
    else:
      features = {
        **ids,
        "num_images": int32,
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=tf.string)),
        "image_ids": tfds.features.Sequence(text),
        **{name: tfds.features.Sequence(feature) for name, feature in per_image.items()},
      }
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(features),
      homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
      citation="""@inproceedings{wang2017chestxray,
  title={ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and
          Bagheri, Mohammadhadi and Summers, Ronald M},
  booktitle={CVPR}, year={2017}}""",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    patients = common.group_by_case(
      metadata.read_entries(manual_dir), lambda image: image.patient_id, what="images"
    )
    by_split: dict[str, list[list[metadata.NihImage]]] = {"train": [], "test": []}
    for images in patients.values():
      by_split[_patient_split(images)].append(images)
    for split, split_patients in by_split.items():
      if not split_patients:
        logging.warning("nih_cxr14: split %r has no images and is not written", split)
    return {
      split: self._generate_examples(split_patients, manual_dir, split)
      for split, split_patients in by_split.items()
      if split_patients
    }

  def _generate_examples(
    self, patients: Sequence[Sequence[metadata.NihImage]], manual_dir: epath.Path, split: str
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = common.ImageReader(
      manual_dir, skip_unreadable=self._skip_unreadable, what=f"nih_cxr14 {split}"
    )
    if self.builder_config.level == IMAGES:
      yield from _image_examples(patients, reader)
    else:
      yield from _patient_examples(patients, reader)
    reader.skipped.report()


def _patient_split(images: Sequence[metadata.NihImage]) -> str:
  """Returns the one split of a patient's images; `DataError` if the split lists disagree."""
  first = images[0]
  for image in images[1:]:
    if image.split != first.split:
      raise common.DataError(
        first.source,
        f"patient {first.patient_id!r} has images in both splits: line {first.line} "
        f"({first.split}) and line {image.line} ({image.split}); the lists must be "
        "patient-disjoint",
        image.line,
      )
  return first.split


def _per_image_features(image: metadata.NihImage) -> dict[str, Any]:
  return {
    "follow_up": image.follow_up,
    "age": image.age,
    "sex": image.sex,
    "view": image.view,
    "findings": image.findings,
    "chexpert5": labels.to_chexpert5(image.findings),
  }


def _image_examples(
  patients: Sequence[Sequence[metadata.NihImage]], reader: common.ImageReader
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields one example per readable image, keyed by its path."""
  for images in patients:
    for image in images:
      data = reader.read(image.image_id, source=image.source, line=image.line)
      if data is None:
        continue
      yield (
        image.image_id,
        {
          "image": data,
          "image_id": image.image_id,
          "case_id": image.patient_id,
          "patient_id": image.patient_id,
          **_per_image_features(image),
        },
      )


def _patient_examples(
  patients: Sequence[Sequence[metadata.NihImage]], reader: common.ImageReader
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields one example per patient with the encoded bytes of their readable images."""
  for images in patients:
    kept, encoded = [], []
    for image in images:
      data = reader.read(image.image_id, source=image.source, line=image.line)
      if data is not None:
        kept.append(image)
        encoded.append(data)
    if not kept:
      logging.warning(
        "skip_unreadable: patient %r has no readable image left; dropped", images[0].patient_id
      )
      continue
    per_image = [_per_image_features(image) for image in kept]
    patient_id = kept[0].patient_id
    yield (
      patient_id,
      {
        "case_id": patient_id,
        "patient_id": patient_id,
        "num_images": len(kept),
        "images": encoded,
        "image_ids": [image.image_id for image in kept],
        **{name: [features[name] for features in per_image] for name in per_image[0]},
      },
    )
