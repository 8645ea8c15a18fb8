"""CheXpert builder `chexpert_micle` (importing this package registers it with TFDS)."""

from data_builders.chexpert import labels
from data_builders.chexpert.chexpert import ChexpertMicle

__all__ = ["ChexpertMicle", "labels"]
