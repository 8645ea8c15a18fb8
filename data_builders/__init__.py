"""TFDS builders for medical image datasets, grouped by patient case.

Importing a subpackage (e.g. `import data_builders.chexpert`) registers its builder with TFDS.
"""
