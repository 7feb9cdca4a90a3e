"""Images: builds of the shipped judge image, and pushes and pulls of its layers against a real
registry on loopback, with skopeo (Debian's) as the peer in the same run.

    .venv/bin/python bench/registry.py [--rounds N]

1. Build: `images/judge` into an empty state directory (cold), then again (warm: every step
   from the build cache). Times include the build's own process work, not Python's start.
2. Push and pull: the judge image is built FROM host, whose base stays on this machine, so
   what travels is its layers (the precompiled header, the judge scripts): they are named as
   an image FROM scratch for the run. Each round starts a fresh Debian `docker-registry`
   (distribution 2.8) on loopback, so nothing is there yet and no client can mount a blob
   from an earlier round, then alternates:
   - push: `sandboxd image push` vs `skopeo copy oci-archive:<the same image> docker://...`;
   - pull: `sandboxd image pull` into an empty store (download, verify, unpack) vs `skopeo
     copy docker://... oci:<empty dir>` (download and verify; skopeo does not unpack).
   Whole-process wall times, the median over --rounds, and their ratio (sandboxd / skopeo).
   skopeo gzips uncompressed layers when it pushes (its default); sandboxd sends the blobs
   as stored, so the push figures compare what each client does by default.

A benchmark, not a test: it prints figures and exits 0 unless something could not be run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "images")]

from registryd import start_registry  # noqa: E402  (tests/images: the registry the tests use)
from sandboxd.images.build import build_image, read_spec  # noqa: E402
from sandboxd.images.oci import save_image  # noqa: E402
from sandboxd.images.store import ImageStore  # noqa: E402
from sandboxd.units import human_bytes  # noqa: E402


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    elapsed_s = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return elapsed_s


def _build(state: Path) -> float:
    spec, name = read_spec(REPO / "images" / "judge" / "Imagefile")
    started = time.perf_counter()
    build_image(spec, name, REPO / "images" / "judge", "judge", state, io.StringIO())
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/bootstrap.sh --test installs it)")
    sandboxd = [sys.executable, "-m", "sandboxd", "image"]
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as scratch:
        work = Path(scratch)
        state = work / "state"
        state.mkdir(mode=0o711)
        cold_s, warm_s = _build(state), _build(state)
        store = ImageStore(state)
        _, judge = store.resolve("judge")
        size_bytes = sum(layer.blob_size_bytes for layer in judge.layers)
        print(f"judge image: {len(judge.layers)} layers, {human_bytes(size_bytes)}; "
              f"build cold {cold_s:.1f} s, warm {warm_s * 1000:.0f} ms")
        store.tag("judge-layers:bench", store.save(dataclasses.replace(judge, base="scratch")))
        layout = work / "judge-layers.tar"
        save_image(store, "judge-layers:bench", layout)
        times: dict[str, list[float]] = {"push": [], "skopeo push": [], "pull": [], "skopeo pull": []}
        for round_number in range(args.rounds):
            with start_registry(work / f"registry-{round_number}") as registry:
                ours, theirs = f"{registry.host}/bench/ours:1", f"{registry.host}/bench/skopeo:1"
                pushes = [("push", sandboxd + ["push", "--state-dir", str(state), "judge-layers:bench", ours]),
                          ("skopeo push", ["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                           f"oci-archive:{layout}", f"docker://{theirs}"])]
                pulled = work / f"pulled-{round_number}"
                pulled.mkdir(mode=0o711)
                pulls = [("pull", sandboxd + ["pull", "--state-dir", str(pulled), ours]),
                         ("skopeo pull", ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ours}",
                                          f"oci:{work / f'skopeo-{round_number}'}:judge"])]
                for pair in (pushes, pulls):
                    for label, argv in pair if round_number % 2 == 0 else reversed(pair):
                        times[label].append(_timed(argv))
            shutil.rmtree(pulled, ignore_errors=True)
        for verb in ("push", "pull"):
            ours_s, theirs_s = statistics.median(times[verb]), statistics.median(times[f"skopeo {verb}"])
            print(f"{verb}: sandboxd {ours_s:.2f} s, skopeo {theirs_s:.2f} s, ratio {ours_s / theirs_s:.2f} "
                  f"(medians of {args.rounds}; {human_bytes(int(size_bytes / ours_s))}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
