"""The runtime end to end: real containers on this machine, through the Python API."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import JVM_FLAGS, job, overhead_ms, python_job

MiB = 1 << 20


def test_hello_world_prints_and_is_ok(runtime):
    result = runtime.run(job(["echo", "hello"]))
    assert (result.status, result.exit_code, result.signal) == ("ok", 0, None)
    assert result.stdout == b"hello\n"
    assert result.limit_hit is None and not result.oom_killed


def test_exit_code_is_reported_as_runtime_error(runtime):
    result = runtime.run(job(["sh", "-c", "echo oops >&2; exit 3"]))
    assert (result.status, result.exit_code) == ("runtime_error", 3)
    assert result.stderr == b"oops\n"


def test_segfault_is_signaled_11(runtime):
    result = runtime.run(python_job("import ctypes; ctypes.string_at(0)"))
    assert (result.status, result.signal, result.exit_code) == ("signaled", 11, None)


def test_stdin_reaches_the_job(runtime):
    result = runtime.run(job(["tr", "a-z", "A-Z"], stdin=b"shout\n"))
    assert result.stdout == b"SHOUT\n"


def test_missing_command_is_exit_127_with_a_message(runtime):
    result = runtime.run(job(["no-such-command-here"]))
    assert (result.status, result.exit_code) == ("runtime_error", 127)
    assert "no-such-command-here" in result.message


def test_copied_in_files_land_in_the_work_directory(runtime):
    result = runtime.run(job(["sh", "-c", "pwd; cat src/main.txt; stat -c '%U %a' src/main.txt"],
                             files={"src/main.txt": b"content\n"}))
    assert result.stdout == b"/work\ncontent\nsandbox 644\n"


def test_infinite_loop_hits_the_cpu_time_limit_promptly(runtime):
    result = runtime.run(python_job("while True: pass", cpu_time=1))
    assert (result.status, result.limit_hit) == ("time_limit_exceeded", "cpu_time")
    assert 1000 <= result.cpu_time_ms <= 1150
    assert result.wall_time_ms < 1600


def test_sleep_hits_the_wall_time_limit(runtime):
    result = runtime.run(job(["sleep", "30"], wall_time=1))
    assert (result.status, result.limit_hit) == ("time_limit_exceeded", "wall_time")
    assert 1000 <= result.wall_time_ms < 1500
    assert result.cpu_time_ms < 200


def test_large_allocation_is_memory_limit_exceeded(runtime):
    result = runtime.run(python_job("x = bytearray(300 * 1024 * 1024); print(len(x))", memory="128m"))
    assert (result.status, result.limit_hit, result.oom_killed) == ("memory_limit_exceeded", "memory", True)
    assert result.memory_peak_bytes <= 128 * MiB


def test_memory_peak_reports_a_touched_200_mib(runtime):
    result = runtime.run(python_job(
        "x = bytearray(200 * 1024 * 1024)\n"
        "for i in range(0, len(x), 4096): x[i] = 1\n", memory="512m"))
    assert result.status == "ok", result
    assert 200 * MiB <= result.memory_peak_bytes <= 235 * MiB


def test_cpu_time_matches_what_the_job_burned(runtime):
    result = runtime.run(python_job(
        "import resource, time\n"
        "while time.process_time() < 0.5: pass\n"
        "usage = resource.getrusage(resource.RUSAGE_SELF); print(usage.ru_utime + usage.ru_stime)\n"))
    assert result.status == "ok", result
    self_reported_ms = float(result.stdout) * 1000
    assert 500 <= self_reported_ms
    # The job's own view and the cgroup's agree within 5% (the cgroup also counts the
    # container's init and the exec): exact enough to bill by.
    assert self_reported_ms <= result.cpu_time_ms <= self_reported_ms * 1.05 + overhead_ms(10, 80)
    assert abs(result.cpu_user_ms + result.cpu_sys_ms - result.cpu_time_ms) <= result.cpu_time_ms * 0.05 + 10


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_two_busy_processes_hit_the_cpu_limit_in_half_the_wall_time(runtime):
    result = runtime.run(python_job(
        "import os\n"
        "os.fork()\n"
        "while True: pass\n", cpu_time=1, cpus=2))
    assert (result.status, result.limit_hit) == ("time_limit_exceeded", "cpu_time")
    assert 1000 <= result.cpu_time_ms <= 1200
    assert result.wall_time_ms < 850


def test_cpus_caps_bandwidth(runtime):
    result = runtime.run(python_job("while True: pass", cpu_time=100, wall_time=1, cpus=0.5))
    assert result.limit_hit == "wall_time"
    # Half a CPU for the second the wall limit allows; under emulation the kill comes later.
    assert 350 <= result.cpu_time_ms <= 500 + overhead_ms(150, 350)


def test_background_setsid_process_is_killed_with_the_job(runtime):
    marker = "987654"
    result = runtime.run(job(["sh", "-c", f"setsid sleep {marker} & echo started"], wall_time=10))
    assert result.status == "ok" and result.stdout == b"started\n"
    assert result.wall_time_ms < 2000, "a background process kept the job alive"
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert leftovers.stdout == ""


def test_job_cannot_reach_a_host_listener_on_loopback(runtime):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = runtime.run(python_job(
            "import socket\n"
            "s = socket.socket()\n"
            "s.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port})); print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"))
    assert result.stdout == b"ConnectionRefusedError\n"


def test_job_has_only_loopback_up_and_its_own_hostname(runtime):
    result = runtime.run(job(["sh", "-c", "hostname; ls /sys/class/net 2>/dev/null || cat /proc/net/dev"]))
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "sandbox"
    interfaces = [line.split(":")[0].strip() for line in lines[1:] if ":" in line]
    assert interfaces == ["lo"]


def test_namespace_and_privileged_calls_are_refused(runtime):
    result = runtime.run(python_job(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def err(rc):\n    return ctypes.get_errno() if rc == -1 else 0\n"
        "print(err(libc.unshare(0x10000000)))\n"
        "print(err(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
        "print(err(libc.ptrace(0, 0, 0, 0)))\n"
        "print(err(libc.syscall(435, 0, 0)))\n"))
    errnos = [int(line) for line in result.stdout.split()]
    assert errnos == [1, 1, 1, 38]  # EPERM, EPERM, EPERM, ENOSYS for clone3


def test_job_runs_unprivileged_with_no_capabilities(runtime):
    result = runtime.run(job(["sh", "-c", "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"]))
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "1000"
    assert "CapEff:\t0000000000000000" in lines
    assert "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "Seccomp:\t2" in lines


def test_writes_are_discarded_with_the_container(runtime):
    first = runtime.run(job(["sh", "-c",
                             "echo x > /tmp/marker && echo x > /work/marker && echo wrote;"
                             "echo x > /usr/sandboxd-marker 2>/dev/null || echo usr-refused"]))
    assert first.stdout == b"wrote\nusr-refused\n"
    second = runtime.run(job(["sh", "-c", "ls /tmp/marker /work/marker /usr/sandboxd-marker 2>&1 | wc -l; "
                                          "cat /tmp/marker /work/marker 2>/dev/null | wc -c"]))
    assert second.stdout.split()[1] == b"0"
    assert not Path("/usr/sandboxd-marker").exists()


def test_environment_holds_only_what_the_request_passes(runtime, monkeypatch):
    monkeypatch.setenv("SANDBOXD_TEST_SECRET", "hunter2")
    result = runtime.run(job(["env"], env={"GREETING": "hi"}))
    names = sorted(line.split("=", 1)[0] for line in result.stdout.decode().splitlines())
    assert names == ["GREETING", "HOME", "LANG", "PATH"]
    assert b"hunter2" not in result.stdout


def test_output_limit_truncates_and_kills(runtime):
    result = runtime.run(job(["yes"], output="1m"))
    assert (result.status, result.limit_hit) == ("output_limit_exceeded", "output")
    assert result.stdout_truncated and len(result.stdout) == MiB


def test_gcc_compiles_and_runs_a_c_program(runtime):
    source = b'#include <stdio.h>\nint main(void) { printf("%d\\n", 6 * 7); return 0; }\n'
    result = runtime.run(job(["sh", "-c", "gcc -O2 -o main main.c && ./main"], files={"main.c": source},
                             memory="512m"))
    assert result.status == "ok", result.stderr
    assert result.stdout == b"42\n"


@pytest.mark.parametrize("argv, expected", [
    (["python3", "-c", "print(6 * 7)"], b"42\n"),
    (["sh", "-c", "printf '#include <iostream>\\nint main(){std::cout<<42<<std::endl;}' > m.cc && g++ -o m m.cc && ./m"], b"42\n"),
    (["node", "-e", "console.log(6 * 7)"], b"42\n"),
    (["sh", "-c", "printf 'class M{public static void main(String[] a){System.out.println(42);}}' > M.java"
                  f" && java {' '.join(JVM_FLAGS)} M.java"], b"42\n"),
])
def test_host_toolchains_run_in_the_host_image(runtime, argv, expected):
    # A JVM compiling a class costs seconds of CPU, ten times that under emulation.
    cpu_time_s = overhead_ms(30_000, 300_000) / 1000
    result = runtime.run(job(argv, memory="1g", pids=128, cpu_time=cpu_time_s, wall_time=2 * cpu_time_s))
    assert result.status == "ok", result.stderr.decode()
    assert result.stdout == expected


def test_host_secrets_are_not_in_the_image(runtime):
    result = runtime.run(job(["sh", "-c", "ls -d /etc/shadow /etc/gshadow /etc/ssh /etc/sudoers /etc/ssl/private 2>&1"
                                          " | grep -c 'No such'"]))
    assert result.stdout == b"5\n"


def test_setup_failure_is_an_internal_error_with_a_message(runtime):
    too_big = b"x" * (3 * MiB)
    result = runtime.run(job(["true"], files={"big.bin": too_big}, disk="2m"))
    assert result.status == "internal_error"
    assert "No space left" in result.message


def _host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_job_runs_as_a_host_uid_that_is_neither_root_nor_the_service(runtime):
    from sandboxd.runtime.user import choose_id_mapping

    mapping = choose_id_mapping(1000, 1000)
    if mapping.scheme == "single":
        pytest.skip("no /etc/subuid range for this user: the job shares the service's uid, as bubblewrap's")
    results = []
    spec = job(["sleep", "30"])
    runtime.start(spec, results.append)
    while runtime.job_pid(spec.job_id) is None:  # a cold start: the order goes out once it is ready
        runtime.supervisor.step(0.01)
    init_pid = runtime.job_pid(spec.job_id)
    children = Path(f"/proc/{init_pid}/task/{init_pid}/children")
    while not children.read_text().split():  # the job is spawned right after the order
        runtime.supervisor.step(0.01)
    job_pid = int(children.read_text().split()[0])
    try:
        host_uid = _host_uid(job_pid)
    finally:
        runtime.kill(spec.job_id, "test over")
        while not results:
            runtime.supervisor.step(1.0)
    assert host_uid not in (0, os.getuid())
    assert host_uid == mapping.job_host_uid(1000)


def test_job_inherits_only_its_three_standard_streams(runtime):
    result = runtime.run(python_job("import os; print(sorted(os.listdir('/proc/self/fd')))"))
    assert result.stdout == b"['0', '1', '2', '3']\n"  # 3: the listing's own directory


def large_image_file(min_bytes: int) -> str | None:
    """A file of the host image (its /usr) big enough to read min_bytes from."""
    for directory, _, names in os.walk("/usr/lib"):
        for name in sorted(names):
            path = os.path.join(directory, name)
            if not os.path.islink(path) and os.path.isfile(path) and os.path.getsize(path) >= min_bytes:
                return path
    return None


def test_io_rate_throttles_reads_from_the_image_disk(runtime):
    if not runtime.cgroups.io_devices:
        pytest.skip("/usr is on no block device here (tmpfs or overlay root): nothing to throttle")
    if runtime.cgroups.version == 2 and not runtime.cgroups._io:
        pytest.skip("the io controller is not delegated to this cgroup (systemd delegates memory and pids only)")
    path = large_image_file(8 << 20)
    assert path is not None, "no file of 8 MiB under /usr/lib"
    # O_DIRECT: every byte comes from the disk, none from the page cache.
    read = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "count=8", "iflag=direct"]
    throttled = runtime.run(job(read, io_rate="2m", wall_time=30))
    assert throttled.status == "ok", throttled.stderr
    assert throttled.wall_time_ms >= 3000  # 8 MiB at 2 MiB/s: about 4 s
    free = runtime.run(job(read, io_rate="1g", wall_time=30))
    assert free.status == "ok", free.stderr
    assert free.wall_time_ms < throttled.wall_time_ms / 2
