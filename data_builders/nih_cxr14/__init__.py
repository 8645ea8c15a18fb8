"""TFDS builder `nih_cxr14` (NIH ChestX-ray14) and its label mapping; importing registers it."""

from data_builders.nih_cxr14.labels import CHEXPERT5, NIH_FINDINGS, parse_findings, to_chexpert5
from data_builders.nih_cxr14.nih_cxr14 import NihCxr14, NihCxr14Config

__all__ = [
  "CHEXPERT5",
  "NIH_FINDINGS",
  "NihCxr14",
  "NihCxr14Config",
  "parse_findings",
  "to_chexpert5",
]
