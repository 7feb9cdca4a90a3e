"""Judging end to end over HTTP, against a judge built on bubblewrap, in the same run.

    .venv/bin/python bench/judge.py [--rounds N] [--tests N] [--requests N] [--submissions N]
                                    [--workers N] [--warm N]

Starts the real `sandboxd serve` on a loopback port in a temporary state directory with a
fresh tenant (bench/service.py's helpers), waits for the language probes, and measures:

1. A C++ submission (A+B) with --tests tests, `POST /v1/submissions?wait=true`, one at a time
   over one keep-alive connection: client-side wall time per submission, and the service's
   own accounting of it, the sum of its jobs' cpu_time_ms (`GET /v1/jobs?label=submission=ID`:
   the compile and every test). The peer judges the same submission as a judge built on
   bubblewrap would: the catalogue's compile argv (policies/languages.toml, read through
   sandboxd.judge.languages) in one `bwrap --unshare-all --die-with-parent` (the host's / read
   only, /proc, /dev, a tmpfs on /tmp, a temporary work directory bound writable), then one
   bwrap per test running the catalogue's run argv with the test's stdin (the work directory
   read only), as many at once as the service runs a submission's tests (parallel_tests() of
   sandboxd/judge/service.py for the bench's tenant), outputs compared in Python by the same
   `lines` checker. The peer sets no resource limits (bwrap has none), where every job of the
   service has its cgroup's. The peer's CPU time is its children's (getrusage: bwrap and what
   it ran; bwrap's PID 1, which bwrap does not wait for, is reparented to this process, a
   child subreaper while the peer judges, and waited for here).
   Also printed: the whole machine's CPU time per submission on each side (/proc/stat), the
   service's including its own HTTP, scheduling, database and this process's client.
2. The same with a Python submission: its "compile" is the catalogue's syntax check
   (py_compile), then every test runs the interpreter.
3. One run through the compatible APIs, one request at a time: `POST /judge0/submissions?
   wait=true` (Judge0's Python id, `X-Auth-Token: KEY`) and `POST /piston/api/v2/execute`
   (`Authorization: KEY`), client-side p50 over --requests each, against the peer judging
   the same program with the same stdin: the syntax check and the run, 2 bwraps.

Submissions are made in --rounds rounds, the service and the peer alternating (and which goes
first alternating too), so drift of the machine affects both alike; one untimed submission
of each language on each side first. The single runs likewise.

A benchmark, not a test: it prints figures and their ratios (sandboxd / bwrap), and exits 0
unless the service could not be run or a verdict (the service's or the peer's) was not
accepted.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import http.client
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

import service as service_bench  # noqa: E402  (bench/service.py: the service and the helpers)
from sandboxd.images import Image  # noqa: E402
from sandboxd.judge.checkers import lines  # noqa: E402
from sandboxd.judge.languages import Language, expand_argv, load_languages  # noqa: E402
from sandboxd.judge.service import MAX_PARALLEL_TESTS, parallel_tests  # noqa: E402
from sandboxd.store.tenants import Tenant  # noqa: E402

CPP_SOURCE = '#include <iostream>\nint main() { long a, b; std::cin >> a >> b; std::cout << a + b << "\\n"; }\n'
PYTHON_SOURCE = "a, b = map(int, input().split())\nprint(a + b)\n"
RUN_STDIN = "20 22\n"
RUN_EXPECTED_STDOUT = "42\n"
LANGUAGES_WAIT_S = 120  # the start-up probes compile and run every language of the catalogue
SUBMISSION_WAIT_S = 300  # the most `wait=true` waits
JOBS_PAGE = 500
JUDGE0_ACCEPTED = 3
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
# The peer's bwrap: a sandbox as tight as a bwrap-based judge would make it, the host's root
# read only, as the service's built-in image `host` shows it.
BWRAP_SANDBOX = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
                 "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv"]


@dataclass(frozen=True)
class Test:
    stdin: str
    expected_output: str


def a_plus_b_tests(count: int) -> list[Test]:
    return [Test(f"{index} {7 * index + 3}\n", f"{8 * index + 3}\n") for index in range(1, count + 1)]


def children_cpu_ms() -> float:
    """User and system CPU time of this process's children that have been waited for (and of
    their descendants that they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def set_child_subreaper(enabled: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def reap_sandbox_inits() -> None:
    """Wait for the bwrap PID 1s left to this process (a child subreaper meanwhile).

    With a PID namespace bwrap forks a PID 1 that waits for the command, and exits with the
    status that PID 1 sends it without waiting for it: the command's CPU time would reach no
    getrusage of ours. Reparented here, the PID 1 is waited for, and its CPU time and the
    command's count among this process's children's."""
    children: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children += [int(pid) for pid in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    for pid in children:
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
        except FileNotFoundError:
            continue
        namespaced_pids = status.get("NSpid", "").split()
        # Only a bwrap that is PID 1 of a namespace below ours: the bwraps started here, and
        # the service, are this process's own children, waited for by whoever started them.
        if status.get("Name") == "bwrap" and len(namespaced_pids) > 1 and namespaced_pids[-1] == "1":
            try:
                os.wait4(pid, 0)
            except ChildProcessError:  # another thread waited for it first
                continue


def p50(samples: list[float]) -> float:
    return service_bench.percentile(samples, 0.5)


# --- the peer: a judge built on bubblewrap ---------------------------------------------------


@dataclass(frozen=True)
class PeerJudgement:
    wall_ms: float
    compile_cpu_ms: float
    tests_cpu_ms: float
    verdict: str  # "accepted" when all went well
    message: str = ""


class BwrapJudge:
    """Compiles once and runs every test in a bwrap of its own, `parallel` tests at once."""

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="bwrap-test")
        # The environment the service's jobs get (the built-in image's), HOME being the work
        # directory as it is there.
        self.environment = dict({spec.name: spec.default for spec in dataclasses.fields(Image)}["env"])

    def close(self) -> None:
        self.pool.shutdown()

    def _sandboxed(self, work: Path, argv: tuple[str, ...], stdin: str, writable: bool) -> subprocess.CompletedProcess:
        # The work directory keeps its own path inside: the host's root is read only, so a new
        # mount point could not be made there.
        environment = [arg for name, value in self.environment.items()
                       for arg in ("--setenv", name, str(work) if name == "HOME" else value)]
        command = [*BWRAP_SANDBOX, *environment, "--bind" if writable else "--ro-bind", str(work), str(work),
                   "--chdir", str(work), *argv]
        return subprocess.run(command, input=stdin.encode(), capture_output=True)

    def _run_test(self, work: Path, run_argv: tuple[str, ...], test: Test) -> tuple[str, str]:
        done = self._sandboxed(work, run_argv, test.stdin, writable=False)
        if done.returncode != 0:
            return "runtime_error", f"exit status {done.returncode}: {done.stderr[:300].decode(errors='replace')}"
        outcome = lines(test.expected_output.encode(), done.stdout)
        return ("accepted", "") if outcome.accepted else ("wrong_answer", outcome.message)

    def judge(self, language: Language, source: str, tests: list[Test]) -> PeerJudgement:
        # Only while the peer judges: the service's orphans, if it makes any, go elsewhere.
        set_child_subreaper(True)
        try:
            return self._judge(language, source, tests)
        finally:
            reap_sandbox_inits()
            set_child_subreaper(False)

    def _judge(self, language: Language, source: str, tests: list[Test]) -> PeerJudgement:
        started_ns = time.perf_counter_ns()
        cpu_start_ms = children_cpu_ms()
        verdict, message = "accepted", ""
        with tempfile.TemporaryDirectory(prefix="sandboxd-bench-judge-peer-") as scratch:
            work = Path(scratch)
            (work / language.source_file).write_text(source)
            if language.compile_argv is not None:
                compiled = self._sandboxed(work, expand_argv(language.compile_argv, language.compile_limits), "",
                                           writable=True)
                if compiled.returncode != 0:
                    verdict = "compilation_error"
                    message = f"exit status {compiled.returncode}: {compiled.stderr[:600].decode(errors='replace')}"
            reap_sandbox_inits()
            compiled_cpu_ms = children_cpu_ms()
            if verdict == "accepted":
                run_argv = expand_argv(language.run_argv, language.run_limits)
                for test_verdict, test_message in self.pool.map(lambda test: self._run_test(work, run_argv, test),
                                                                tests):
                    if test_verdict != "accepted" and verdict == "accepted":
                        verdict, message = test_verdict, test_message
            reap_sandbox_inits()  # every bwrap has ended: their PID 1s are here by now
        wall_ms = (time.perf_counter_ns() - started_ns) / 1e6
        return PeerJudgement(wall_ms, compiled_cpu_ms - cpu_start_ms, children_cpu_ms() - compiled_cpu_ms,
                             verdict, message)


# --- the service ---------------------------------------------------------------------------


class Client:
    """One keep-alive connection to the service; any failure to talk to it ends the bench."""

    def __init__(self, service: service_bench.Service) -> None:
        self.connection = service.connection()
        self.key = service.key

    def close(self) -> None:
        self.connection.close()

    def request(self, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[float, int, Any]:
        """(client-side wall time in ms, HTTP status, the decoded JSON answer)."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {**headers, "Content-Type": "application/json"} if payload is not None else headers
        started_ns = time.perf_counter_ns()
        try:
            self.connection.request(method, path, payload, headers)
            response = self.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.connection.close()
            raise SystemExit(f"{method} {path}: no answer from the service: {type(error).__name__}: {error}")
        elapsed_ms = (time.perf_counter_ns() - started_ns) / 1e6
        try:
            return elapsed_ms, response.status, json.loads(raw)
        except ValueError:
            raise SystemExit(f"{method} {path}: {response.status}, not JSON: {raw[:600]!r}") from None

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str) -> Any:
        _, status, document = self.request("GET", path, self.bearer())
        if status != 200:
            raise SystemExit(f"GET {path}: {status}: {json.dumps(document)[:600]}")
        return document


def wait_for_languages(client: Client, wanted: list[str]) -> dict[str, str]:
    """The probed version of each wanted language, once the service's start-up probes are done."""
    listed = client.get(f"/v1/languages?wait=true&timeout={LANGUAGES_WAIT_S}")["languages"]
    by_id = {language["id"]: language for language in listed}
    for language_id in wanted:
        language = by_id.get(language_id)
        if language is None or not language.get("available"):
            reason = language.get("reason") if language else "not in the catalogue"
            raise SystemExit(f"language {language_id} is not available in the service: {reason}")
    return {language_id: by_id[language_id].get("version") or "?" for language_id in wanted}


def tenant_parallel_tests(service: service_bench.Service) -> int:
    """What the service's parallel_tests() makes of the bench's tenant (no limits of its own)."""
    listing = subprocess.run([sys.executable, "-m", "sandboxd", "tenant", "ls", "--json", "--state-dir",
                              str(service.state_dir)], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    if listing.returncode != 0:
        raise SystemExit(f"sandboxd tenant ls failed ({listing.returncode}):\n{listing.stderr}")
    public = next(tenant for tenant in json.loads(listing.stdout) if tenant["tenant"] == "bench")
    return parallel_tests(Tenant(name="bench", max_concurrent=public.get("max_concurrent"),
                                 max_queued=public.get("max_queued")))


@dataclass(frozen=True)
class ServiceJudgement:
    wall_ms: float
    compile_cpu_ms: float  # the service's accounting: the compile job's cpu_time_ms
    tests_cpu_ms: float  # the sum of the test jobs'


def accounted_cpu_ms(client: Client, submission_id: str, expected_jobs: int) -> tuple[float, float]:
    """(compile, tests) CPU time in ms of a submission's jobs, as the service accounted them."""
    compile_ms = tests_ms = 0.0
    jobs = 0
    query = {"label": f"submission={submission_id}", "limit": str(JOBS_PAGE)}
    while True:
        page = client.get("/v1/jobs?" + urllib.parse.urlencode(query))
        for job in page["jobs"]:
            jobs += 1
            cpu_ms = float((job.get("result") or {}).get("cpu_time_ms") or 0.0)
            if job["labels"].get("role") == "compile":
                compile_ms += cpu_ms
            else:
                tests_ms += cpu_ms
        if not page.get("next_cursor"):
            break
        query["cursor"] = page["next_cursor"]
    if jobs != expected_jobs:
        print(f"  note: submission {submission_id} has {jobs} jobs, {expected_jobs} expected")
    return compile_ms, tests_ms


def judge_on_service(client: Client, language: Language, source: str, tests: list[Test]) -> ServiceJudgement:
    body = {"language": language.id, "source": source, "checker": "lines",
            "tests": [{"stdin": test.stdin, "expected_output": test.expected_output} for test in tests]}
    path = f"/v1/submissions?wait=true&timeout={SUBMISSION_WAIT_S}"
    wall_ms, status, document = client.request("POST", path, client.bearer(), body)
    if status != 200 or document.get("verdict") != "accepted":
        raise SystemExit(f"{language.name} submission: {status}, verdict {document.get('verdict')!r}: "
                         f"{json.dumps(document)[:1500]}")
    jobs = len(tests) + (language.compile_argv is not None)
    compile_ms, tests_ms = accounted_cpu_ms(client, document["id"], jobs)
    return ServiceJudgement(wall_ms, compile_ms, tests_ms)


# --- 1 and 2: submissions ------------------------------------------------------------------


@dataclass
class SubmissionFigures:
    label: str
    ours: list[ServiceJudgement] = field(default_factory=list)
    peer: list[PeerJudgement] = field(default_factory=list)
    ours_machine_cpu_s: float = 0.0
    peer_machine_cpu_s: float = 0.0


def check_peer(judgement: PeerJudgement, label: str) -> PeerJudgement:
    if judgement.verdict != "accepted":
        raise SystemExit(f"the bwrap judge's {label}: {judgement.verdict}: {judgement.message}")
    return judgement


def submissions(client: Client, peer: BwrapJudge, language: Language, source: str, args: argparse.Namespace
                ) -> SubmissionFigures:
    tests = a_plus_b_tests(args.tests)
    figures = SubmissionFigures(f"{language.name} submission, {args.tests} tests")
    # Untimed: the first compile reads the toolchain from disk, the first run fills caches.
    judge_on_service(client, language, source, tests)
    check_peer(peer.judge(language, source, tests), figures.label)

    def ours(count: int) -> None:
        busy_s = service_bench.machine_busy_s()
        figures.ours.extend(judge_on_service(client, language, source, tests) for _ in range(count))
        figures.ours_machine_cpu_s += service_bench.machine_busy_s() - busy_s

    def theirs(count: int) -> None:
        busy_s = service_bench.machine_busy_s()
        figures.peer.extend(check_peer(peer.judge(language, source, tests), figures.label) for _ in range(count))
        figures.peer_machine_cpu_s += service_bench.machine_busy_s() - busy_s

    for round_number, count in enumerate(service_bench.split(args.submissions, args.rounds)):
        for side in (ours, theirs) if round_number % 2 == 0 else (theirs, ours):
            side(count)
    return figures


# --- 3: single runs through the compatible APIs ----------------------------------------------


def judge0_run(client: Client, language: Language) -> float:
    body = {"source_code": PYTHON_SOURCE, "language_id": language.judge0_id, "stdin": RUN_STDIN}
    wall_ms, status, document = client.request("POST", "/judge0/submissions?wait=true",
                                               {"X-Auth-Token": client.key}, body)
    verdict = (document.get("status") or {}).get("id") if isinstance(document, dict) else None
    if status not in (200, 201) or verdict != JUDGE0_ACCEPTED or document.get("stdout") != RUN_EXPECTED_STDOUT:
        raise SystemExit(f"Judge0 run: {status}: {json.dumps(document)[:1000]}")
    return wall_ms


def piston_run(client: Client, language: Language) -> float:
    body = {"language": language.piston_names[0], "version": "*", "files": [{"content": PYTHON_SOURCE}],
            "stdin": RUN_STDIN}
    wall_ms, status, document = client.request("POST", "/piston/api/v2/execute", {"Authorization": client.key}, body)
    run = (document.get("run") or {}) if isinstance(document, dict) else {}
    if status != 200 or run.get("code") != 0 or run.get("stdout") != RUN_EXPECTED_STDOUT:
        raise SystemExit(f"Piston run: {status}: {json.dumps(document)[:1000]}")
    return wall_ms


def peer_run(peer: BwrapJudge, language: Language) -> float:
    return check_peer(peer.judge(language, PYTHON_SOURCE, [Test(RUN_STDIN, RUN_EXPECTED_STDOUT)]), "single run").wall_ms


def single_runs(client: Client, peer: BwrapJudge, python: Language, args: argparse.Namespace
                ) -> dict[str, list[float]]:
    kinds: dict[str, Callable[[], float]] = {
        "judge0": lambda: judge0_run(client, python),
        "piston": lambda: piston_run(client, python),
        "peer": lambda: peer_run(peer, python),
    }
    samples_ms: dict[str, list[float]] = {kind: [] for kind in kinds}
    for run in kinds.values():
        for _ in range(args.warmup):
            run()
    order = list(kinds)
    for round_number, count in enumerate(service_bench.split(args.requests, args.rounds)):
        # Each kind takes each place in turn: none always runs right after the same other.
        for kind in order[round_number % 3:] + order[:round_number % 3]:
            samples_ms[kind].extend(kinds[kind]() for _ in range(count))
    return samples_ms


# --- report --------------------------------------------------------------------------------


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs > 0 else "-"


def submission_rows(figures: SubmissionFigures) -> list[tuple[str, str, str, str]]:
    ours_wall = [judgement.wall_ms for judgement in figures.ours]
    peer_wall = [judgement.wall_ms for judgement in figures.peer]
    ours_cpu = statistics.mean(j.compile_cpu_ms + j.tests_cpu_ms for j in figures.ours)
    peer_cpu = statistics.mean(j.compile_cpu_ms + j.tests_cpu_ms for j in figures.peer)
    ours_machine = figures.ours_machine_cpu_s * 1000 / len(figures.ours)
    peer_machine = figures.peer_machine_cpu_s * 1000 / len(figures.peer)
    return [
        (f"{figures.label}: wall p50, ms", f"{p50(ours_wall):.0f}", f"{p50(peer_wall):.0f}",
         ratio(p50(ours_wall), p50(peer_wall))),
        ("  wall mean, ms", f"{statistics.mean(ours_wall):.0f}", f"{statistics.mean(peer_wall):.0f}",
         ratio(statistics.mean(ours_wall), statistics.mean(peer_wall))),
        # Not like for like: the service's figure is its jobs' cgroups, without the container's
        # setup outside them; bwrap's is its processes' too, set-up included.
        ("  CPU: jobs' (service's accounting) / bwraps', ms (mean)", f"{ours_cpu:.0f}", f"{peer_cpu:.0f}",
         ratio(ours_cpu, peer_cpu)),
        ("  CPU of the whole machine, ms (mean)", f"{ours_machine:.0f}", f"{peer_machine:.0f}",
         ratio(ours_machine, peer_machine)),
    ]


def submission_summary(figures: SubmissionFigures) -> str:
    ours_wall = [judgement.wall_ms for judgement in figures.ours]
    peer_wall = [judgement.wall_ms for judgement in figures.peer]
    ours_compile = statistics.mean(j.compile_cpu_ms for j in figures.ours)
    ours_tests = statistics.mean(j.tests_cpu_ms for j in figures.ours)
    peer_compile = statistics.mean(j.compile_cpu_ms for j in figures.peer)
    peer_tests = statistics.mean(j.tests_cpu_ms for j in figures.peer)
    return (f"{figures.label}: sandboxd p50 {p50(ours_wall):.0f} ms (mean {statistics.mean(ours_wall):.0f}) vs "
            f"bwrap p50 {p50(peer_wall):.0f} ms (mean {statistics.mean(peer_wall):.0f}): ratio "
            f"{ratio(p50(ours_wall), p50(peer_wall))}; CPU, the service's accounting {ours_compile:.0f} compile + "
            f"{ours_tests:.0f} tests ms vs bwrap's processes {peer_compile:.0f} + {peer_tests:.0f} ms: ratio "
            f"{ratio(ours_compile + ours_tests, peer_compile + peer_tests)}; whole machine ratio "
            f"{ratio(figures.ours_machine_cpu_s, figures.peer_machine_cpu_s)} ({len(figures.ours)} submissions each)")


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("", "sandboxd", "bwrap", "ratio")
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                               for index, (cell, width) in enumerate(zip(row, widths))).rstrip())


def report(args: argparse.Namespace, parallel: int, versions: dict[str, str], cpp: SubmissionFigures,
           python: SubmissionFigures, runs_ms: dict[str, list[float]]) -> None:
    peer_p50 = p50(runs_ms["peer"])
    rows = [*submission_rows(cpp), *submission_rows(python)]
    for kind, api in (("judge0", "Judge0"), ("piston", "Piston")):
        label = f"{api} run (Python), wall p50, ms"
        rows.append((label, f"{p50(runs_ms[kind]):.1f}", f"{peer_p50:.1f}", ratio(p50(runs_ms[kind]), peer_p50)))
    print(f"\nsummary: --workers {args.workers} --warm {args.warm}, {os.cpu_count()} cores; g++ {versions['cpp']}, "
          f"Python {versions['python']}; tests {parallel} at once on both sides")
    print_table(rows)
    print()
    print(submission_summary(cpp))
    print(submission_summary(python))
    for kind, label in (("judge0", "Judge0"), ("piston", "Piston")):
        print(f"{label} single run (Python, {args.requests} requests): sandboxd p50 {p50(runs_ms[kind]):.1f} ms "
              f"(p90 {service_bench.percentile(runs_ms[kind], 0.9):.1f}) vs bwrap syntax check + run p50 "
              f"{peer_p50:.1f} ms (p90 {service_bench.percentile(runs_ms['peer'], 0.9):.1f}): ratio "
              f"{ratio(p50(runs_ms[kind]), peer_p50)}")


# --- main ----------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds alternating sandboxd and bwrap (default 5)")
    parser.add_argument("--tests", type=int, default=20, help="tests per submission (default 20, at most 100)")
    parser.add_argument("--submissions", type=int, default=30,
                        help="timed submissions per language on each side (default 30)")
    parser.add_argument("--requests", type=int, default=20, help="timed single runs per API and for bwrap (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed single runs of each kind first (default 2)")
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1),
                        help="sandboxd serve --workers (default: 2 x cores, as serve's own default)")
    # One prepared container per test in flight (MAX_PARALLEL_TESTS), so that a submission's
    # tests do not wait for containers being prepared.
    parser.add_argument("--warm", type=int, default=MAX_PARALLEL_TESTS,
                        help=f"sandboxd serve --warm (default {MAX_PARALLEL_TESTS}: a submission's tests in flight)")
    args = parser.parse_args()
    counts = (args.rounds, args.tests, args.submissions, args.requests, args.workers)
    if min(counts) < 1 or min(args.warm, args.warmup) < 0:
        parser.error("counts must be positive")
    if args.tests > 100:
        parser.error("a submission has at most 100 tests")
    args.rounds = min(args.rounds, args.submissions, args.requests)
    return args


