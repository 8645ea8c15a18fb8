"""Builds the native convolution (`make native`): oneDNN from PyPI, then onednn_conv.cc against it.

oneDNN 3.2 comes from two wheels of one release, fetched with `pip download` (nothing is installed
in the venv) and checked against the SHA-256 digests pinned here: the library from
`onednn-cpu-gomp` (built for the CPU with GNU OpenMP; later oneDNN wheels need Intel's SYCL runtime,
several hundred MB) and its C++ headers from `onednn-devel-cpu-gomp`, the same build's development
files. The headers' version is checked at compile time (a `static_assert` on `DNNL_VERSION_*`) and
the library's at load time (`native_conv` refuses a library whose oneDNN differs from its headers).
The link is made with `-z defs`, so a missing symbol fails the build rather than a run. The library
is copied next to ours, from the verified wheel at every build, and found through `$ORIGIN`, so the
package directory is self-contained. The wheels and headers are cached under `build/onednn`, by
name and version.

Where this cannot work (not Linux on x86-64, no network, no C++ compiler), it prints why, removes
any stale build and exits 0: `layers.Conv` then keeps XLA's convolution (micle_jax/models/layers.py).

  python micle_jax/models/native/build.py [--cxx=g++]
"""

import argparse
import dataclasses
import hashlib
import pathlib
import platform
import shutil
import subprocess
import sys
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "onednn_conv.cc"
OUTPUT = HERE / "libmicle_onednn.so"
ONEDNN = HERE / "libdnnl.so.3"
CACHE = HERE.parents[2] / "build" / "onednn"
_FALLBACK = "so the CPU uses XLA's convolutions (the same results, at about half the speed)"


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A wheel of PyPI, pinned by version and by the SHA-256 digest PyPI lists for its file."""

  name: str
  version: str
  sha256: str

  @property
  def pin(self) -> str:
    return f"{self.name}=={self.version}"

  @property
  def filename(self) -> str:
    return f"{self.name.replace('-', '_')}-{self.version}-py2.py3-none-manylinux1_x86_64.whl"


ONEDNN_VERSION = (3, 2)  # what both wheels hold; the C++ asserts it of the headers
LIBRARY_WHEEL = Wheel(
  "onednn-cpu-gomp", "2023.2.0", "2f22a54d6a890ed14bfa185d42a4be65d8b5b1df85dc1f0f3a9abe31620416fb"
)
HEADERS_WHEEL = Wheel(
  "onednn-devel-cpu-gomp",
  "2023.2.0",
  "9763c69e8c907e119056bd52ad918ca84ac9ba939d130a99dfa95ccca3e5e284",
)


class BuildError(RuntimeError):
  """A step of the build failed; the message says which and why."""


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _wheel(wheel: Wheel) -> pathlib.Path:
  """The wheel's verified file in the cache, downloaded from PyPI if it is not there.

  A file whose digest is not the pinned one is deleted and named in the error.
  """
  path = CACHE / "wheels" / wheel.filename
  if not path.exists():
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(path.parent), wheel.pin]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not path.exists():
      raise BuildError(f"`pip download {wheel.pin}` failed: {done.stderr.strip()[-300:]}")
  digest = _digest(path)
  if digest != wheel.sha256:
    path.unlink()
    raise BuildError(
      f"{path.name}: SHA-256 {digest} is not the pinned {wheel.sha256}; deleted, not used"
    )
  return path


def _members(z: zipfile.ZipFile, inside: str) -> dict[str, str]:
  """The files of a wheel under `<name>.data/data/<inside>/`, by their path below it."""
  out = {}
  for member in z.namelist():
    _, sep, rest = member.partition(".data/data/")
    if sep and rest.startswith(inside + "/") and not member.endswith("/"):
      out[rest[len(inside) + 1 :]] = member
  if not out:
    raise BuildError(f"{z.filename} has no {inside}/")
  return out


def fetch() -> pathlib.Path:
  """oneDNN's headers (cached by wheel and version) and library (copied to ONEDNN) from the
  verified wheels; returns the include path."""
  include = CACHE / f"include-{HEADERS_WHEEL.name}-{HEADERS_WHEEL.version}"
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
    with zipfile.ZipFile(_wheel(HEADERS_WHEEL)) as z:
      files = _members(z, "include")
      partial = include.with_name(include.name + ".partial")
      shutil.rmtree(partial, ignore_errors=True)
      for path, member in files.items():
        (partial / path).parent.mkdir(parents=True, exist_ok=True)
        (partial / path).write_bytes(z.read(member))
      shutil.rmtree(include, ignore_errors=True)
      partial.rename(include)
  with zipfile.ZipFile(_wheel(LIBRARY_WHEEL)) as z:
    # libdnnl.so, .so.3 and .so.3.2 are three copies of one file (wheels have no links)
    libs = {p: m for p, m in _members(z, "lib").items() if p.startswith("libdnnl.so.3")}
    if not libs:
      raise BuildError(f"{z.filename} has no libdnnl.so.3")
    ONEDNN.write_bytes(z.read(libs[max(libs, key=len)]))
  return include


def compile_library(cxx: str, include: pathlib.Path) -> None:
  import jax  # noqa: PLC0415 (only the build needs it, for XLA's FFI headers)

  cmd = [
    cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-Wall",
    "-isystem", jax.ffi.include_dir(), "-isystem", str(include),
    str(SOURCE), "-o", str(OUTPUT),
    f"-L{HERE}", f"-l:{ONEDNN.name}", "-Wl,-rpath,$ORIGIN", "-Wl,-z,defs",
    f"-DMICLE_ONEDNN_MAJOR={ONEDNN_VERSION[0]}", f"-DMICLE_ONEDNN_MINOR={ONEDNN_VERSION[1]}",
  ]  # fmt: skip
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    raise BuildError(f"{cxx} failed:\n{done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cxx", default="g++")
  args = parser.parse_args(argv)
  try:
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
      raise BuildError(f"oneDNN's wheels are for Linux on x86-64, not {platform.platform()}")
    if shutil.which(args.cxx) is None:
      raise BuildError(f"no C++ compiler {args.cxx!r} (set CXX=...)")
    include = fetch()
    print(f"building {OUTPUT.relative_to(HERE.parents[2])}", flush=True)
    compile_library(args.cxx, include)
  except BuildError as e:
    OUTPUT.unlink(missing_ok=True)
    print(f"note: the native convolution is not built, {_FALLBACK}:\n  {e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
