"""Writes a synthetic dataset in a real download layout.

  python -m data_builders.synthetic --layout=chexpert --out=/tmp/manual --seed=0 [--num_cases=300]

Then build it like the real download, e.g.
  python -m data_builders.build chexpert_micle --manual_dir=/tmp/manual --data_dir=/tmp/tfds
"""

from __future__ import annotations

from absl import app, flags, logging

from data_builders import synthetic

LAYOUTS = ("chexpert", "ham10000", "nih", "teledermatology")


def write(
  layout: str,
  out: str,
  *,
  seed: int = 0,
  num_cases: int = 300,
  image_size: int = 96,
  num_valid_cases: int = -1,
  test_fraction: float = 0.2,
):
  """Writes `layout` (one of `LAYOUTS`) to `out`; returns the writer's counts.

  `num_cases` is the number of patients (chexpert, nih), lesions (ham10000) or home-clinic cases
  (teledermatology, with a quarter as many external-clinic cases);
  `num_valid_cases` the CheXpert validation patients (-1: num_cases // 10); `test_fraction` the
  NIH patients in the test list.
  """
  common = dict(seed=seed, image_size=image_size)
  if layout == "chexpert":
    valid = None if num_valid_cases < 0 else num_valid_cases
    return synthetic.write_chexpert(out, num_patients=num_cases, num_valid_patients=valid, **common)
  if layout == "ham10000":
    return synthetic.write_ham10000(out, num_lesions=num_cases, **common)
  if layout == "teledermatology":
    return synthetic.write_teledermatology(
      out, num_cases=num_cases, num_external_cases=num_cases // 4, **common
    )
  if layout == "nih":
    return synthetic.write_nih(out, num_patients=num_cases, test_fraction=test_fraction, **common)
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  counts = write(
    values.layout,
    values.out,
    seed=values.seed,
    num_cases=values.num_cases,
    image_size=values.image_size,
    num_valid_cases=values.num_valid_cases,
    test_fraction=values.test_fraction,
  )
  logging.info("Wrote synthetic %s to %s: %s", values.layout, values.out, counts)
  print(counts)


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing this module defines none."""
  flags.DEFINE_enum("layout", None, list(LAYOUTS), "Download layout.", required=True)
  flags.DEFINE_string("out", None, "Folder to write (the builder's manual dir).", required=True)
  flags.DEFINE_integer("seed", 0, "Same seed -> byte-identical files.")
  flags.DEFINE_integer(
    "num_cases", 300, "Patients (chexpert, nih), lesions (ham10000) or cases (teledermatology)."
  )
  flags.DEFINE_integer("image_size", 96, "Typical image height in pixels.")
  flags.DEFINE_integer("num_valid_cases", -1, "chexpert: validation patients (-1: num_cases/10).")
  flags.DEFINE_float("test_fraction", 0.2, "nih: fraction of patients in test_list.txt.")


if __name__ == "__main__":
  define_flags()
  app.run(_main)
