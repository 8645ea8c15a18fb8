"""Clean stops: SIGTERM (TPU preemption, `kill`) asks the training loop to save and exit."""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Installs a SIGTERM handler for the duration of a `with` block.

  `should_stop(step)` is True once this process got SIGTERM; with several processes it also
  consults JAX's preemption sync point, so every host stops at the same step.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

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
      flags = multihost_utils.process_allgather(int(self._event.is_set()))
      return bool(max(flags))
    return self._event.is_set()
