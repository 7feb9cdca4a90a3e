"""Launch-to-exit of /bin/true through the runtime's Python API, against bubblewrap.

    .venv/bin/python bench/launch.py [--runs N] [--state-dir DIR]

Both are measured in the same run, interleaved, so machine drift affects both alike. The
peer is `bwrap --unshare-all --ro-bind / / --die-with-parent /bin/true`, started the way a
service would start it (fork + exec from this process). Prints p50/p90 and the ratio.

What is timed for sandboxd: Runtime.run() from the call to the Result, with a full cgroup
(caps and accounting) and seccomp, which bwrap does not set up. The runtime keeps --warm
prepared containers (the default a service uses) and returns the Result once the job has
ended and its output is complete; the container's teardown and cgroup removal finish
after, off the result's path (Runtime.settle() waits for them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sandboxd.job import JobSpec
from sandboxd.limits import default_limit_policy
from sandboxd.runtime.launch import Runtime

BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--die-with-parent", "/bin/true"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--warm", type=int, default=2, help="prepared containers kept ready (0: cold starts)")
    args = parser.parse_args()
    if not shutil.which("bwrap"):
        raise SystemExit("bench needs bubblewrap (apt-get install bubblewrap) as the peer")
    own_state_dir = args.state_dir is None
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    try:
        measure(args, state_dir)
    finally:
        if own_state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


def measure(args: argparse.Namespace, state_dir: Path) -> None:
    runtime = Runtime(state_dir=state_dir, warm_containers=args.warm)
    limits = default_limit_policy().defaults
    ours: list[float] = []
    peer: list[float] = []
    for index in range(args.runs + 10):
        started = time.perf_counter()
        result = runtime.run(JobSpec(argv=("/bin/true",), limits=limits))
        ours_ms = (time.perf_counter() - started) * 1000
        if result.status != "ok":
            raise SystemExit(f"sandboxd run failed: {result}")
        started = time.perf_counter()
        subprocess.run(BWRAP, check=True)
        peer_ms = (time.perf_counter() - started) * 1000
        if index >= 10:  # warm-up: caches, the host layer, the seccomp filter
            ours.append(ours_ms)
            peer.append(peer_ms)
    ratios = [a / b for a, b in zip(ours, peer)]
    print(f"runs: {args.runs} each, interleaved; warm containers: {args.warm}")
    print(f"sandboxd Runtime.run /bin/true: p50 {percentile(ours, 0.5):.2f} ms  p90 {percentile(ours, 0.9):.2f} ms")
    print(f"bwrap --unshare-all /bin/true:  p50 {percentile(peer, 0.5):.2f} ms  p90 {percentile(peer, 0.9):.2f} ms")
    print(f"ratio sandboxd/bwrap: p50 {percentile(ours, 0.5) / percentile(peer, 0.5):.2f}  "
          f"p90 {percentile(ours, 0.9) / percentile(peer, 0.9):.2f}  "
          f"median of pairwise ratios {statistics.median(ratios):.2f}")
    runtime.close()


if __name__ == "__main__":
    main()
