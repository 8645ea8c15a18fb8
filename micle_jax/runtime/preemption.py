"""Clean stops: SIGTERM (TPU preemption, `kill`) asks the training loop to save and exit."""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Installs a SIGTERM handler for the duration of a `with` block.

  `should_stop(step)` is True once this process got SIGTERM. With several processes every host
  must stop at the same step: JAX's preemption sync point (TPU VMs) is consulted every step, and
  the processes' own SIGTERM flags are gathered every `sync_every_steps` steps (a cross-host
  collective that waits for the device, so not every step).
  """

  def __init__(self, sync_every_steps: int = 10):
    if sync_every_steps < 1:
      raise ValueError(f"sync_every_steps={sync_every_steps} must be >= 1")
    self._event = threading.Event()
    self._previous = None
    self._sync_every_steps = sync_every_steps

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # No preemption service (jax.distributed without it).
        pass
      if step % self._sync_every_steps:
        return False
      flags = multihost_utils.process_allgather(int(self._event.is_set()))
      return bool(max(flags))
    return self._event.is_set()
