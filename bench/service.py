"""The job service end to end over HTTP, against bubblewrap run from a shell loop.

    .venv/bin/python bench/service.py [--workers N] [--warm N] [--requests N] [--jobs N]
                                      [--rounds N] [--clients N] [--profile FILE]

Starts the real `sandboxd serve` on a loopback port in a temporary state directory with a
fresh tenant, and measures, in the same run as the peer, `bwrap --unshare-all --ro-bind / /
/bin/true`:

1. Latency: `POST /v1/jobs?wait=true` with `{"cmd": ["/bin/true"]}`, one request at a time
   over one keep-alive connection, client-side wall time per request (after warm-up
   requests). The peer is one bash loop running bwrap back to back that stamps
   $EPOCHREALTIME (a builtin: no fork) after each iteration, so a sample is the time a shell
   takes to fork, exec and reap one bwrap. The two alternate in --rounds rounds, so machine
   drift affects both alike. Target: service p50 <= 1.5 x bwrap p50.
2. Throughput: --clients concurrent clients (threads, one keep-alive connection each)
   submitting `/bin/true` jobs with wait=true back to back until --jobs have been answered;
   jobs/s = jobs / elapsed. The peer is as many bash loops running bwrap in parallel, the
   same number of runs in all. Measured in two halves, service and peer alternating.
   Target: >= 150 jobs/s. Also printed: the whole machine's CPU time per job during each
   phase (/proc/stat; the service's includes this process's client threads), which tells
   whether the figure is bound by CPU.

The service also logs its own duration of each request; their p50 is printed next to the
client-side one, the difference being HTTP and loopback TCP.

A benchmark, not a test: it reports figures and whether the targets are met, and exits 0
unless the service could not be run or a job failed. With --profile FILE the service runs
under cProfile (its main thread: the event loop, HTTP, scheduling, logging; the launcher is
a process of its own and is not covered) and the top entries are printed; the timings of
such a run are not comparable with a plain one.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "/bin/true"]
JOB_BODY = json.dumps({"cmd": ["/bin/true"]}).encode()
JOB_PATH = "/v1/jobs?wait=true"
LATENCY_TARGET_RATIO = 1.5
THROUGHPUT_TARGET = 150.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
URL_RE = re.compile(r"sandboxd is serving on http://([^\s:/]+|\[[^\]]+\]):(\d+)")

# One shell, n runs of the command in its arguments; a timestamp in microseconds before the
# first and after each run. ${EPOCHREALTIME} is expanded by bash itself: no fork per stamp.
SHELL_LOOP = r"""
n=$1; shift
printf '%s\n' "${EPOCHREALTIME/[.,]/}"
for ((i = 0; i < n; i++)); do
    "$@" || { echo "run $i failed with status $?" >&2; exit 1; }
    printf '%s\n' "${EPOCHREALTIME/[.,]/}"
done
"""


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def split(total: int, parts: int) -> list[int]:
    """total as `parts` near-equal counts."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


# --- the service ---------------------------------------------------------------------------


