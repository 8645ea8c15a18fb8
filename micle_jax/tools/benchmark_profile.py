"""Where a training step's device time goes: a profiler trace, grouped by kind of work.

`profile_steps` runs a compiled step a few times under `jax.profiler.trace`, reads the trace back
with `jax.profiler.ProfileData` (no TensorBoard needed) and sums the time of every executed XLA
operation by category:

- `convolution`: convolutions, whether XLA runs them itself, hands them to cuDNN (custom calls) or
  fuses them with their bias/activation;
- `matmul`: dot products (cuBLAS/cuBLASLt calls, Triton GEMM fusions, XLA dots);
- `collective`: all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all;
- `elementwise`: every other fusion and op: BatchNorm statistics and normalisation, ReLU,
  residual additions, the optimizer update, casts, reductions;
- `copy`: copies, transposes and memory transfers that XLA did not fuse.

Operations are categorised from the compiled module's HLO text (the op name of each trace event
→ its opcode, custom-call target, or the opcodes inside its fused computation). An event without
an HLO op name (or, on GPU, one inside a CUDA graph, whose op name is the graph's) falls back to
its kernel name: an HLO fusion's name as the GPU backend spells it, else `cudnn`/`conv`/`fprop`/
`dgrad`/`wgrad` → convolution, `gemm`/`cublas`/`nvjet`/`dot` → matmul, `nccl` → collective, `memcpy`/
`memset` → copy. The time between operations on the device (launch gaps, host waits) is `idle`:
the step's wall time minus the busy time.
"""

import collections
import pathlib
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

CATEGORIES = ("convolution", "matmul", "collective", "elementwise", "copy")
_COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
  "collective-broadcast",
)
_COPIES = ("copy", "transpose", "copy-start", "copy-done", "bitcast", "dynamic-update-slice")
# Lines of a device plane that summarise or duplicate the kernels of the other lines.
_DERIVED_LINES = (
  "XLA Modules",
  "Steps",
  "XLA TraceMe",
  "Framework Ops",
  "Framework Name Scope",
  "Source code",
  "Launch Stats",
  "TensorFlow Ops",
  "TensorFlow Name Scope",
)
_TOP_OPS = 15
_MAX_NAME = 100  # cuDNN kernel names are whole C++ template instantiations

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r" ([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _category_of(opcode: str, target: str = "", inner: Iterable[str] = ()) -> str:
  """The category of one HLO instruction from its opcode, custom-call target and fused opcodes."""
  inner = set(inner)
  target = target.lower()
  if opcode == "convolution" or "convolution" in inner or "conv" in target:
    return "convolution"
  if opcode == "dot" or "dot" in inner or any(k in target for k in ("gemm", "matmul", "cublas")):
    return "matmul"
  base = opcode.removesuffix("-start").removesuffix("-done")
  if base in _COLLECTIVES or any(c in inner for c in _COLLECTIVES):
    return "collective"
  if opcode in _COPIES or (inner and inner <= {"copy", "transpose", "parameter", "bitcast"}):
    return "copy"
  return "elementwise"


def hlo_op_categories(hlo_text: str) -> dict[str, str]:
  """Maps every instruction name of an HLO module's text to its category (see module doc)."""
  opcodes: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes in it
  instructions: list[tuple[str, str, str, str | None]] = []  # name, opcode, target, called
  computation = None
  for line in hlo_text.splitlines():
    if (header := _COMPUTATION.match(line)) and " = " not in line:
      computation = header.group(1)
      continue
    if not (inst := _INSTRUCTION.match(line)):
      continue
    name, rest = inst.groups()
    if not (op := _OPCODE.search(" " + rest)):
      continue
    opcode = op.group(1)
    if computation is not None:
      opcodes[computation].add(opcode)
    target = _TARGET.search(rest)
    called = _CALLS.search(rest)
    instructions.append(
      (name, opcode, target.group(1) if target else "", called.group(1) if called else None)
    )
  categories = {}
  for name, opcode, target, called in instructions:
    category = _category_of(opcode, target, opcodes.get(called, ()) if called else ())
    words = set(re.split(r"[_.\-]", name)) - {"fusion", "loop", "input"}
    if category == "elementwise" and opcode == "fusion" and words & {"copy", "transpose"}:
      if words <= {"copy", "transpose", "bitcast"} | {w for w in words if w.isdigit()}:
        category = "copy"  # XLA names fusions after what they do: transpose_copy_fusion.3
    categories[name] = category
  return categories


def kernel_category(kernel_name: str) -> str:
  """Best-effort category of a device kernel that carries no HLO op name."""
  name = kernel_name.lower()
  if any(k in name.replace("convert", "") for k in ("cudnn", "conv", "fprop", "dgrad", "wgrad")):
    return "convolution"
  if any(k in name for k in ("gemm", "cublas", "matmul", "dot", "nvjet")):
    return "matmul"
  if "nccl" in name or any(c.replace("-", "_") in name for c in _COLLECTIVES):
    return "collective"
  if any(k in name for k in ("memcpy", "memset", "copy", "transpose")):
    return "copy"
  return "elementwise"


