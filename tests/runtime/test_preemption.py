"""StopRequest: SIGTERM in one process stops it; with several processes all stop at one step."""

import os
import signal

import pytest
from jax.experimental import multihost_utils

from micle_jax.runtime import preemption


def test_single_process_stops_at_the_first_check_after_sigterm():
  with preemption.StopRequest() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(2)
  # The previous handler is back: the default one would end the test process.
  assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_processes_share_sigterm_every_sync_steps_only(monkeypatch):
  gathered = []

  def fake_allgather(flag):
    gathered.append(flag)
    return [flag, 0]  # this process, and a peer that was not signalled

  def no_preemption_service(step):
    raise RuntimeError("no preemption service")

  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no_preemption_service)
  with preemption.StopRequest(sync_every_steps=4) as stop:
    assert [stop.should_stop(step) for step in range(1, 5)] == [False] * 4
    os.kill(os.getpid(), signal.SIGTERM)
    # Signalled at step 5: every process learns it at the next multiple of 4, none earlier.
    assert [stop.should_stop(step) for step in range(5, 9)] == [False, False, False, True]
  assert gathered == [0, 1]


def test_preemption_sync_point_stops_every_process_at_once(monkeypatch):
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: [flag, 0])
  with preemption.StopRequest(sync_every_steps=100) as stop:
    assert [stop.should_stop(step) for step in (1, 2, 3)] == [False, False, True]


def test_sync_every_steps_must_be_positive():
  with pytest.raises(ValueError, match="sync_every_steps=0"):
    preemption.StopRequest(sync_every_steps=0)
