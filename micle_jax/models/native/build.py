"""Builds the native convolution (`make native`): oneDNN from PyPI, then onednn_conv.cc against it.

oneDNN comes from two wheels, fetched with `pip download` (nothing is installed in the venv):
the library from `onednn-cpu-gomp` (oneDNN 3.2 built for the CPU with GNU OpenMP; later oneDNN
wheels need Intel's SYCL runtime, several hundred MB) and the C++ headers from `onednn-devel` (the
oldest release that has them, 3.5; the `onednn-cpu-*` wheels carry none). oneDNN's 3.x API is one
API, and the link is made with `-z defs`, so a function the 3.2 library lacks fails the build
rather than a run. The library is copied next to ours and found through `$ORIGIN`, so the package
directory is self-contained.

Where this cannot work (not Linux on x86-64, no network, no C++ compiler), it prints why, removes
any stale build and exits 0: `layers.Conv` then keeps XLA's convolution (micle_jax/models/layers.py).

  python micle_jax/models/native/build.py [--cxx=g++]
"""

import argparse
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
LIBRARY_WHEEL = "onednn-cpu-gomp==2023.2.0"
HEADERS_WHEEL = "onednn-devel==2024.2.1"
_FALLBACK = "so the CPU uses XLA's convolutions (the same results, at about half the speed)"


class BuildError(RuntimeError):
  """A step of the build failed; the message says which and why."""


def _wheel(name_pin: str) -> pathlib.Path:
  """The wheel of `name==version` in the cache, downloaded from PyPI if it is not there."""
  name, version = name_pin.split("==")
  stem = f"{name.replace('-', '_')}-{version}-"
  wheels = CACHE / "wheels"
  found = sorted(wheels.glob(stem + "*.whl"))
  if not found:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), name_pin]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(stem + "*.whl"))
    if done.returncode or not found:
      raise BuildError(f"`pip download {name_pin}` failed: {done.stderr.strip()[-300:]}")
  return found[-1]


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
  """oneDNN's headers (in the cache) and library (copied to ONEDNN); returns the include path."""
  include = CACHE / "include"
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
    with zipfile.ZipFile(_wheel(HEADERS_WHEEL)) as z:
      for path, member in _members(z, "include").items():
        (include / path).parent.mkdir(parents=True, exist_ok=True)
        (include / path).write_bytes(z.read(member))
  if not ONEDNN.exists():
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
