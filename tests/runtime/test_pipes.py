"""Two jobs connected by pipes (an interactive problem's solution and interactor): each one's
stdout is the other's stdin, both in their own containers, and neither can hang the other
past its own limits."""

from __future__ import annotations

import os
import signal

from conftest import job, overhead_ms, run_piped


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_two_jobs_talk_through_pipes_and_only_their_stderr_is_captured(runtime):
    asker = job(["sh", "-c", 'echo question; read answer; echo "heard: $answer" >&2'])
    answerer = job(["sh", "-c", 'read question; echo "reply to $question"; echo "asked: $question" >&2'])
    first, second = run_piped(runtime, asker, answerer)
    assert (first.status, second.status) == ("ok", "ok"), (first, second)
    assert first.stderr == b"heard: reply to question\n" and second.stderr == b"asked: question\n"
    assert first.stdout == b"" == second.stdout


def test_a_side_that_ends_gives_the_other_end_of_file(runtime):
    reader = job(["sh", "-c", "if read line; then echo 'read a line' >&2; else echo 'end of file' >&2; fi"])
    first, second = run_piped(runtime, reader, job(["true"]))
    assert (first.status, first.stderr, second.status) == ("ok", b"end of file\n", "ok")


def test_a_writer_whose_peer_ended_dies_of_sigpipe(runtime):
    first, second = run_piped(runtime, job(["yes"], wall_time=20), job(["true"]))
    assert (first.status, first.signal) == ("signaled", signal.SIGPIPE), first
    assert first.wall_time_ms < 10_000


def test_a_deadlock_ends_both_within_the_wall_limit(runtime):
    # Both wait to read first: neither ever writes. The first is killed at its wall limit,
    # and with it goes the other's input: it reads end of file, and ends too.
    first, second = run_piped(runtime, job(["sh", "-c", "read x"], wall_time=1),
                              job(["sh", "-c", "read y"], wall_time=5))
    assert (first.status, first.limit_hit) == ("time_limit_exceeded", "wall_time"), first
    assert 1000 <= first.wall_time_ms <= 1000 + overhead_ms(500, 3000)
    assert (second.status, second.exit_code) == ("runtime_error", 1), second
    assert second.wall_time_ms <= 1000 + overhead_ms(1000, 4000)


def test_the_runtime_keeps_no_pipe_once_both_sides_started(runtime):
    before = open_fds()
    for _ in range(3):
        run_piped(runtime, job(["sh", "-c", "echo hi; read x"]), job(["sh", "-c", "read y; echo back"]))
    runtime.settle()
    assert open_fds() == before
