"""Our pretraining step beside the same step in PyTorch eager, timed in one run (`--vs_torch`).

The PyTorch side is `torch_resnet.SimCLRResNet` of the config's architecture (the module the
export loads, so the same convolutions, BatchNorms, heads and padding), in train mode, channels
last, float32, fed the same images: both views of the batch in one forward pass, the NT-Xent loss
at the config's temperature over all 2·batch views, the monitor head's loss, backward, and an SGD
step with momentum 0.9 (LARS is not part of PyTorch; its cost is a few elementwise passes over
the weights). The two are timed alternately, `steps` steps each per round after one untimed
step, so that a change in the machine's speed during the run reaches both and neither is timed
on the step right after the other's. `ratio` is PyTorch's step time over ours: above 1
means micle_jax is faster.

PyTorch is an optional extra (`pip install -r requirements-bench.txt`); without it, `--vs_torch`
stops with that command.
"""

import dataclasses
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from micle_jax import specs
from micle_jax.data import tasks
from micle_jax.tools import benchmark_train, export_torch

INSTALL_HINT = "pip install -r requirements-bench.txt  # PyTorch, CPU build"


class TorchMissingError(RuntimeError):
  """--vs_torch without PyTorch installed."""


def check_torch() -> None:
  """Raises `TorchMissingError`, naming the command that installs PyTorch, if it is missing."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise TorchMissingError(
      f"--vs_torch needs PyTorch, which cannot be imported ({e}): {INSTALL_HINT}"
    ) from e


def _torch_step(spec: specs.PretrainSpec, num_classes: int, loss_kind: str, threads: int):
  """(step(view1, view2, targets) -> loss, torch version) for the PyTorch side."""
  import torch
  import torch.nn.functional as F

  from micle_jax.tools import torch_resnet

  torch.manual_seed(spec.seed)
  torch.set_num_threads(threads)
  model_spec = dataclasses.replace(spec.model, num_classes=num_classes)
  arch = torch_resnet.Architecture.from_dict(export_torch.architecture(model_spec))
  model = torch_resnet.SimCLRResNet(arch).to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def step(view1, view2, targets):
    n = view1.shape[0]
    out = model(torch.cat([view1, view2]))
    z = F.normalize(out["projection"], dim=1)
    logits = z @ z.T / spec.temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positives = torch.arange(2 * n).roll(n)
    loss = F.cross_entropy(logits, positives)
    if loss_kind == "multilabel":
      loss = loss + F.binary_cross_entropy_with_logits(out["logits"][:n], targets)
    elif loss_kind == "multiclass":
      loss = loss + F.cross_entropy(out["logits"][:n], targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  return step, torch.__version__


def _to_torch(batch: dict[str, jax.Array], loss_kind: str):
  import torch

  def images(key: str):
    host = np.array(jax.device_get(batch[key]))  # NHWC, a writable copy
    return torch.from_numpy(host).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  targets = None
  if loss_kind == "multilabel":
    targets = torch.from_numpy(np.array(jax.device_get(batch["targets"])))
  elif loss_kind == "multiclass":
    targets = torch.from_numpy(np.array(jax.device_get(batch["label"]))).long()
  return images("view1"), images("view2"), targets


def vs_torch(
  config: ml_collections.ConfigDict,
  *,
  steps: int = 3,
  rounds: int = 3,
  warmup: int = 1,
  threads: int | None = None,
  num_classes: int | None = None,
) -> dict[str, Any]:
  """Times our step and PyTorch's on the same images, alternating; see docs/benchmark.md.

  Args:
    config: a pretraining config.
    steps: steps of each per round.
    rounds: rounds (ours, then PyTorch's, each round).
    warmup: untimed steps of each before the first round (after compiling ours).
    threads: PyTorch's intra-op threads (default: every core of the host, as XLA uses them).
    num_classes: classes of a multiclass monitor head (default as in `benchmark_train`).

  Returns:
    The `vs_torch` section of the benchmark's JSON.
  """
  check_torch()
  if steps < 1 or rounds < 1 or warmup < 0:
    raise ValueError(f"steps={steps} and rounds={rounds} must be >= 1, warmup={warmup} >= 0")
  if jax.process_count() > 1:
    raise ValueError("--vs_torch runs on one host")
  spec, mesh, classes, run, batch = benchmark_train.prepare(config, num_classes)
  compiled = run.step_fn.lower(run.state, batch).compile()
  threads = threads or os.cpu_count() or 1
  loss_kind = tasks.get(spec.labels.task).loss
  torch_step, torch_version = _torch_step(spec, classes, loss_kind, threads)
  torch_batch = _to_torch(batch, loss_kind)

  state = run.state
  for _ in range(warmup):
    state, _ = jax.block_until_ready(compiled(state, batch))
    torch_step(*torch_batch)
  ours, theirs = [], []
  torch_loss = loss = None
  for _ in range(rounds):
    # Each side's turn starts with an untimed step: the first step after the other library's
    # runs measurably slower (1-3 s of ~10 s at ResNet-50, 224 px) whichever side it is, from
    # sharing the process (threads, allocator, caches), not from either library's own step.
    state, _ = jax.block_until_ready(compiled(state, batch))
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = jax.block_until_ready(compiled(state, batch))
      ours.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    torch_step(*torch_batch)
    for _ in range(steps):
      start = time.perf_counter()
      torch_loss = torch_step(*torch_batch)
      theirs.append(time.perf_counter() - start)
  images = 2 * spec.batch_size
  ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
  return {
    "images_per_step": images,
    "image_size": spec.augment.image_size,
    "model": config.model.to_dict(),
    "rounds": rounds,
    "steps_per_round": steps,
    "micle_jax": {
      "step_time_s": ours_s,
      "images_per_s": images / ours_s,
      "step_times_s": ours,
      "num_devices": mesh.devices.size,
      "final_loss": loss,
    },
    "torch": {
      "step_time_s": theirs_s,
      "images_per_s": images / theirs_s,
      "step_times_s": theirs,
      "version": torch_version,
      "threads": threads,
      "memory_format": "channels_last",
      "optimizer": "SGD, momentum 0.9",
      "final_loss": torch_loss,
    },
    "ratio": theirs_s / ours_s,
  }
