"""Writes a synthetic dataset in a real download layout.

  python -m data_builders.synthetic --layout=chexpert --out=/tmp/manual --seed=0 [--num_cases=300]

Then build it like the real download, e.g.
  python -m data_builders.build chexpert_micle --manual_dir=/tmp/manual --data_dir=/tmp/tfds
"""

from __future__ import annotations

from absl import app, flags, logging

from data_builders import synthetic

_LAYOUT = flags.DEFINE_enum("layout", None, ["chexpert", "ham10000", "nih"], "Download layout.")
_OUT = flags.DEFINE_string("out", None, "Folder to write (the builder's manual dir).")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed -> byte-identical files.")
_NUM_CASES = flags.DEFINE_integer(
  "num_cases", 300, "Patients (chexpert, nih) or lesions (ham10000)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 96, "Typical image height in pixels.")
flags.mark_flags_as_required(["layout", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common = dict(seed=_SEED.value, image_size=_IMAGE_SIZE.value)
  if _LAYOUT.value == "chexpert":
    counts = synthetic.write_chexpert(_OUT.value, num_patients=_NUM_CASES.value, **common)
  elif _LAYOUT.value == "ham10000":
    counts = synthetic.write_ham10000(_OUT.value, num_lesions=_NUM_CASES.value, **common)
  else:
    counts = synthetic.write_nih(_OUT.value, num_patients=_NUM_CASES.value, **common)
  logging.info("Wrote synthetic %s to %s: %s", _LAYOUT.value, _OUT.value, counts)
  print(counts)


if __name__ == "__main__":
  app.run(main)