class Service:
    """`sandboxd serve` in a temporary state directory; stdout and stderr go to files there
    (its JSON log has a line per request: a pipe nobody reads would fill and stall it)."""

    def __init__(self, workers: int, warm: int, profile: Path | None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="sandboxd-bench-service-"))
        self.state_dir = self.temp / "state"
        self.stdout_path = self.temp / "service.out"
        self.stderr_path = self.temp / "service.err"
        self.workers = workers
        self.warm = warm
        self.profile = profile
        self.process: subprocess.Popen | None = None
        self.host = ""
        self.port = 0
        self.key = ""
        self.exit_code: int | None = None

    def _sandboxd(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"sandboxd {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.key = json.loads(self._sandboxd("tenant", "add", "bench", "--json",
                                             "--state-dir", str(self.state_dir)))["api_key"]
        command = [sys.executable]
        if self.profile is not None:
            command += ["-m", "cProfile", "-o", str(self.profile)]
        command += ["-m", "sandboxd", "serve", "--port", "0", "--state-dir", str(self.state_dir),
                    "--workers", str(self.workers), "--warm", str(self.warm)]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # A session of its own: a Ctrl-C here must not start its drain behind our back;
            # stop() ends it.
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = URL_RE.search(self.stdout_path.read_text(errors="replace"))
            if match:
                self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"the service did not start (exit code {self.process.poll()}):\n"
                         f"{self.stdout_path.read_text(errors='replace')}\n{self.stderr_tail()}")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def log_size(self) -> int:
        return self.stderr_path.stat().st_size

    def request_durations_ms(self, start: int, end: int) -> list[float]:
        """duration_ms of the job submissions the service logged between two log offsets."""
        with open(self.stderr_path, "rb") as log:
            log.seek(start)
            chunk = log.read(end - start)
        durations = []
        for line in chunk.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "request" and event.get("path") == "/v1/jobs" and event.get("status") == 201:
                durations.append(float(event["duration_ms"]))
        return durations

    def stderr_tail(self, lines: int = 40) -> str:
        if not self.stderr_path.exists():
            return ""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT_S; then remove the temporary directory. A
        second Ctrl-C (or SIGTERM) meanwhile is ignored: it must not leave the service behind."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if self.process is not None:
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGTERM)
                try:
                    self.exit_code = self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"the service did not exit {STOP_TIMEOUT_S:.0f} s after SIGTERM: killing it")
                    self.process.kill()
                    self.exit_code = self.process.wait()
                print(f"service stopped: exit code {self.exit_code}")
                if self.exit_code != 0:
                    print(f"the service exited with {self.exit_code}; the end of its stderr:\n{self.stderr_tail()}")
        finally:
            self._remove_temp()

    def _remove_temp(self) -> None:
        # Never recurse into something mounted below it (a container's layers, had one been
        # left in this mount namespace): removing would reach into what is mounted there.
        prefix = str(self.temp) + "/"
        with open("/proc/self/mountinfo") as mountinfo:
            mounted = [line.split()[4] for line in mountinfo if line.split()[4].startswith(prefix)]
        if mounted:
            print(f"left {self.temp} in place: mounts below it: {', '.join(mounted)}")
            return
        shutil.rmtree(self.temp, ignore_errors=True)


@dataclass
class Outcome:
    """What the service answered one submission, and how long it took."""

    elapsed_ns: int
    kind: str  # "201 ok" when all went well
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.kind == "201 ok"


def submit(connection: http.client.HTTPConnection, headers: dict[str, str]) -> Outcome:
    started = time.perf_counter_ns()
    try:
        connection.request("POST", JOB_PATH, JOB_BODY, headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        elapsed = time.perf_counter_ns() - started
        connection.close()  # the next request opens a new connection
        return Outcome(elapsed, f"error {type(error).__name__}", str(error).encode())
    elapsed = time.perf_counter_ns() - started
    try:
        document = json.loads(body)
    except ValueError:
        return Outcome(elapsed, f"{response.status} unparsable", body)
    if response.status == 201:
        result = document.get("result") or {}
        return Outcome(elapsed, f"201 {result.get('status', document.get('state'))}", body)
    return Outcome(elapsed, f"{response.status} {(document.get('error') or {}).get('code')}", body)


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    failures: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.kind] += 1
        if not outcome.ok and len(self.failures) < 5:
            self.failures.append(outcome)

    def report(self, label: str) -> None:
        print(f"  {label} answers: " + ", ".join(f"{kind}: {count}" for kind, count in sorted(self.counts.items())))
        for failure in self.failures:
            print(f"    failed: {failure.kind}: {failure.body[:600].decode(errors='replace')}")

    @property
    def all_ok(self) -> bool:
        return set(self.counts) <= {"201 ok"}


# --- the peer ------------------------------------------------------------------------------


def start_shell_loop(runs: int) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", SHELL_LOOP, "bash", str(runs), *BWRAP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})


def finish_shell_loop(process: subprocess.Popen) -> list[int]:
    """The loop's timestamps, microseconds."""
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the bwrap loop failed ({process.returncode}): {err.decode(errors='replace')}")
    return [int(line) for line in out.split()]


def bwrap_iterations_ms(runs: int) -> list[float]:
    stamps = finish_shell_loop(start_shell_loop(runs))
    return [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]


def bwrap_parallel(loops: int, runs: int) -> float:
    """`runs` bwrap runs over `loops` parallel shell loops: seconds from the first start to the last end."""
    processes = [start_shell_loop(count) for count in split(runs, loops) if count]
    stamps = [finish_shell_loop(process) for process in processes]
    return (max(s[-1] for s in stamps) - min(s[0] for s in stamps)) / 1e6


def machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


# --- phases --------------------------------------------------------------------------------


