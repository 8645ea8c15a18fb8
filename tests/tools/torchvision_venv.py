"""The venv of `make torchvision-env` (real torchvision and timm, no JAX), for the tests that
check the export and the import against them."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TORCHVISION_PYTHON = REPO / ".venv-torchvision" / "bin" / "python"


def torchvision_python() -> pathlib.Path:
  """The venv with real torchvision: $MICLE_TORCHVISION_PYTHON (CI sets it: a missing one
  fails), else `make torchvision-env`'s, else the test skips."""
  named = os.environ.get("MICLE_TORCHVISION_PYTHON")
  if named:
    if not pathlib.Path(named).is_file():
      pytest.fail(f"MICLE_TORCHVISION_PYTHON={named}: no such file; run `make torchvision-env`")
    return pathlib.Path(named)
  if not TORCHVISION_PYTHON.is_file():
    pytest.skip(
      "real torchvision and timm live in their own venv (torch 2.14.1 + torchvision 0.29.1 + "
      "timm, 5.5 GB): `make torchvision-env`, or set MICLE_TORCHVISION_PYTHON"
    )
  return TORCHVISION_PYTHON
