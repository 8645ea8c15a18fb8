"""TFDS builder `derm`: dermatology images and MICLe cases from HAM10000, PAD-UFES-20 or a CSV.

Configs are `<source>_images` (one example per image) and `<source>_cases` (one example per case,
with the encoded bytes of all its images) for the sources `generic` (`cases.csv`), `ham10000`
and `pad_ufes20`. See README.md for the manual download, the layouts and the split rules.
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
from data_builders.derm import cases as cases_lib
from data_builders.derm import sources

_READERS = {
  "generic": sources.read_generic,
  "ham10000": sources.read_ham10000,
  "pad_ufes20": sources.read_pad_ufes20,
}
# Class names fixed by the source; None: the sorted unique labels found in the CSV.
_CLASSES: dict[str, Sequence[str] | None] = {
  "generic": None,
  "ham10000": sources.HAM10000_CLASSES,
  "pad_ufes20": sources.PAD_UFES20_CLASSES,
}
_DESCRIPTIONS = {
  "generic": "a generic case CSV (`cases.csv`)",
  "ham10000": "HAM10000 dermoscopy (case = lesion)",
  "pad_ufes20": "PAD-UFES-20 smartphone photos (case = lesion)",
}
IMAGES = "images"
CASES = "cases"


@dataclasses.dataclass(eq=False)
class DermConfig(tfds.core.BuilderConfig):
  """A source and a level.

  Attributes:
    source: 'generic', 'ham10000' or 'pad_ufes20'.
    level: 'images' (one example per image) or 'cases' (one example per case).
    split_seed: seed of the patient-level split used when the CSV has no `split` column.
  """

  source: str = "generic"
  level: str = IMAGES
  split_seed: int = 0


def _make_configs() -> list[DermConfig]:
  configs = []
  for source, description in _DESCRIPTIONS.items():
    for level in (IMAGES, CASES):
      configs.append(
        DermConfig(
          name=f"{source}_{level}",
          description=f"One example per {level[:-1]}, from {description}.",
          source=source,
          level=level,
        )
      )
  return configs


class Derm(tfds.core.GeneratorBasedBuilder):
  """Dermatology images grouped into MICLe cases, with patient-level splits."""

  name = "derm"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: generic CSV, HAM10000 and PAD-UFES-20."}
  BUILDER_CONFIGS = _make_configs()
  DEFAULT_BUILDER_CONFIG_NAME = "ham10000_images"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the source's files directly in the manual dir (see data_builders/derm/README.md):
    generic:    cases.csv (case_id,image_path,label[,split,patient_id,age,sex,localization]) and
                the images at the paths it names, relative to the manual dir;
    ham10000:   HAM10000_metadata.csv, HAM10000_images_part_1/, HAM10000_images_part_2/;
    pad_ufes20: metadata.csv and images/ (any sub-folders, e.g. images/imgs_part_1/).
  """

  def __init__(self, *, skip_unreadable: bool = False, **kwargs: Any):
    """Args: skip_unreadable: skip (log and count) missing or undecodable images instead of
    raising `DataError`; kwargs: passed to `tfds.core.GeneratorBasedBuilder`."""
    super().__init__(**kwargs)
    self._skip_unreadable = skip_unreadable
    self._original_state["skip_unreadable"] = skip_unreadable  # Kept when TFDS re-creates it.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    label = tfds.features.ClassLabel(names=_CLASSES[config.source])
    ids = {
      "case_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
    }
    if config.level == IMAGES:
      features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image_id": tfds.features.Text(),
        **ids,
        "label": label,
        "age": tfds.features.Scalar(dtype=tf.int32),
        "sex": tfds.features.Text(),
        "localization": tfds.features.Text(),
      }
    else:
      features = {
        **ids,
        "num_images": tfds.features.Scalar(dtype=tf.int32),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=tf.string)),
        "image_ids": tfds.features.Sequence(tfds.features.Text()),
        "label": label,
      }
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(features),
      supervised_keys=("image", "label") if config.level == IMAGES else None,
      homepage="https://github.com/google-research/simclr",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    manual_dir = epath.Path(dl_manager.manual_dir)
    images = _READERS[config.source](manual_dir)
    cases = cases_lib.make_cases(images, split_seed=config.split_seed)
    label_feature = self.info.features["label"]
    if _CLASSES[config.source] is None:
      label_feature.names = cases_lib.class_names(cases, None)
    logging.info("%s: %d cases, classes %s", config.name, len(cases), label_feature.names)
    for label, per_split in cases_lib.untrained_labels(cases).items():
      logging.warning(
        "%s: label %r has no train case (cases per split: %s) in %s; a classifier never learns it",
        config.name,
        label,
        per_split,
        manual_dir,
      )
    by_split: dict[str, list[cases_lib.Case]] = {}
    for case in cases:
      by_split.setdefault(case.split, []).append(case)
    for split in sources.SPLITS:
      if split not in by_split:
        logging.warning("%s: split %r has no cases and is not written", config.name, split)
    return {
      split: self._generate_examples(by_split[split], manual_dir, split)
      for split in sources.CSV_SPLITS
      if split in by_split
    }

  def _generate_examples(
    self, cases: Sequence[cases_lib.Case], manual_dir: epath.Path, split: str
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = common.ImageReader(
      manual_dir,
      skip_unreadable=self._skip_unreadable,
      what=f"{self.builder_config.name} {split}",
    )
    generate = _image_examples if self.builder_config.level == IMAGES else _case_examples
    yield from generate(cases, reader)
    reader.skipped.report()


def _image_examples(
  cases: Sequence[cases_lib.Case], reader: common.ImageReader
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields one example per readable image, keyed by its path."""
  for case in cases:
    for image in case.images:
      data = reader.read(image.image_id, source=image.source, line=image.line)
      if data is None:
        continue
      yield (
        image.image_id,
        {
          "image": data,
          "image_id": image.image_id,
          "case_id": case.case_id,
          "patient_id": case.patient_id,
          "label": case.label,
          "age": image.age,
          "sex": image.sex,
          "localization": image.localization,
        },
      )


def _case_examples(
  cases: Sequence[cases_lib.Case], reader: common.ImageReader
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields one example per case with its readable images' encoded bytes, keyed by case id."""
  for case in cases:
    image_ids, encoded = [], []
    for image in case.images:
      data = reader.read(image.image_id, source=image.source, line=image.line)
      if data is not None:
        image_ids.append(image.image_id)
        encoded.append(data)
    if not encoded:
      logging.warning("skip_unreadable: case %r has no readable image left; dropped", case.case_id)
      continue
    yield (
      case.case_id,
      {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "num_images": len(encoded),
        "images": encoded,
        "image_ids": image_ids,
        "label": case.label,
      },
    )
