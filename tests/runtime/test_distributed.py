"""When `distributed.initialize` starts JAX's distributed runtime, and with which arguments."""

import pytest

from micle_jax.runtime import distributed

_VARS = (
  "MICLE_COORDINATOR",
  "MICLE_NUM_PROCESSES",
  "MICLE_PROCESS_ID",
  "MICLE_DISTRIBUTED",
  "TPU_WORKER_HOSTNAMES",
)


@pytest.fixture
def calls(monkeypatch):
  for name in _VARS:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def test_single_process_initialises_nothing(calls):
  assert not distributed.initialize()
  assert calls == []


def test_explicit_coordinator(calls, monkeypatch):
  monkeypatch.setenv("MICLE_COORDINATOR", "10.0.0.2:1234")
  monkeypatch.setenv("MICLE_NUM_PROCESSES", "4")
  monkeypatch.setenv("MICLE_PROCESS_ID", "3")
  assert distributed.initialize()
  assert calls == [{"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}]


def test_explicit_coordinator_names_a_missing_setting(calls, monkeypatch):
  monkeypatch.setenv("MICLE_COORDINATOR", "10.0.0.2:1234")
  monkeypatch.setenv("MICLE_NUM_PROCESSES", "4")
  with pytest.raises(ValueError, match="MICLE_PROCESS_ID"):
    distributed.initialize()
  assert calls == []


def test_auto_lets_jax_find_the_cluster(calls, monkeypatch):
  # What launch/tpu.sh sets on a Cloud TPU VM, whose hosts JAX finds from the metadata server.
  monkeypatch.setenv("MICLE_DISTRIBUTED", "auto")
  assert distributed.initialize()
  assert calls == [{}]


def test_gke_pods_initialise_unless_turned_off(calls, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
  assert distributed.initialize()
  monkeypatch.setenv("MICLE_DISTRIBUTED", "off")
  assert not distributed.initialize()
  assert calls == [{}]


def test_unknown_mode_is_an_error(calls, monkeypatch):
  monkeypatch.setenv("MICLE_DISTRIBUTED", "yes")
  with pytest.raises(ValueError, match="MICLE_DISTRIBUTED='yes'"):
    distributed.initialize()


@pytest.mark.parametrize("one_device,expected", [(False, [("jax_num_cpu_devices", 4)]), (True, [])])
def test_the_cpu_is_split_per_core_unless_the_native_convolution_is_built(
  monkeypatch, one_device, expected
):
  updates = []
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(distributed.host, "usable_cores", lambda: 4)
  assert distributed.jax.config.jax_num_cpu_devices == -1  # conftest sets XLA_FLAGS instead
  monkeypatch.setattr(distributed.jax.config, "update", lambda *kv: updates.append(kv))
  distributed.split_cpu_into_devices(64, one_device=one_device)
  assert updates == expected
