"""`sandboxd run` as users type it: JSON contract, exit statuses, bad input, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import leftover_job_cgroups

RESULT_FIELDS = {
    "status", "exit_code", "signal", "cpu_time_ms", "cpu_user_ms", "cpu_sys_ms", "wall_time_ms",
    "memory_peak_bytes", "pids_peak", "oom_killed", "limit_hit", "stdout", "stderr",
    "stdout_truncated", "stderr_truncated", "accounting_source", "message",
}


def sandboxd(state_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sandboxd", *args]
    if args and args[0] == "run":
        command[4:4] = ["--state-dir", str(state_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def test_run_json_prints_one_object_with_every_field(state_dir):
    done = sandboxd(state_dir, "run", "--memory", "512m", "--cpu-time", "2", "--json", "--",
                    "python3", "-c", "print(1)")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == RESULT_FIELDS
    assert (result["status"], result["stdout"], result["exit_code"]) == ("ok", "1\n", 0)
    assert result["memory_peak_bytes"] > 0 and result["cpu_time_ms"] > 0
    assert set(result["accounting_source"]) >= {"cpu_time_ms", "memory_peak_bytes", "pids_peak"}


def test_run_json_base64_copies_and_invalid_utf8_replaced(state_dir):
    done = sandboxd(state_dir, "run", "--json", "--base64", "--", "printf", "\\377ok")
    result = json.loads(done.stdout)
    assert result["stdout"] == "\ufffdok"
    assert result["stdout_base64"] == "/29r"


def test_exit_status_is_the_jobs_code_or_128_plus_signal(state_dir):
    assert sandboxd(state_dir, "run", "--", "sh", "-c", "exit 3").returncode == 3
    assert sandboxd(state_dir, "run", "--", "sh", "-c", "kill -SEGV $$").returncode == 128 + 11


def test_plain_output_passes_streams_and_reports_limits_on_stderr(state_dir):
    done = sandboxd(state_dir, "run", "--wall-time", "0.5", "--", "sh", "-c", "echo out; echo err >&2; sleep 5")
    assert done.stdout == "out\n"
    assert done.stderr.startswith("err\n")
    assert "time_limit_exceeded" in done.stderr
    assert done.returncode == 128 + 9


def test_stdin_file_and_env_options(state_dir, tmp_path):
    (tmp_path / "in.txt").write_text("from a file\n")
    (tmp_path / "data.txt").write_text("copied\n")
    done = sandboxd(state_dir, "run", "--stdin", str(tmp_path / "in.txt"), "--env", "NAME=value",
                    "--file", f"/work/sub/data.txt={tmp_path / 'data.txt'}", "--",
                    "sh", "-c", "cat; echo $NAME; cat sub/data.txt")
    assert done.stdout == "from a file\nvalue\ncopied\n", done.stderr


@pytest.mark.parametrize("args, message", [
    (["--memory", "-5", "--", "true"], "memory"),
    (["--cpu-time", "abc", "--", "true"], "cpu_time"),
    (["--pids", "1.5", "--", "true"], "pids"),
    (["--wall-time", "nan", "--", "true"], "wall_time"),
    (["--memory", "99999g", "--", "true"], "maximum"),
    (["--image", "nope", "--", "true"], "unknown image"),
    ([], "missing command"),
    (["--"], "missing command"),
    (["--stdin", "/nonexistent/in", "--", "true"], "cannot read"),
    (["--file", "a.txt=/nonexistent/src", "--", "true"], "cannot read"),
    (["--file", "../etc/passwd=/etc/hostname", "--", "true"], "'..'"),
    (["--file", "/etc/passwd=/etc/hostname", "--", "true"], "outside the work directory"),
    (["--file", "noequals", "--", "true"], "DEST=SRC"),
    (["--env", "1BAD=x", "--", "true"], "environment variable"),
    (["--no-such-option", "--", "true"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(state_dir, args, message):
    done = sandboxd(state_dir, "run", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert leftover_job_cgroups() == []


def test_ctrl_c_kills_the_job_and_cleans_up(state_dir):
    marker = "876543"
    process = subprocess.Popen([sys.executable, "-m", "sandboxd", "run", "--state-dir", str(state_dir),
                                "--", "sh", "-c", f"sleep {marker}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not _process_running(f"sleep {marker}"):
        assert time.monotonic() < deadline, "the job never started"
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)  # polling the process table for the job to appear, bounded by the deadline
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not _process_running(f"sleep {marker}")
    assert leftover_job_cgroups() == []


def _process_running(cmdline: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip() == cmdline.encode():
                    return True
            except OSError:
                continue
    return False
