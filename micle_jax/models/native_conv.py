"""k×k convolutions computed by oneDNN on the CPU, as XLA FFI custom calls.

XLA's CPU backend computes convolutions, and above all their gradients, at a fraction of the
speed of oneDNN, the library PyTorch's CPU convolutions use (docs/benchmark.md, "The native
convolution"). `conv` hands the forward pass and both gradients of an NHWC × HWIO float32
convolution to oneDNN through three custom calls compiled from `native/onednn_conv.cc`
(`make native` builds it into `native/libmicle_onednn.so`, against oneDNN 3 from PyPI; it needs a
C++ compiler and Linux on x86-64: `native/build.py`). Without the library, `available()` is False
and `layers.Conv` keeps XLA's convolution, with the same results to float rounding.

On CPUs without AVX-512 the weight gradient is not oneDNN's convolution but matrix products over
the image's patches (`weight_gradient`; about twice as fast there, docs/benchmark.md).

Under `jax.jit` with a batch sharded over devices, a custom call would otherwise be replicated.
Each of the three calls therefore has a partitioning rule (`custom_partitioning`): the forward
pass and the input gradient run per device on its part of the batch; the weight gradient runs
per device and is summed over the batch's mesh axes, as XLA does with its own convolution.

Every call pads (k - 1) // 2 before and the rest after: SimCLR's fixed padding for strided
convolutions and SAME for stride 1 (`layers.Conv`'s rule), so the output side is ⌈side / s⌉.

Each call runs on `usable_cores() // local CPU devices` oneDNN threads (the cores this process
may use, after its CPU affinity and container quota). The library is refused when the oneDNN it
loads is not the release its headers were (`NativeConvError`). `describe()` says which path a
run's convolutions take, for the run's records.

Set `MICLE_NATIVE_CONV=0` to keep XLA's convolution even where the library exists.
"""

import contextlib
import ctypes
import functools
import os
import pathlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from micle_jax import host

LIBRARY = pathlib.Path(__file__).parent / "native" / "libmicle_onednn.so"
_TARGETS = ("forward", "backward_data", "backward_weights")
_PREFIX = "micle_onednn_conv_"
ENV_SWITCH = "MICLE_NATIVE_CONV"

_lock = threading.Lock()
_library: list[ctypes.CDLL | None] = []  # [] until first asked; [None] when absent
_disabled: list[bool] = []
# How the weight gradient is computed (the C++ `Method`): "auto" lets the library choose (matrix
# products on CPUs without AVX-512, else oneDNN's kernel); "onednn" and "gemm" force one.
WEIGHT_GRADIENT_METHODS = ("auto", "onednn", "gemm")
_weight_gradient: list[str] = []


class NativeConvError(RuntimeError):
  """The library exists but cannot be loaded or registered."""


def _load() -> ctypes.CDLL | None:
  with _lock:
    if not _library:
      lib = None
      if LIBRARY.exists():
        try:
          lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
        except OSError as e:
          raise NativeConvError(
            f"{LIBRARY} exists but does not load ({e}); rebuild it with `make native`, or "
            f"delete it (or set {ENV_SWITCH}=0) to use XLA's convolution"
          ) from e
        _check_versions(lib)
        for target in _TARGETS:
          name = _PREFIX + target
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
      _library.append(lib)
    return _library[0]


def _versions(lib: ctypes.CDLL) -> tuple[str, str]:
  """(oneDNN of the headers the library was compiled with, oneDNN of the library loaded)."""
  v = (ctypes.c_int64 * 6)()
  lib.micle_onednn_versions(v)
  return ".".join(map(str, v[:3])), ".".join(map(str, v[3:]))


def _check_versions(lib: ctypes.CDLL) -> None:
  headers, loaded = _versions(lib)
  if headers.rsplit(".", 1)[0] != loaded.rsplit(".", 1)[0]:
    raise NativeConvError(
      f"{LIBRARY} was compiled with oneDNN {headers}'s headers but loads oneDNN {loaded}; "
      f"rebuild it with `make native` (or set {ENV_SWITCH}=0 to use XLA's convolution)"
    )


def describe() -> dict[str, str | int]:
  """Which path the CPU's convolutions take now, for a run's records: {"convolution": "native"
  or "xla", and for native: "onednn" (library version), "onednn_isa", "threads" per call,
  "weight_gradient" ("matrix products" or "onednn", as `auto` resolves on this CPU)}."""
  if not available():
    return {"convolution": "xla"}
  lib = _load()
  _, loaded = _versions(lib)
  isa = ctypes.create_string_buffer(64)
  lib.micle_onednn_isa(isa, 64)
  probe = (8, 8, 8, 8, 8, 3, 1, 1)  # any ungrouped shape: `auto` depends only on the CPU
  gemm = implementation("backward_weights", probe) == "patches+sgemm"
  return {
    "convolution": "native",
    "onednn": loaded,
    "onednn_isa": isa.value.decode(),
    "threads": _threads(),
    "weight_gradient": "matrix products" if gemm else "onednn",
  }


