"""`make native`'s build script: oneDNN's files taken from the wheels, and every way it cannot
build ends in a note naming why, with no stale library left behind."""

import dataclasses
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


def _pinned(monkeypatch, attribute, path):
  """Pins `build.<attribute>` to the digest of the wheel at `path`."""
  wheel = getattr(build, attribute)
  monkeypatch.setattr(build, attribute, dataclasses.replace(wheel, sha256=build._digest(path)))


def _fake_wheels(sandbox, monkeypatch, *, pin=True):
  wheels = sandbox / "cache" / "wheels"
  wheels.mkdir(parents=True)
  _wheel(
    wheels / build.LIBRARY_WHEEL.filename,
    "onednn_cpu_gomp",
    {"lib/libdnnl.so": b"link", "lib/libdnnl.so.3": b"link", "lib/libdnnl.so.3.2": b"real"},
  )
  _wheel(
    wheels / build.HEADERS_WHEEL.filename,
    "onednn_devel_cpu_gomp",
    {"include/oneapi/dnnl/dnnl.hpp": b"// api", "include/dnnl.h": b"// c"},
  )
  if pin:
    _pinned(monkeypatch, "LIBRARY_WHEEL", wheels / build.LIBRARY_WHEEL.filename)
    _pinned(monkeypatch, "HEADERS_WHEEL", wheels / build.HEADERS_WHEEL.filename)
  monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
  return wheels


def test_takes_the_headers_and_one_copy_of_the_library(sandbox, monkeypatch):
  _fake_wheels(sandbox, monkeypatch)
  include = build.fetch()
  assert include.name == "include-onednn-devel-cpu-gomp-2023.2.0"  # keyed by wheel and version
  assert (include / "oneapi" / "dnnl" / "dnnl.hpp").read_bytes() == b"// api"
  assert (include / "dnnl.h").exists()
  assert build.ONEDNN.read_bytes() == b"real"


def test_a_stale_library_is_replaced_from_the_pinned_wheel(sandbox, monkeypatch):
  _fake_wheels(sandbox, monkeypatch)
  build.ONEDNN.write_bytes(b"oneDNN of another release")
  build.fetch()
  assert build.ONEDNN.read_bytes() == b"real"


def test_a_wheel_that_is_not_the_pinned_one_is_deleted_and_named(sandbox, monkeypatch):
  wheels = _fake_wheels(sandbox, monkeypatch, pin=False)  # the real pins: the fakes differ
  with pytest.raises(build.BuildError, match="SHA-256 .* is not the pinned"):
    build.fetch()
  assert not (wheels / build.HEADERS_WHEEL.filename).exists()


def test_the_pins_are_one_release_of_onednn():
  assert build.LIBRARY_WHEEL.version == build.HEADERS_WHEEL.version
  assert build.HEADERS_WHEEL.name == "onednn-devel-" + build.LIBRARY_WHEEL.name.split("-", 1)[1]
  assert all(len(w.sha256) == 64 for w in (build.LIBRARY_WHEEL, build.HEADERS_WHEEL))


def test_a_failed_download_is_named(sandbox, monkeypatch):
  class Done:
    returncode, stderr = 1, "ERROR: No matching distribution found for onednn-devel-cpu-gomp"

  monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: Done())
  with pytest.raises(build.BuildError, match="pip download onednn-devel-cpu-gomp.*No matching"):
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