def latency(service: Service, args: argparse.Namespace) -> dict[str, list[float]]:
    connection = service.connection()
    headers = service.headers()
    tally = Tally()
    for _ in range(args.warmup):
        tally.add(submit(connection, headers))
    bwrap_iterations_ms(args.warmup)
    sockets = [connection.sock]  # held, so that a reconnection shows as a new object
    ours: list[float] = []
    peer: list[float] = []
    server_side: list[float] = []
    for count in split(args.requests, args.rounds):
        log_start = service.log_size()
        for _ in range(count):
            outcome = submit(connection, headers)
            if connection.sock is not sockets[-1]:
                sockets.append(connection.sock)
            tally.add(outcome)
            ours.append(outcome.elapsed_ns / 1e6)
        server_side += service.request_durations_ms(log_start, service.log_size())
        peer += bwrap_iterations_ms(count)
    connection.close()
    print(f"latency: {args.requests} requests over one keep-alive connection "
          f"({len(sockets)} TCP connection{'s' if len(sockets) > 1 else ''} used), {args.warmup} warm-up; "
          f"{args.rounds} rounds alternating with the bwrap loop")
    tally.report("service")
    if not tally.all_ok:
        raise SystemExit("some latency requests failed")
    return {"ours": ours, "peer": peer, "server": server_side}


def service_throughput(service: Service, connections: list[http.client.HTTPConnection], jobs: int,
                       tally: Tally, latencies_ms: list[float]) -> float:
    """`jobs` submissions over the clients' connections, back to back; the seconds it took."""
    tickets = itertools.count()
    headers = service.headers()
    started: list[int] = []
    barrier = threading.Barrier(len(connections), action=lambda: started.append(time.perf_counter_ns()))
    ended: list[int] = []
    lock = threading.Lock()

    def client(connection: http.client.HTTPConnection) -> None:
        outcomes = []
        barrier.wait()
        while next(tickets) < jobs:
            outcomes.append(submit(connection, headers))
        finished = time.perf_counter_ns()
        with lock:
            ended.append(finished)
            for outcome in outcomes:
                tally.add(outcome)
                latencies_ms.append(outcome.elapsed_ns / 1e6)

    threads = [threading.Thread(target=client, args=(connection,), daemon=True) for connection in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # in slices: Ctrl-C stays responsive
    return (max(ended) - started[0]) / 1e9


def throughput(service: Service, args: argparse.Namespace) -> dict[str, float]:
    connections = [service.connection() for _ in range(args.clients)]
    warm_tally = Tally()
    service_throughput(service, connections, 2 * args.clients, warm_tally, [])
    if not warm_tally.all_ok:
        warm_tally.report("warm-up")
        raise SystemExit("warm-up submissions failed")
    bwrap_parallel(args.clients, 2 * args.clients)
    tally = Tally()
    under_load: list[float] = []
    ours_s = peer_s = ours_cpu_s = peer_cpu_s = 0.0
    for half in split(args.jobs, 2):
        busy = machine_busy_s()
        ours_s += service_throughput(service, connections, half, tally, under_load)
        ours_cpu_s += machine_busy_s() - busy
        busy = machine_busy_s()
        peer_s += bwrap_parallel(args.clients, half)
        peer_cpu_s += machine_busy_s() - busy
    for connection in connections:
        connection.close()
    print(f"throughput: {args.jobs} jobs from {args.clients} concurrent clients (keep-alive, wait=true), "
          f"{2 * args.clients} warm-up; two halves alternating with {args.clients} parallel bwrap loops")
    tally.report("service")
    print(f"  service latency under load: p50 {percentile(under_load, 0.5):.2f} ms  "
          f"p99 {percentile(under_load, 0.99):.2f} ms")
    if not tally.all_ok:
        raise SystemExit("some throughput submissions failed")
    return {"ours": args.jobs / ours_s, "peer": args.jobs / peer_s,
            "ours_cpu_ms": ours_cpu_s / args.jobs * 1000, "peer_cpu_ms": peer_cpu_s / args.jobs * 1000}


# --- report --------------------------------------------------------------------------------


def busy_neighbours() -> list[str]:
    """Other processes known to eat this machine's CPU (a VM test lane)."""
    found = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line[:120] for line in found.splitlines() if line.strip()]