def built() -> bool:
  """Whether the library is built and not turned off by MICLE_NATIVE_CONV=0; unlike `available`,
  loads nothing, so it may be asked before JAX starts its backends."""
  return LIBRARY.exists() and os.environ.get(ENV_SWITCH, "1") != "0"


def available() -> bool:
  """Whether `conv` can run: the library is built and neither the environment
  (MICLE_NATIVE_CONV=0) nor `disabled()` turns it off."""
  if _disabled and _disabled[-1]:
    return False
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return False
  return _load() is not None


@contextlib.contextmanager
def disabled(value: bool = True) -> Iterator[None]:
  """Models traced inside do not use the native convolution (tests, the benchmark's A/B)."""
  _disabled.append(value)
  try:
    yield
  finally:
    _disabled.pop()


@contextlib.contextmanager
def weight_gradient(method: str) -> Iterator[None]:
  """Models traced inside compute weight gradients by `method`, one of WEIGHT_GRADIENT_METHODS
  (tests and the benchmark's comparisons; "gemm" applies to ungrouped convolutions only)."""
  if method not in WEIGHT_GRADIENT_METHODS:
    raise ValueError(f"weight_gradient: {method!r} is not one of {WEIGHT_GRADIENT_METHODS}")
  _weight_gradient.append(method)
  try:
    yield
  finally:
    _weight_gradient.pop()


def _method() -> int:
  return WEIGHT_GRADIENT_METHODS.index(_weight_gradient[-1] if _weight_gradient else "auto")


def implementation(kind: str, shape: tuple[int, ...], threads: int | None = None) -> str:
  """The implementation `kind` ("forward", "backward_data", "backward_weights") runs for
  `shape` = (n, h, w, c, o, k, strides, groups), e.g. "brgconv:avx2 +reorder", or
  "patches+sgemm" for the weight gradient by matrix products (under `weight_gradient`'s method)."""
  lib = _load()
  if lib is None:
    raise NativeConvError(f"{LIBRARY} is not built (`make native`)")
  dims = (ctypes.c_int64 * 8)(*shape)
  out = ctypes.create_string_buffer(256)
  lib.micle_onednn_conv_impl(
    _TARGETS.index(kind),
    dims,
    ctypes.c_int64(threads or _threads()),
    ctypes.c_int64(_method()),
    out,
    256,
  )
  return out.value.decode()


def ffi_flops(eqn) -> float:
  """FLOPs of a jaxpr equation if it is one of this module's custom calls, else 0: each of the
  three is 2 × output-gradient (or output) elements × k·k·C/groups, as the convolution."""
  target = eqn.params.get("target_name", "") if eqn.primitive.name == "ffi_call" else ""
  if not target.startswith(_PREFIX):
    return 0.0
  kind = target[len(_PREFIX) :]
  shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
  # forward (x, w) -> y; backward_data (dy, w) -> dx; backward_weights (x, dy) -> dw
  out, kernel = {"forward": (2, 1), "backward_data": (0, 1), "backward_weights": (1, 2)}[kind]
  k, _, per_group, _ = shapes[kernel]
  return 2.0 * float(np.prod(shapes[out])) * k * k * per_group


