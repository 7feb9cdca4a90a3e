"""The container's PID 1: reaps orphans and ends the container when the job's main process
ends. Its exit makes the kernel kill everything else in the PID namespace, so background
processes, double forks and setsid() escapes end with the job."""

from __future__ import annotations

import os
import signal
import struct
from typing import NoReturn

from sandboxd.runtime.priority import run_in_background

REPORT_STATUS = b"S"  # + the main process's wait status, packed "=i"
REPORT_EXEC_FAILED = b"X"  # + "errno:message": the command could not be executed
REPORT_SETUP_FAILED = b"E"  # + message: the runtime failed to build the container


def ignore_job_signals() -> None:
    """PID 1 ignores signals from its namespace unless it installed a handler; Python did
    install one for SIGINT, so hand the defaults back and stay deaf to the job."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)


def run_init(main_pid: int, report_fd: int) -> NoReturn:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == main_pid:
            os.write(report_fd, REPORT_STATUS + struct.pack("=i", status))
            run_in_background()  # the result is known: no one waits for our teardown
            os._exit(0)
