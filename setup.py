"""Installs micle_jax (training code) and data_builders (TFDS builders)."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name: str) -> list[str]:
  lines = (_HERE / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


setuptools.setup(
  name="micle_jax",
  version="0.1.0",
  description="SimCLR and MICLe self-supervised pretraining for medical images, in JAX/Flax.",
  long_description=(_HERE / "README.md").read_text(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=setuptools.find_packages(
    include=["micle_jax", "micle_jax.*", "data_builders", "data_builders.*", "configs"]
  ),
  package_data={"data_builders": ["*/dummy_data/**/*", "*/README.md", "*/*.txt"]},
  include_package_data=False,  # package_data lists the files (True warns for each data folder)
  install_requires=_requirements("requirements.txt"),
  extras_require={
    "test": _requirements("requirements-test.txt"),
    "notebooks": _requirements("requirements-notebooks.txt"),
  },
)