def _threads() -> int:
  """oneDNN threads per call: the usable cores each local CPU device has (one per core: 1)."""
  return max(1, host.usable_cores() // max(1, len(jax.local_devices(backend="cpu"))))


def output_side(side: int, strides: int) -> int:
  """⌈side / s⌉: the output side under `layers.Conv`'s padding."""
  return (side - 1) // strides + 1


def _call(
  target: str,
  shape: tuple[int, ...],
  a: jax.Array,
  b: jax.Array,
  strides: int,
  groups: int,
  **attributes: np.int64,
) -> jax.Array:
  if _load() is None:  # registers the targets on first use
    raise NativeConvError(f"{LIBRARY} is not built (`make native`)")
  return jax.ffi.ffi_call(_PREFIX + target, jax.ShapeDtypeStruct(shape, jnp.float32))(
    a,
    b,
    strides=np.int64(strides),
    groups=np.int64(groups),
    threads=np.int64(_threads()),
    **attributes,
  )


def _local_forward(strides, groups, x, w):
  n, h, width, _ = x.shape
  shape = (n, output_side(h, strides), output_side(width, strides), w.shape[3])
  return _call("forward", shape, x, w, strides, groups)


def _local_backward_data(strides, groups, image_side, dy, w):
  n = dy.shape[0]
  shape = (n, image_side[0], image_side[1], w.shape[2] * groups)
  return _call("backward_data", shape, dy, w, strides, groups)


def _local_backward_weights(strides, groups, kernel_shape, method, x, dy):
  return _call("backward_weights", kernel_shape, x, dy, strides, groups, method=np.int64(method))


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
  """The mesh axes an operand's batch (leading) dimension is sharded over, or None."""
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _image(mesh, batch) -> NamedSharding:
  return NamedSharding(mesh, P(batch, None, None, None))


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _other_factors(sharding_rule: str) -> tuple[str, ...]:
  """The factors of a sharding rule other than the batch's `n`: these stay replicated."""
  names = sharding_rule.replace(",", " ").replace("->", " ").split()
  return tuple(dict.fromkeys(f for f in names if f != "n"))


def _image_by_kernel(local, num_static: int, sharding_rule: str):
  """`local(*static, image, kernel) -> image` under `custom_partitioning`: the image operand's
  batch sharding is kept for the result, the kernel is replicated, and each device computes its
  part of the batch alone."""
  wrapped = custom_partitioning(local, static_argnums=tuple(range(num_static)))

  def infer(*args):
    mesh, arg_shapes, _ = args[num_static:]
    return _image(mesh, _batch_axes(arg_shapes[0].sharding))

  def partition(*args):
    static, (mesh, arg_shapes, _) = args[:num_static], args[num_static:]
    batch = _batch_axes(arg_shapes[0].sharding)
    lower = functools.partial(local, *static)
    return mesh, lower, _image(mesh, batch), (_image(mesh, batch), _replicated(mesh))

  wrapped.def_partition(
    infer_sharding_from_operands=infer,
    partition=partition,
    sharding_rule=sharding_rule,
    need_replication_factors=_other_factors(sharding_rule),
  )
  return wrapped


# Forward, y from (x, w); input gradient, dx from (dy, w).
_forward = _image_by_kernel(_local_forward, 2, "n h w c, a b d o -> n i j o")
_backward_data = _image_by_kernel(_local_backward_data, 3, "n i j o, a b d o -> n h w c")


# Weight gradient: dw from (x, dy). Per device on its part of the batch, then summed.
@functools.partial(custom_partitioning, static_argnums=(0, 1, 2, 3))
def _backward_weights(strides, groups, kernel_shape, method, x, dy):
  return _local_backward_weights(strides, groups, kernel_shape, method, x, dy)


def _backward_weights_infer(strides, groups, kernel_shape, method, mesh, arg_shapes, result_shape):
  del strides, groups, kernel_shape, method, arg_shapes, result_shape
  return _replicated(mesh)


def _backward_weights_partition(
  strides, groups, kernel_shape, method, mesh, arg_shapes, result_shape
):
  del result_shape
  batch = _batch_axes(arg_shapes[0].sharding)

  def lower(x, dy):
    dw = _local_backward_weights(strides, groups, kernel_shape, method, x, dy)
    return jax.lax.psum(dw, batch) if batch else dw

  return mesh, lower, _replicated(mesh), (_image(mesh, batch), _image(mesh, batch))


_WEIGHTS_RULE = "n h w c, n i j o -> a b d o"
_backward_weights.def_partition(
  infer_sharding_from_operands=_backward_weights_infer,
  partition=_backward_weights_partition,
  sharding_rule=_WEIGHTS_RULE,
  reduction_factors=("n",),
  need_replication_factors=_other_factors(_WEIGHTS_RULE),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: int, groups: int = 1) -> jax.Array:
  """NHWC × HWIO float32 convolution with `layers.Conv`'s padding, forward and gradients by
  oneDNN; equal to `lax.conv_general_dilated` of the same padding to float rounding."""
  return _forward(strides, groups, x, kernel)


def _conv_forward(x, kernel, strides, groups):
  return _forward(strides, groups, x, kernel), (x, kernel)


def _conv_backward(strides, groups, residuals, dy):
  x, kernel = residuals
  dx = _backward_data(strides, groups, (x.shape[1], x.shape[2]), dy, kernel)
  dw = _backward_weights(strides, groups, tuple(kernel.shape), _method(), x, dy)
  return dx, dw


conv.defvjp(_conv_forward, _conv_backward)
