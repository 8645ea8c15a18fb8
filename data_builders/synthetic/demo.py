"""The demo's synthetic datasets, written and built once per generator version.

  python -m data_builders.synthetic.demo --data=data [--layouts=chexpert,nih,teledermatology]

writes `DATA/manual/<layout>/` at the demo's sizes (`DEMO`) and builds it with the real builders
into `DATA/tensorflow_datasets`. Each written dataset carries a stamp (`SYNTHETIC.json`: the
layout, its arguments and its `GENERATOR_VERSIONS` entry), copied beside its TFDS builds, where a run's
data fingerprint records it. A dataset whose stamp matches is left alone; any other one that
this module wrote is deleted and written again, together with its TFDS builds, so a demo never
reads data that an older generator wrote (TFDS itself would reuse a prepared dataset whatever its
manual files now hold). A folder without a stamp is never deleted.

`--seed=N` draws every layout with generator seed N instead of the demo's (0): another draw of
the same generative model, e.g. `--data=data_seed1 --seed=1` to check that a study's conclusion
survives it, or to choose hyperparameters on data the reported table does not use.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as python_logging
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_builders import build, synthetic

# Bump a layout's entry whenever its generator writes something different for the same arguments
# (3 for chexpert: the real share of multi-image studies, and truth.csv; 3 for ham10000: the
# texture drawn on the lesion).
GENERATOR_VERSIONS = {"chexpert": 3, "nih": 2, "ham10000": 3, "teledermatology": 2}
STAMP = "SYNTHETIC.json"
# Sizes of the demo: 600 training and 500 validation CheXpert patients (a mean-AUC CI of about
# ±0.025), 700 NIH patients of whom half are in the test list.
DEMO: dict[str, dict[str, Any]] = {
  "chexpert": {"num_patients": 600, "num_valid_patients": 500, "seed": 0, "image_size": 96},
  "nih": {"num_patients": 700, "test_fraction": 0.5, "seed": 0, "image_size": 96},
  "ham10000": {"num_lesions": 300, "seed": 0, "image_size": 96},
  # 900 home-clinic cases (about 450 for training, ~1,000 photos; 405 for test, a top-1 CI of
  # about ±0.045) and 400 cases of the external clinic.
  "teledermatology": {
    "num_cases": 900,
    "num_external_cases": 400,
    "split_fractions": {"train": 0.5, "validation": 0.05, "test": 0.45},
    "seed": 0,
    "image_size": 64,
  },
}
BUILDS = {
  "chexpert": ("chexpert_micle",),
  "nih": ("nih_cxr14/images",),
  "ham10000": ("derm/ham10000_cases", "derm/ham10000_images"),
  "teledermatology": ("derm/generic_cases", "derm/generic_images"),
}
_WRITERS = {
  "chexpert": synthetic.write_chexpert,
  "nih": synthetic.write_nih,
  "ham10000": synthetic.write_ham10000,
  "teledermatology": synthetic.write_teledermatology,
}


def _stamp(layout: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
  return {"layout": layout, "arguments": dict(arguments), "version": GENERATOR_VERSIONS[layout]}


def _build_dirs(data_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
  """The TFDS folders a build of `name` ("builder" or "builder/config") writes."""
  builder, _, config = name.partition("/")
  return [data_dir / builder / config] if config else [data_dir / builder]


def ensure(
  data: str | pathlib.Path,
  layouts: Sequence[str] = ("chexpert", "nih"),
  sizes: Mapping[str, Mapping[str, Any]] = DEMO,
  seed: int | None = None,
) -> dict[str, bool]:
  """Writes and builds each layout unless its stamp is current; returns {layout: rewritten}.

  `seed` replaces every layout's generator seed (None: the sizes' own).
  """
  if seed is not None:
    sizes = {layout: {**arguments, "seed": int(seed)} for layout, arguments in sizes.items()}
  data = pathlib.Path(data)
  tfds_dir = data / "tensorflow_datasets"
  rewritten = {}
  for layout in layouts:
    if layout not in _WRITERS:
      raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(_WRITERS)}")
    manual = data / "manual" / layout
    wanted = _stamp(layout, sizes[layout])
    stamp = manual / STAMP
    current = stamp.exists() and json.loads(stamp.read_text()) == wanted
    built = all(
      (d / STAMP).exists() and json.loads((d / STAMP).read_text()) == wanted
      for name in BUILDS[layout]
      for d in _build_dirs(tfds_dir, name)
    )
    if current and built:
      logging.info("%s: up to date (%s)", manual, wanted)
      rewritten[layout] = False
      continue
    if manual.exists() and any(manual.iterdir()) and not stamp.exists():
      raise ValueError(f"{manual} holds files this tool did not write; move them away first")
    for name in BUILDS[layout]:
      for folder in _build_dirs(tfds_dir, name):
        if folder.exists() and any(folder.iterdir()) and not (folder / STAMP).exists():
          raise ValueError(
            f"{folder} holds a build this tool did not make (e.g. your own {name}); "
            "move it away or pick another --data"
          )
    if not current:
      shutil.rmtree(manual, ignore_errors=True)
      _WRITERS[layout](manual, **sizes[layout])
      stamp.write_text(json.dumps(wanted, indent=2))
    for name in BUILDS[layout]:
      for folder in _build_dirs(tfds_dir, name):
        shutil.rmtree(folder, ignore_errors=True)
      build.build(name, manual_dir=str(manual), data_dir=str(tfds_dir))
      for folder in _build_dirs(tfds_dir, name):
        (folder / STAMP).write_text(json.dumps(wanted, indent=2))
    rewritten[layout] = True
  return rewritten


_OWN_CODE = str(pathlib.Path(__file__).resolve().parents[1])


def _own_info_only(record: python_logging.LogRecord) -> bool:
  """Warnings and errors from anywhere; INFO lines from the builders' own code only."""
  return record.levelno >= python_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The demo's data takes seconds: TFDS's progress bars, its INFO lines and the banners it prints
  # for each config would be most of what `make demo` shows. The builders' lines say what was built.
  tfds.disable_progress_bar()
  logging.get_absl_handler().addFilter(_own_info_only)
  with contextlib.redirect_stdout(io.StringIO()):
    result = ensure(flags.FLAGS.data, flags.FLAGS.layouts, seed=flags.FLAGS.seed)
  for layout, fresh in result.items():
    print(f"{layout}: {'written and built' if fresh else 'up to date'}")


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string("data", "data", "Folder for manual/ and tensorflow_datasets/.")
  flags.DEFINE_list(
    "layouts", ["chexpert", "nih"], "Layouts to ensure (chexpert, nih, ham10000, teledermatology)."
  )
  flags.DEFINE_integer("seed", None, "Generator seed for every layout (default: the demo's, 0).")


if __name__ == "__main__":
  define_flags()
  app.run(_main)
