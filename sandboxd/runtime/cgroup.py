"""One interface over cgroup v1 and v2: a fresh cgroup per job, its caps, its accounting.

Every cgroup we create nests under the cgroup this process already sits in, in a directory
named `sandboxd`, one `job-<id>` per job; the driver for the host's cgroup version is chosen
by detect_driver().
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from sandboxd.limits import Limits


class CgroupError(RuntimeError):
    """cgroups are missing, not delegated to us, or refused an operation."""


@dataclass(frozen=True)
class CgroupStats:
    cpu_time_ns: int
    cpu_user_ns: int
    cpu_sys_ns: int
    memory_peak_bytes: int
    oom_kills: int
    pids_peak: int
    # figure name -> kernel file it came from, e.g. {"memory_peak_bytes": "memory.max_usage_in_bytes"}
    source: dict[str, str]


class JobCgroup(abc.ABC):
    """A job's cgroup (one directory per controller on v1, one directory on v2)."""

    name: str  # "job-<id>"

    @abc.abstractmethod
    def attach(self, pid: int) -> None:
        """Move a process (by host pid) into the job's cgroup in every controller."""

    @abc.abstractmethod
    def cpu_time_ns(self) -> int:
        """Total CPU time so far; cheap enough to poll often."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Every accounting figure, read once when the job has ended."""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (v2: cgroup.kill)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Kill what is left, wait until empty, remove the directories. Idempotent."""


class CgroupDriver(abc.ABC):
    version: int

    @abc.abstractmethod
    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        """Create `job-<job_id>` with CPU bandwidth, memory (swap included) and pids caps."""

    @abc.abstractmethod
    def remove_stale(self) -> list[str]:
        """Remove job cgroups left by a process that died (e.g. after SIGKILL); returns names."""
