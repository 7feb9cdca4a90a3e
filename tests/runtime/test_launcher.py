"""The launcher process: a service's asyncio loop sends jobs, results come back as they end."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import job, leftover_job_cgroups
from sandboxd.runtime.launcher import LauncherClient, LauncherError


def run(coroutine):
    return asyncio.run(coroutine)


def test_launcher_runs_concurrent_jobs_and_returns_each_result(state_dir):
    async def scenario():
        client = LauncherClient(state_dir=state_dir, warm_containers=1)
        await client.start()
        try:
            results = await asyncio.gather(*(client.run(job(["sh", "-c", f"echo {n}"])) for n in range(6)))
        finally:
            await client.close()
        return results

    results = run(scenario())
    assert [result.stdout for result in results] == [f"{n}\n".encode() for n in range(6)]
    assert leftover_job_cgroups() == []


def test_jobs_overlap_in_the_launcher(state_dir):
    async def scenario():
        client = LauncherClient(state_dir=state_dir, warm_containers=0)
        await client.start()
        try:
            await client.run(job(["true"]))  # the launcher is up: time only the jobs
            started = time.monotonic()
            await asyncio.gather(*(client.run(job(["sleep", "1"])) for _ in range(4)))
            return time.monotonic() - started
        finally:
            await client.close()

    assert run(scenario()) < 3  # four one-second sleeps side by side, not one after another (4 s)


def test_cancelling_a_request_kills_its_job(state_dir):
    async def scenario():
        client = LauncherClient(state_dir=state_dir, warm_containers=0)
        await client.start()
        try:
            task = asyncio.create_task(client.run(job(["sleep", "30"])))
            done, _ = await asyncio.wait({task}, timeout=0.5)
            assert not done
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            follow_up = await client.run(job(["echo", "still serving"]))
        finally:
            await client.close()
        return follow_up

    assert run(scenario()).stdout == b"still serving\n"
    assert leftover_job_cgroups() == []


def test_unknown_image_is_a_usage_error(state_dir):
    async def scenario():
        client = LauncherClient(state_dir=state_dir, warm_containers=0)
        await client.start()
        try:
            with pytest.raises(LauncherError) as raised:
                await client.run(job(["true"], image="no-such-image"))
        finally:
            await client.close()
        return raised.value

    error = run(scenario())
    assert error.kind == "usage" and "no-such-image" in str(error)


def test_jobs_sent_after_the_launcher_died_fail_at_once(state_dir):
    async def scenario():
        client = LauncherClient(state_dir=state_dir, warm_containers=0)
        await client.start()
        try:
            client._process.kill()
            await asyncio.wait_for(client._reader_task, 30)  # it has seen the launcher go
            with pytest.raises(LauncherError) as raised:
                await asyncio.wait_for(client.run(job(["true"])), 10)  # not a hang
        finally:
            await client.close()
        return raised.value

    error = run(scenario())
    assert error.kind == "internal" and "exited" in str(error)
