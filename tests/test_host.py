"""The machine's facts: usable cores from the CPU affinity and a container's quota."""

import os

import pytest

from micle_jax import host


@pytest.mark.parametrize(
  "files,expected",
  [
    ({}, 6),  # no quota
    ({"cpu.max": "max 100000\n"}, 6),  # cgroup v2, unlimited
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, two cores
    ({"cpu.max": "150000 100000\n"}, 2),  # one and a half: two threads, busy part-time
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 6),
    ({"cpu.max": "800000 100000\n"}, 6),  # a quota above the affinity: the affinity
  ],
)
def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch, files, expected):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert host.usable_cores(tmp_path) == expected


def test_usable_cores_follow_the_affinity_of_this_process():
  assert 1 <= host.usable_cores() <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


def test_the_cpu_is_described():
  cpu = host.cpu()
  assert set(cpu) == {"model", "machine", "isa"} and isinstance(cpu["isa"], list)