def main() -> None:
    args = parse_arguments()
    if not shutil.which("bwrap"):
        raise SystemExit("bench needs bubblewrap (apt-get install bubblewrap) as the peer")
    # SIGTERM to the bench stops the service and cleans up, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    catalogue = load_languages()
    cpp, python = catalogue["cpp"], catalogue["python"]

    neighbours = service_bench.busy_neighbours()
    busy_s = service_bench.machine_busy_s()
    time.sleep(1.0)
    busy_s = service_bench.machine_busy_s() - busy_s
    print(f"machine: {os.cpu_count()} cores, {100 * busy_s / (os.cpu_count() or 1):.0f}% busy in the second before; "
          + (f"ALSO RUNNING: {'; '.join(neighbours)}" if neighbours else "no known CPU-heavy neighbour running"))
    service = service_bench.Service(args.workers, args.warm, None)
    peer: BwrapJudge | None = None
    try:
        service.start()
        print(f"service: sandboxd serve --workers {args.workers} --warm {args.warm} on {service.host}:{service.port}")
        client = Client(service)
        started_s = time.monotonic()
        versions = wait_for_languages(client, [cpp.id, python.id])
        print(f"languages probed in {time.monotonic() - started_s:.1f} s: g++ {versions['cpp']}, "
              f"Python {versions['python']}")
        parallel = tenant_parallel_tests(service)
        print(f"a submission's tests run {parallel} at once in the service (parallel_tests(): "
              f"min({MAX_PARALLEL_TESTS}, the tenant's limits: none)); the bwrap judge runs as many")
        peer = BwrapJudge(parallel)
        print(f"submissions: {args.submissions} per language on each side, {args.tests} tests each, "
              f"{args.rounds} rounds alternating, one untimed each first")
        cpp_figures = submissions(client, peer, cpp, CPP_SOURCE, args)
        python_figures = submissions(client, peer, python, PYTHON_SOURCE, args)
        print(f"single runs: {args.requests} each of Judge0, Piston and bwrap, {args.warmup} untimed each first")
        runs_ms = single_runs(client, peer, python, args)
        client.close()
    finally:
        if peer is not None:
            peer.close()
        service.stop()
    if service.exit_code != 0:
        raise SystemExit(f"the service exited with {service.exit_code}")
    if service_bench.busy_neighbours() and not neighbours:
        print("note: a known CPU-heavy neighbour started during the run: the figures are disturbed")
    report(args, parallel, versions, cpp_figures, python_figures, runs_ms)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the service was stopped", file=sys.stderr)
        sys.exit(130)
