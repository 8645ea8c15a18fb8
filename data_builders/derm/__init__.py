"""TFDS builder `derm` (HAM10000, PAD-UFES-20, generic case CSV); importing registers it."""

from data_builders.derm.derm import Derm, DermConfig
from data_builders.derm.sources import HAM10000_CLASSES, PAD_UFES20_CLASSES

__all__ = ["Derm", "DermConfig", "HAM10000_CLASSES", "PAD_UFES20_CLASSES"]
