"""CPU threads: as many as the CPUs this process may really use, and idle threads that sleep.

torch sizes its intra-op pool from the machine's core count, which ignores a container's CPU quota, and its
OpenMP workers spin while they wait for each other. When a neighbour takes a core (or a quota throttles the
process), a spinning worker burns the time slice its partner needs: measured on 2 cores with a CPU hog beside
the server, throughput fell about 14x (bench/cpu_contention.py, bench/results.md). So:

- `passive_wait_policy()` sets `OMP_WAIT_POLICY=PASSIVE` (OpenMP reads it once, when torch loads: it runs
  when the `service` package is imported, before torch) unless the user set it;
- `configure_threads()` sets torch's thread count to the CPUs available: the affinity mask
  (`os.sched_getaffinity`), capped by the tightest cgroup quota of the process's cgroup and its ancestors
  (`cpu.max` in cgroup v2, `cpu.cfs_quota_us` in v1),
  unless the user set `OMP_NUM_THREADS`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def passive_wait_policy() -> None:
    """Idle OpenMP workers sleep instead of spinning (call before torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quota_in(directory: Path) -> float | None:
    """CPUs the quota set in one cgroup directory allows (None: no quota there, or no such file)."""
    try:  # v2: "max 100000" or "200000 100000"
        quota, *rest = (directory / "cpu.max").read_text().split()
        if quota != "max":
            return int(quota) / int(rest[0] if rest else 100000)
    except (OSError, ValueError, IndexError):
        pass
    try:  # v1
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The directories whose CPU quota binds this process: its own cgroup and every ancestor, for cgroup v2
    (`root`, or `root/unified` on a hybrid host) and v1's cpu controller (`root/cpu`). Inside a container with
    its own cgroup namespace the process's cgroup is the mount's root; without one, /proc/self/cgroup names a
    host path the container cannot see, so the mount's root is always a candidate too."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths: list[tuple[Path, str]] = [(root, "/"), (root / "unified", "/"), (root / "cpu", "/")]
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            paths += [(root, path), (root / "unified", path)]
        elif "cpu" in controllers.split(","):
            paths += [(root / "cpu", path), (root / controllers, path)]
    dirs: list[Path] = []
    for mount, path in paths:
        directory = mount / path.strip("/")
        while True:
            if directory not in dirs and directory.is_dir():
                dirs.append(directory)
            if directory == mount:
                break
            directory = directory.parent
    return dirs


def _cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the tightest cgroup quota over this process's cgroups allows (None: no quota anywhere)."""
    quotas = [q for d in _cgroup_dirs(root, proc_cgroup) if (q := _quota_in(d)) is not None]
    return min(quotas, default=None)


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(cpus, 1)


def configure_threads() -> int:
    """Set torch's intra-op threads to the available CPUs (unless OMP_NUM_THREADS says otherwise)."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = available_cpus()
    if torch.get_num_threads() != cpus:
        torch.set_num_threads(cpus)
    log.info("torch uses %d thread(s) (CPUs available: affinity and cgroup quota); OMP_WAIT_POLICY=%s",
             cpus, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return cpus
