"""`make native`'s build script: oneDNN's files taken from the wheels, and every way it cannot
build ends in a note naming why, with no stale library left behind."""

import zipfile

import pytest

from micle_jax.models.native import build


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """The script's paths moved under tmp_path, so the repository's own build is never touched."""
  for name, path in {
    "OUTPUT": tmp_path / "libmicle_onednn.so",
    "ONEDNN": tmp_path / "libdnnl.so.3",
    "CACHE": tmp_path / "cache",
  }.items():
    monkeypatch.setattr(build, name, path)
  monkeypatch.setattr(build.platform, "system", lambda: "Linux")
  monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
  return tmp_path


def _wheel(path, name, files):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{name}.dist-info/METADATA", "Name: x\n")
    for member, data in files.items():
      z.writestr(f"{name}.data/data/{member}", data)


def test_takes_the_headers_and_one_copy_of_the_library(sandbox, monkeypatch):
  wheels = sandbox / "cache" / "wheels"
  wheels.mkdir(parents=True)
  lib_name, lib_version = build.LIBRARY_WHEEL.split("==")
  dev_name, dev_version = build.HEADERS_WHEEL.split("==")
  _wheel(
    wheels / f"{lib_name.replace('-', '_')}-{lib_version}-py2.py3-none-manylinux1_x86_64.whl",
    "onednn_cpu_gomp",
    {"lib/libdnnl.so": b"link", "lib/libdnnl.so.3": b"link", "lib/libdnnl.so.3.2": b"real"},
  )
  _wheel(
    wheels / f"{dev_name.replace('-', '_')}-{dev_version}-py2.py3-none-manylinux1_x86_64.whl",
    "onednn_devel",
    {"include/oneapi/dnnl/dnnl.hpp": b"// api", "include/dnnl.h": b"// c"},
  )
  monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
  include = build.fetch()
  assert (include / "oneapi" / "dnnl" / "dnnl.hpp").read_bytes() == b"// api"
  assert (include / "dnnl.h").exists()
  assert build.ONEDNN.read_bytes() == b"real"


def test_a_failed_download_is_named(sandbox, monkeypatch):
  class Done:
    returncode, stderr = 1, "ERROR: No matching distribution found for onednn-devel"

  monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: Done())
  with pytest.raises(build.BuildError, match="pip download onednn-devel.*No matching"):
    build.fetch()


@pytest.mark.parametrize(
  "machine,cxx,why",
  [("aarch64", "g++", "for Linux on x86-64, not"), ("x86_64", "no-such-c++", "no C++ compiler")],
)
def test_where_it_cannot_build_it_says_why_and_leaves_no_library(
  sandbox, monkeypatch, capsys, machine, cxx, why
):
  monkeypatch.setattr(build.platform, "machine", lambda: machine)
  build.OUTPUT.write_text("a stale build")
  assert build.main([f"--cxx={cxx}"]) == 0
  out = capsys.readouterr().out
  assert "not built" in out and "XLA's convolutions" in out and why in out
  assert not build.OUTPUT.exists()
