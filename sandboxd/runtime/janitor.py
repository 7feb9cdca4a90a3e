"""Removes finished jobs' cgroups in a process of its own.

Removing a cgroup takes the kernel's cgroup lock, which a container joining its cgroup holds
across an RCU grace period (milliseconds on v1); in the single-threaded launcher that wait
would delay every other job's result. The janitor, forked before any job, takes those waits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import NoReturn

from sandboxd.runtime import libc
from sandboxd.runtime.cgroup import CgroupError, kill_cgroup_processes, rmdir_cgroup
from sandboxd.runtime.priority import run_in_background


def _serve(requests_fd: int, acks_fd: int) -> NoReturn:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.set_process_name("sbx-janitor")
    run_in_background()  # no job waits for a removal
    with os.fdopen(requests_fd, "r") as requests:
        for line in requests:
            for directory in json.loads(line):
                try:
                    kill_cgroup_processes([directory + "/cgroup.procs"])
                    rmdir_cgroup(directory)
                except FileNotFoundError:
                    pass
                except (OSError, CgroupError) as error:
                    print(f"sandboxd: removing {directory} failed: {error}", file=sys.stderr)
            os.write(acks_fd, b".")
    os._exit(0)


class Janitor:
    def __init__(self) -> None:
        requests_read, requests_write = os.pipe2(os.O_CLOEXEC)
        acks_read, acks_write = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            libc.close_fds_except({requests_read, acks_write})
            _serve(requests_read, acks_write)
        os.close(requests_read)
        os.close(acks_write)
        self._pid = pid
        self._requests_fd = requests_write
        self._acks_fd = acks_read
        self._outstanding = 0

    def remove(self, directories: tuple[str, ...]) -> None:
        """Queue the removal of one job's cgroup directories (in this order)."""
        os.write(self._requests_fd, json.dumps(list(directories)).encode() + b"\n")
        self._outstanding += 1

    def flush(self) -> None:
        """Return once every queued removal is done."""
        while self._outstanding:
            self._outstanding -= len(os.read(self._acks_fd, self._outstanding))

    def close(self) -> None:
        self.flush()
        os.close(self._requests_fd)
        os.waitpid(self._pid, 0)
        os.close(self._acks_fd)