def print_profile(path: Path, lines: int = 30) -> None:
    if not path.exists():
        print(f"no profile written to {path}")
        return
    stats = pstats.Stats(str(path))
    stats.strip_dirs()
    print(f"\nservice profile ({path}), main thread, by own time:")
    stats.sort_stats("tottime").print_stats(lines)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(lines)


def summary(args: argparse.Namespace, lat: dict[str, list[float]], tput: dict[str, float]) -> None:
    ours_p50, ours_p99 = percentile(lat["ours"], 0.5), percentile(lat["ours"], 0.99)
    peer_p50, peer_p99 = percentile(lat["peer"], 0.5), percentile(lat["peer"], 0.99)
    ratio = ours_p50 / peer_p50
    rows = [
        ("latency p50, ms", f"{ours_p50:.2f}", f"{peer_p50:.2f}", f"{ratio:.2f}",
         f"ratio <= {LATENCY_TARGET_RATIO}", "met" if ratio <= LATENCY_TARGET_RATIO else "MISSED"),
        ("latency p99, ms", f"{ours_p99:.2f}", f"{peer_p99:.2f}", f"{ours_p99 / peer_p99:.2f}", "", ""),
        (f"throughput, jobs/s ({args.clients} clients)", f"{tput['ours']:.1f}", f"{tput['peer']:.1f}",
         f"{tput['ours'] / tput['peer']:.2f}", f">= {THROUGHPUT_TARGET:.0f} jobs/s",
         "met" if tput["ours"] >= THROUGHPUT_TARGET else "MISSED"),
        ("CPU per job under load, ms (all cores)", f"{tput['ours_cpu_ms']:.1f}", f"{tput['peer_cpu_ms']:.1f}",
         f"{tput['ours_cpu_ms'] / tput['peer_cpu_ms']:.2f}", "", ""),
    ]
    if lat["server"]:
        server_p50 = percentile(lat["server"], 0.5)
        print(f"latency, the service's own request log: p50 {server_p50:.2f} ms  "
              f"p99 {percentile(lat['server'], 0.99):.2f} ms  (client-side p50 adds {ours_p50 - server_p50:.2f} ms: "
              f"HTTP client, loopback TCP)")
    header = ("", "sandboxd", "bwrap", "ratio", "target", "")
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    print(f"\nsummary: --workers {args.workers} --warm {args.warm}, {os.cpu_count()} cores"
          + ("  (PROFILED: figures not comparable)" if args.profile else ""))
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                               for index, (cell, width) in enumerate(zip(row, widths))).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16, help="sandboxd serve --workers (default 16)")
    parser.add_argument("--warm", type=int, default=4, help="sandboxd serve --warm (default 4)")
    parser.add_argument("--requests", type=int, default=300, help="timed latency requests (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="latency warm-up requests (default 20)")
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds alternating with bwrap (default 10)")
    parser.add_argument("--jobs", type=int, default=1000, help="throughput jobs in all (default 1000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent throughput clients (default 16)")
    parser.add_argument("--profile", type=Path, help="run the service under cProfile, stats to this file")
    args = parser.parse_args()
    if min(args.workers, args.requests, args.rounds, args.jobs, args.clients) < 1 or min(args.warm, args.warmup) < 0:
        parser.error("counts must be positive")
    args.rounds = min(args.rounds, args.requests)
    if not shutil.which("bwrap"):
        raise SystemExit("bench needs bubblewrap (apt-get install bubblewrap) as the peer")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    # SIGTERM to the bench stops the service and cleans up, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    neighbours = busy_neighbours()
    busy = machine_busy_s()
    time.sleep(1.0)
    busy = machine_busy_s() - busy
    print(f"machine: {os.cpu_count()} cores, {100 * busy / (os.cpu_count() or 1):.0f}% busy in the second before; "
          + (f"ALSO RUNNING: {'; '.join(neighbours)}" if neighbours else "no qemu-system running"))
    service = Service(args.workers, args.warm, args.profile)
    try:
        service.start()
        print(f"service: sandboxd serve --workers {args.workers} --warm {args.warm} on {service.host}:{service.port}"
              + (" under cProfile" if args.profile else ""))
        lat = latency(service, args)
        tput = throughput(service, args)
    finally:
        service.stop()
    if busy_neighbours() and not neighbours:
        print("note: a qemu-system process started during the run: the figures are disturbed")
    summary(args, lat, tput)
    if args.profile is not None:
        print_profile(args.profile)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the service was stopped", file=sys.stderr)
        sys.exit(130)
