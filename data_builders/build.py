"""Builds a dataset from a manual download (the `tfds build` CLI needs apache-beam; this doesn't).

  python -m data_builders.build NAME[/CONFIG] --manual_dir=DIR --data_dir=DIR [--skip_unreadable]

NAME is a key of `BUILDERS` (e.g. `chexpert_micle`); without /CONFIG every config is built.
Bad input stops the build with one line naming the file and row; `--skip_unreadable` instead
skips missing or undecodable images, logging each one and the count.
"""

from __future__ import annotations

import importlib
import sys
import time

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_builders import common

# TFDS builder name -> package whose import registers it. Add one line per new builder.
BUILDERS: dict[str, str] = {
  "chexpert_micle": "data_builders.chexpert",
  "derm": "data_builders.derm",
  "nih_cxr14": "data_builders.nih_cxr14",
}


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  """Imports the package of builder `name` (registering it) and returns the builder class.

  Raises:
    ValueError: `name` is not in `BUILDERS`, or its package cannot be imported.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown builder {name!r}; known builders: {sorted(BUILDERS)}")
  package = BUILDERS[name]
  try:
    importlib.import_module(package)
  except ModuleNotFoundError as e:
    if e.name and package.startswith(e.name):
      raise ValueError(
        f"builder {name!r} should be in package {package}, which does not exist"
      ) from e
    raise
  return tfds.builder_cls(name)


def build(
  name: str,
  *,
  manual_dir: str,
  data_dir: str,
  skip_unreadable: bool = False,
) -> list[tfds.core.DatasetBuilder]:
  """Prepares `name` ('builder' or 'builder/config') from `manual_dir` into `data_dir`.

  Args:
    name: a key of `BUILDERS`, optionally followed by '/CONFIG'; without a config, every config
      of the builder is prepared.
    manual_dir: the folder holding the manual download.
    data_dir: the TFDS data dir to write to.
    skip_unreadable: passed to the builder constructor (builders must accept it) when True.

  Returns:
    The prepared builders, one per config.
  """
  builder_name, _, config = name.partition("/")
  cls = builder_class(builder_name)
  configs = [config] if config else [c.name for c in cls.BUILDER_CONFIGS] or [None]
  kwargs = {"skip_unreadable": True} if skip_unreadable else {}
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builders = []
  for config_name in configs:
    start = time.perf_counter()
    builder = cls(config=config_name, data_dir=data_dir, **kwargs)
    builder.download_and_prepare(download_config=download_config)
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    logging.info(
      "Built %s/%s in %.1f s: %s", builder_name, config_name, time.perf_counter() - start, counts
    )
    builders.append(builder)
  return builders


def run(name: str, *, manual_dir: str, data_dir: str, skip_unreadable: bool = False) -> int:
  """Runs `build` for the command line: returns the exit code, printing bad input as one line."""
  try:
    builders = build(
      name, manual_dir=manual_dir, data_dir=data_dir, skip_unreadable=skip_unreadable
    )
  except (common.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for builder in builders:
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"{builder.info.full_name}: {counts} -> {builder.data_dir}")
  return 0


def _main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(
      "Usage: python -m data_builders.build NAME[/CONFIG] --manual_dir=DIR --data_dir=DIR"
    )
  flag_values = flags.FLAGS
  sys.exit(
    run(
      argv[1],
      manual_dir=flag_values.manual_dir,
      data_dir=flag_values.data_dir,
      skip_unreadable=flag_values.skip_unreadable,
    )
  )


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string("manual_dir", None, "Folder holding the manual download.", required=True)
  flags.DEFINE_string(
    "data_dir", None, "TFDS data dir to write the prepared dataset to.", required=True
  )
  flags.DEFINE_bool("skip_unreadable", False, "Skip (log and count) missing/undecodable images.")


if __name__ == "__main__":
  define_flags()
  app.run(_main)
