"""Containers cloned by the zygote: the caller's own children, started without blocking it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import job, leftover_job_cgroups


@pytest.fixture
def zygote_runtime(state_dir):
    from sandboxd.runtime.launch import Runtime

    runtime = Runtime(state_dir=state_dir, warm_containers=0, zygote=True)
    yield runtime
    runtime.close()
    assert leftover_job_cgroups() == []


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _step_until(runtime, condition) -> None:
    while not condition():
        runtime.supervisor.step(1.0)


def test_a_zygote_container_is_the_callers_child_and_the_zygote_ends_with_the_runtime(state_dir):
    from sandboxd.runtime.launch import Runtime

    runtime = Runtime(state_dir=state_dir, warm_containers=0, zygote=True)
    before = set(_children(os.getpid()))
    results = []
    spec = job(["sleep", "30"])
    runtime.start(spec, results.append)
    _step_until(runtime, lambda: runtime.job_pid(spec.job_id) is not None)
    init_pid = runtime.job_pid(spec.job_id)
    assert init_pid in _children(os.getpid())  # reaped by us, killed with us (PDEATHSIG)
    runtime.kill(spec.job_id, "test over")
    _step_until(runtime, lambda: results)
    assert results[0].signal == signal.SIGKILL
    runtime.close()
    assert set(_children(os.getpid())) <= before  # the zygote and the janitor are gone
    assert leftover_job_cgroups() == []


def test_a_job_killed_while_its_container_is_cloned_never_runs(zygote_runtime):
    results = []
    spec = job(["echo", "ran"])
    zygote_runtime.start(spec, results.append)
    # The zygote's answer is read only by step(): the container cannot be ready yet.
    assert zygote_runtime.job_pid(spec.job_id) is None
    zygote_runtime.kill(spec.job_id, "cancelled")
    _step_until(zygote_runtime, lambda: results)
    assert (results[0].status, results[0].signal, results[0].stdout) == ("signaled", signal.SIGKILL, b"")


def test_jobs_started_together_on_cold_containers_each_get_their_own_result(zygote_runtime):
    results: dict[int, bytes] = {}
    for n in range(5):
        zygote_runtime.start(job(["sh", "-c", f"echo {n}"]), lambda result, n=n: results.__setitem__(n, result.stdout))
    _step_until(zygote_runtime, lambda: len(results) == 5)
    assert results == {n: f"{n}\n".encode() for n in range(5)}
