"""Threads from the CPUs really available (affinity, cgroup quota); a passive OpenMP wait policy by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cpu import available_cpus


def test_cgroup_quota_caps_the_thread_count(tmp_path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity + 4)} 100000\n")  # more than the mask allows
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1


def test_passive_wait_policy_unless_the_user_chose() -> None:
    code = "import service, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_quota_of_the_process_cgroup_and_its_ancestors(tmp_path) -> None:
    """A host-side cgroup (systemd slice, a v1 hierarchy): the quota sits on the process's own cgroup or an
    ancestor, not on the mount's root; the tightest one counts."""
    affinity = len(os.sched_getaffinity(0))
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:cpu,cpuacct:/slice/service\n0::/user.slice/app.scope\n")
    (tmp_path / "cpu,cpuacct" / "slice" / "service").mkdir(parents=True)
    assert available_cpus(tmp_path, proc) == affinity
    (tmp_path / "cpu,cpuacct" / "slice" / "cpu.cfs_quota_us").write_text("150000\n")  # 1.5 CPUs on the parent
    (tmp_path / "cpu,cpuacct" / "slice" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path, proc) == min(affinity, 2)
    (tmp_path / "user.slice" / "app.scope").mkdir(parents=True)
    (tmp_path / "user.slice" / "app.scope" / "cpu.max").write_text("50000 100000\n")  # v2 leaf: half a CPU
    assert available_cpus(tmp_path, proc) == 1


def _writable_v1_cpu_controller() -> Path | None:
    root = Path("/sys/fs/cgroup/cpu")
    if not (root / "cpu.cfs_quota_us").exists() or not os.access(root, os.W_OK):
        return None
    return root


@pytest.mark.skipif(_writable_v1_cpu_controller() is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a writable cgroup v1 cpu controller (root) and at least 2 CPUs")
def test_a_real_cgroup_quota_sets_torch_threads() -> None:
    """A process started inside a real cgroup limited to one CPU runs torch on one thread."""
    group = _writable_v1_cpu_controller() / f"adapter-service-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU
        code = ("import sys; sys.path.insert(0, '.'); from service.cpu import configure_threads; "
                "import torch; configure_threads(); print(torch.get_num_threads())")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run(["sh", "-c", f'echo $$ > {group}/tasks && exec "$0" -c "$1"', sys.executable, code],
                             capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == "1", out.stderr
    finally:
        group.rmdir()
