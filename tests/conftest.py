"""Shared fixtures: a real Runtime on this machine, a leak check after every test, and the
guard that must pass before any hostile test (fork bombs, fillers) may run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from sandboxd.job import InputFile, JobSpec, Result
from sandboxd.limits import Limits, default_limit_policy

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The cgroup-v2 lane runs in a VM under software emulation, where starting and ending a
# process costs several times what it costs on hardware: fixed overheads get more room there.
EMULATED_CPU = os.environ.get("SANDBOXD_TEST_LANE") == "cgroup2-vm"


# HotSpot patches JIT-compiled code while other threads run it; under multi-threaded TCG that
# crashes about one JVM launch in 60 (SIGSEGV or SIGILL at a just-patched method entry). The
# interpreter patches no code (and is faster there: compiling is what emulation makes slow).
JVM_FLAGS: tuple[str, ...] = ("-Xint",) if EMULATED_CPU else ()


def overhead_ms(hardware_ms: float, emulated_ms: float) -> float:
    return emulated_ms if EMULATED_CPU else hardware_ms


def own_sandboxd_cgroup_dirs() -> list[Path]:
    """Every `sandboxd` directory under the cgroups this process sits in (v1 and v2)."""
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        names = [name.removeprefix("name=") for name in controllers.split(",") if name] or [""]
        for name in names:
            base = CGROUP_ROOT / name if name else CGROUP_ROOT
            if not name and (CGROUP_ROOT / "unified").is_dir():
                base = CGROUP_ROOT / "unified"
            candidate = base / path.lstrip("/") / "sandboxd"
            if candidate.is_dir():
                dirs.append(candidate)
    return dirs


def leftover_job_cgroups() -> list[str]:
    found = []
    for parent in own_sandboxd_cgroup_dirs():
        for child in parent.rglob("job-*"):
            if child.is_dir():
                found.append(str(child))
    return found


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("state")
    os.chmod(path, 0o711)
    return path


@pytest.fixture(scope="session")
def runtime(state_dir: Path):
    from sandboxd.runtime.launch import Runtime

    runtime = Runtime(state_dir=state_dir)
    yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def nothing_leaks(request: pytest.FixtureRequest):
    yield
    if "runtime" not in request.fixturenames:
        return
    request.getfixturevalue("runtime").settle()
    assert leftover_job_cgroups() == [], "a job cgroup was left behind"
    overlay_mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
                      if line.split()[2] == "overlay"]
    assert overlay_mounts == [], "an overlay mount leaked into the host's mount namespace"
    state = request.getfixturevalue("state_dir")
    assert not any((state / "mnt").iterdir()), "the scratch mount point is not empty on the host"


def limits(**changes: Any) -> Limits:
    return dataclasses.replace(default_limit_policy().defaults, **changes)


def own_dirs() -> list[str]:
    """This process's own cgroup directories, in every hierarchy a driver uses."""
    from sandboxd.runtime.cgroup import is_pure_v2

    if is_pure_v2():
        from sandboxd.runtime.cgroup_v2 import own_unified_dir

        return [own_unified_dir()]
    from sandboxd.runtime.cgroup_v1 import controller_dirs

    return list(dict.fromkeys(controller_dirs().values()))


def job(argv: list[str] | tuple[str, ...], *, stdin: bytes | None = None,
        files: dict[str, bytes] | None = None, env: dict[str, str] | None = None,
        image: str = "host", **limits: Any) -> JobSpec:
    return JobSpec(
        argv=tuple(argv),
        limits=default_limit_policy().resolve(limits),
        image=image,
        env=tuple((env or {}).items()),
        stdin=stdin,
        files=tuple(InputFile(path=path, content=content) for path, content in (files or {}).items()),
    )


def run_once(state_dir: Path, spec: JobSpec) -> Result:
    """Run one job in a Runtime of its own over `state_dir` (and so its images), closed after."""
    from sandboxd.runtime.launch import Runtime

    runtime = Runtime(state_dir=state_dir)
    try:
        return runtime.run(spec)
    finally:
        runtime.close()


def run_piped(runtime, first: JobSpec, second: JobSpec) -> tuple[Result, Result]:
    """Run two jobs connected by pipes (each one's stdout is the other's stdin) to their end."""
    import uuid

    from sandboxd.job import StdioPipe

    group = uuid.uuid4().hex
    results: dict[int, Result] = {}
    for side, spec in enumerate((first, second)):
        spec = dataclasses.replace(spec, stdio_pipe=StdioPipe(group, side))
        runtime.start(spec, lambda result, side=side: results.__setitem__(side, result))
    while len(results) < 2:
        runtime.supervisor.step(None)
    return results[0], results[1]


def python_job(source: str, **kwargs: Any) -> JobSpec:
    return job(["python3", "-c", source], **kwargs)


@pytest.fixture(scope="session")
def sandbox_guard(runtime) -> Result:
    """Proves, with harmless probes, that a job has its own PID namespace and that the pids
    cap holds. Hostile tests depend on it: if it fails they error instead of running."""
    probe = runtime.run(python_job(
        "import os; print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"))
    if probe.status != "ok":
        pytest.fail(f"guard: probe job failed: {probe}")
    if probe.stdout != b"2 [1, 2]\n":
        pytest.fail(f"guard: the job does not have its own PID namespace: {probe.stdout!r}")
    capped = runtime.run(python_job(
        "import os\n"
        "ok = 0\n"
        "for _ in range(12):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.read(os.open('/dev/zero', 0), 1); import time; time.sleep(30)\n"
        "        ok += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(ok)\n",
        pids=6, wall_time=10))
    forked = int(capped.stdout.decode().strip() or "-1")
    if not (0 <= forked < 6 and capped.pids_peak <= 6):
        pytest.fail(f"guard: the pids cap did not hold (forked {forked}, peak {capped.pids_peak})")
    return probe



@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    """A state directory for a real SQLite database (the store's tests)."""
    return tmp_path / "state"


@pytest.fixture
def db(db_dir: Path):
    from sandboxd.store.db import connect, open_database

    connection = connect(open_database(db_dir))
    yield connection
    connection.close()
