"""CPU priority of work no job waits for.

Preparing pool containers, tearing down finished ones and removing their cgroups is work
that no one waits on, yet on a small machine it competes with the processes that carry a
job's request (the service, the launcher, the running container). Such work runs under
SCHED_IDLE: it takes only CPU time that nothing else wants, and anything else that wakes
preempts it at once. A pool container is raised back to the normal policy when a job is
given to it, before its order: the job runs at the normal priority.

Lowering one's own priority needs no privilege; raising a container back from SCHED_IDLE needs
CAP_SYS_NICE (by then it runs as another uid, so RLIMIT_NICE does not help), which a rootless
launcher does not have: there pool containers prepare at the normal priority.
"""

from __future__ import annotations

import os

_CAP_SYS_NICE = 23
_NORMAL = os.sched_param(0)


def can_raise_priority() -> bool:
    """Whether this process may move its containers out of SCHED_IDLE: CAP_SYS_NICE."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    return False


def run_in_background(pid: int = 0) -> None:
    """Put a process (0: this one) under SCHED_IDLE. Best effort: a process that cannot
    (or is gone) just competes normally."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, _NORMAL)
    except OSError:
        pass


def run_in_foreground(pid: int) -> None:
    """Put a process back under the normal policy (it keeps its nice value). Best effort: a
    process that is gone has its report to say why."""
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, _NORMAL)
    except ProcessLookupError:
        pass
