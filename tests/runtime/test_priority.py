"""CPU priority: work no job waits for runs under SCHED_IDLE; jobs run at the normal policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import leftover_job_cgroups, python_job


def _children() -> set[int]:
    me = os.getpid()
    return {int(pid) for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split()}


@pytest.fixture
def pooled_runtime(state_dir):
    """A runtime with a pool of two, and the processes it added to ours (other tests'
    runtimes may be alive too)."""
    from sandboxd.runtime.launch import Runtime

    before = _children()
    runtime = Runtime(state_dir=state_dir, warm_containers=2, zygote=True)
    runtime.prewarm()
    yield runtime, lambda name: [pid for pid in _children() - before
                                 if Path(f"/proc/{pid}/comm").read_text().strip() == name]
    runtime.close()
    assert leftover_job_cgroups() == []


def test_pool_containers_prepare_in_the_background_and_their_jobs_run_at_normal_priority(pooled_runtime):
    from sandboxd.runtime.priority import can_raise_priority

    runtime, ours = pooled_runtime
    # Only a launcher that may raise a container back (CAP_SYS_NICE: root) lowers the pool.
    background = os.SCHED_IDLE if can_raise_priority() else os.SCHED_OTHER
    deadline = time.monotonic() + 30
    while len(ours("sbx-init")) < 2:
        assert time.monotonic() < deadline, "the pool's two containers did not appear in 30 s"
        runtime.supervisor.step(0.1)
    assert {os.sched_getscheduler(pid) for pid in ours("sbx-init")} == {background}
    assert {os.sched_getscheduler(pid) for pid in ours("sbx-zygote")} == {background}

    result = runtime.run(python_job("import os; print(os.sched_getscheduler(0))"))
    assert result.status == "ok", result
    assert result.stdout == b"%d\n" % os.SCHED_OTHER


def test_the_janitor_removes_cgroups_in_the_background(pooled_runtime):
    _, ours = pooled_runtime
    (janitor,) = ours("sbx-janitor")
    assert os.sched_getscheduler(janitor) == os.SCHED_IDLE  # lowering needs no privilege