def _stats(event: Any) -> dict[str, Any]:
  try:
    return dict(event.stats)
  except Exception:  # noqa: BLE001 - stats of unknown types are skipped, not fatal.
    return {}


def _is_device_plane(plane: Any) -> bool:
  """An accelerator's timeline (`/device:GPU:0`, `/device:TPU:0`), not a custom plane."""
  return plane.name.startswith("/device:") and "CUSTOM" not in plane.name


def _device_events(profile: Any, module_name: str) -> tuple[list[tuple[str, float, dict]], str]:
  """(name, seconds, stats) of the executed operations, and where they were found.

  Accelerator planes (`/device:GPU:n`, `/device:TPU:n`) come first: their kernels/ops, without
  the summary lines. Without one (CPU), the host threads' XLA operations of `module_name`.
  """
  events = []
  for plane in profile.planes:
    if not _is_device_plane(plane):
      continue
    lines = [line for line in plane.lines if line.name not in _DERIVED_LINES]
    ops_lines = [line for line in lines if line.name == "XLA Ops"]
    for line in ops_lines or lines:
      for event in line.events:
        events.append((event.name, event.duration_ns * 1e-9, _stats(event)))
  if events:
    return events, "device_planes"
  for plane in profile.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      for event in line.events:
        stats = _stats(event)
        if stats.get("hlo_module") == module_name and "hlo_op" in stats:
          events.append((event.name, event.duration_ns * 1e-9, stats))
  return events, "host_threads"


def summarize(
  events: list[tuple[str, float, dict]],
  categories: dict[str, str],
  *,
  steps: int,
  devices: int,
) -> dict[str, Any]:
  """Per-step, per-device seconds by category and the operations that take longest."""
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  by_op: dict[str, float] = collections.defaultdict(float)
  op_category: dict[str, str] = {}
  # GPU kernel names spell an HLO fusion's name with "_" for "." and "-": loop_add_fusion_2.
  by_kernel_name = {re.sub(r"[.\-]", "_", k): v for k, v in categories.items()}
  for name, seconds, stats in events:
    op = str(stats.get("hlo_op") or name)
    if op.startswith("command_buffer"):  # A CUDA graph of many ops: its kernels tell them apart.
      op = name
    category = (
      categories.get(op)
      or categories.get(name)
      or by_kernel_name.get(name)
      or kernel_category(name)
    )
    op = op if len(op) <= _MAX_NAME else op[: _MAX_NAME - 1] + "…"
    by_category[category] += seconds
    by_op[op] += seconds
    op_category[op] = category
  scale = 1.0 / (steps * devices)
  top = sorted(by_op.items(), key=lambda kv: -kv[1])[:_TOP_OPS]
  return {
    "busy_s": sum(by_category.values()) * scale,
    "by_category_s": {k: v * scale for k, v in by_category.items()},
    "top_ops": [{"op": op, "category": op_category[op], "s": s * scale} for op, s in top],
  }


def profile_steps(
  compiled: Any,
  step: Callable[[], Any],
  *,
  steps: int,
  log_dir: str,
  num_devices: int,
) -> dict[str, Any]:
  """Traces `steps` calls of `step` and returns the step's device time by category.

  Args:
    compiled: the compiled step (`jit(...).lower(...).compile()`), for its HLO text and name.
    step: runs one more step and returns something to block on (it threads the donated state).
    steps: steps to trace.
    log_dir: where the trace goes (`*.xplane.pb`, readable by TensorBoard's profile plugin).
    num_devices: devices the step runs on; times are per device.

  Returns:
    {"trace_dir", "steps", "source", "num_devices", "step_time_s" (mean wall time while tracing), "busy_s",
    "idle_s", "by_category_s", "fraction" (of busy time), "top_ops"}; see docs/benchmark.md.
  """
  hlo = compiled.as_text()
  module_name = hlo.split(",", 1)[0].removeprefix("HloModule ").strip()
  jax.block_until_ready(step())
  with jax.profiler.trace(log_dir):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step())
    wall = (time.perf_counter() - start) / steps
  traces = sorted(pathlib.Path(log_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise RuntimeError(f"jax.profiler.trace wrote no *.xplane.pb under {log_dir}")
  profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
  events, source = _device_events(profile, module_name)
  devices = num_devices
  if source == "device_planes":
    devices = sum(1 for plane in profile.planes if _is_device_plane(plane))
  summary = summarize(events, hlo_op_categories(hlo), steps=steps, devices=max(devices, 1))
  busy = summary["busy_s"]
  return {
    "trace_dir": str(traces[-1].parent),
    "steps": steps,
    "source": source,
    "num_devices": max(devices, 1),
    "step_time_s": wall,
    "idle_s": max(wall - busy, 0.0),
    **summary,
    "fraction": {k: (v / busy if busy > 0 else None) for k, v in summary["by_category_s"].items()},
  }
