"""Prepared (warm) containers: the same jobs, the same results, limits of the job not the pool."""

from __future__ import annotations

import pytest

from conftest import job, leftover_job_cgroups, overhead_ms, python_job

MiB = 1 << 20


@pytest.fixture(scope="module")
def warm_runtime(state_dir):
    from sandboxd.runtime.launch import Runtime

    runtime = Runtime(state_dir=state_dir, warm_containers=2)
    runtime.prewarm()
    yield runtime
    runtime.close()
    assert leftover_job_cgroups() == []


def test_warm_containers_run_consecutive_jobs_in_fresh_containers(warm_runtime):
    first = warm_runtime.run(job(["sh", "-c", "echo x > /tmp/left-behind; echo $$"]))
    second = warm_runtime.run(job(["sh", "-c", "ls /tmp/left-behind 2>/dev/null; echo $$"]))
    assert first.status == second.status == "ok"
    assert second.stdout == b"2\n"  # a fresh PID namespace, and no file from the first job


def test_warm_container_takes_the_jobs_limits_not_the_pools(warm_runtime):
    result = warm_runtime.run(python_job("x = bytearray(100 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])",
                                         memory="48m"))
    assert result.status == "memory_limit_exceeded"
    capped = warm_runtime.run(python_job("while True: pass", cpu_time=0.3))
    assert capped.limit_hit == "cpu_time" and 300 <= capped.cpu_time_ms <= 420


def test_accounting_of_a_warm_container_starts_with_the_job(warm_runtime):
    result = warm_runtime.run(job(["true"]))
    assert result.status == "ok"
    # The container's own set-up (mounts, Python) is not billed to the job.
    assert result.cpu_time_ms < overhead_ms(20, 150)
    assert result.memory_peak_bytes < 16 * MiB


def test_a_job_of_another_shape_gets_a_container_of_its_own(warm_runtime):
    result = warm_runtime.run(job(["sh", "-c", "df -k /tmp | tail -1"], disk="32m"))
    assert result.status == "ok"
    assert result.stdout.split()[1] == str(32 * 1024).encode()
