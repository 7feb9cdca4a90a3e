"""Hostile jobs. Each depends on sandbox_guard: if the job were not in its own PID
namespace under a working pids cap, these would error out before running."""

from __future__ import annotations

import shutil

import pytest

from conftest import job, python_job

pytestmark = pytest.mark.hostile
MiB = 1 << 20


def test_fork_bomb_ends_and_never_exceeds_the_pids_cap(runtime, sandbox_guard):
    result = runtime.run(job(["sh", "-c", "b() { b | b & }; b; sleep 2"], pids=32, wall_time=5, cpu_time=5))
    assert result.status in ("ok", "time_limit_exceeded", "runtime_error", "signaled")
    assert 1 <= result.pids_peak <= 32


def test_kill_minus_one_reaches_only_the_jobs_own_processes(runtime, sandbox_guard):
    result = runtime.run(python_job(
        "import os, signal, time\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(30)\n"
        "os.kill(-1, signal.SIGKILL)\n"
        "print(os.waitpid(child, 0)[1] & 0x7f)\n"))
    # kill(-1) took the job's own child and nothing outside its namespace: we are alive.
    assert (result.status, result.stdout) == ("ok", b"9\n")


def test_filling_tmp_ends_in_enospc_not_a_full_host_disk(runtime, sandbox_guard, state_dir):
    host_free_before = shutil.disk_usage(state_dir).free
    result = runtime.run(job(["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=4096 2>&1; echo rc=$?"],
                             disk="64m", memory="256m", file_size="4g"))
    assert result.status in ("ok", "memory_limit_exceeded")
    if result.status == "ok":
        assert b"No space left on device" in result.stdout
    assert shutil.disk_usage(state_dir).free > host_free_before - 32 * MiB


def test_filling_memory_through_tmpfs_is_charged_to_the_job(runtime, sandbox_guard):
    result = runtime.run(job(["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=100 2>&1; "
                                          "python3 -c 'x = bytearray(60 * 1024 * 1024); x[::4096] = b\"1\" * len(x[::4096])'"],
                             memory="96m", disk="256m"))
    assert result.status == "memory_limit_exceeded", result


def test_many_threads_are_capped_by_pids(runtime, sandbox_guard):
    result = runtime.run(python_job(
        "import threading, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print(n)\n", pids=16))
    assert int(result.stdout) < 16
    assert result.pids_peak <= 16
