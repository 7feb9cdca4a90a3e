"""The image specs shipped in images/ build on this machine and do what they say."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import EMULATED_CPU, job, leftover_job_cgroups, run_once
from sandboxd.images.build import build_image, read_spec

IMAGES = Path(__file__).resolve().parents[2] / "images"


@pytest.fixture(scope="module")
def shipped_state(tmp_path_factory):
    state = tmp_path_factory.mktemp("shipped")
    state.chmod(0o711)
    yield state
    assert leftover_job_cgroups() == []


def _run(state: Path, image: str, argv: list[str]):
    return run_once(state, job(argv, image=image))


def test_the_minimal_image_is_busybox_alone_and_runs_as_the_sandbox_user(shipped_state):
    spec, name = read_spec(IMAGES / "minimal" / "Imagefile")
    build_image(spec, name, Path("/usr/bin"), "minimal", shipped_state, io.StringIO())
    result = _run(shipped_state, "minimal", ["sh", "-c", "ls /; echo --; id -u; test -e /usr/bin/python3 || echo none"])
    assert result.status == "ok", result
    top, rest = result.stdout.decode().split("--\n")
    assert set(top.split()) == {"bin", "dev", "etc", "proc", "tmp", "work"}
    assert rest.split() == ["1000", "none"]  # the sandbox user, and nothing of the host's /usr


@pytest.mark.skipif(EMULATED_CPU, reason="the cgroup-v2 VM has no javac nor node, and under emulation "
                                         "the 100 MB precompiled header alone takes minutes")
def test_the_judge_image_compiles_and_runs_every_language(shipped_state):
    spec, name = read_spec(IMAGES / "judge" / "Imagefile")
    output = io.StringIO()
    build_image(spec, name, IMAGES / "judge", "judge", shipped_state, output)
    assert [line for line in output.getvalue().splitlines() if line in ("c", "cpp", "java", "python", "javascript")] \
        == ["c", "cpp", "java", "python", "javascript"]
    script = ("printf '#include <bits/stdc++.h>\\nint main(){int a,b;std::cin>>a>>b;std::cout<<a+b;}' > a.cpp && "
              "g++ -std=gnu++17 -O2 -pipe -I/opt/judge/include -Winvalid-pch -H -o /dev/null a.cpp 2>&1 | head -1 && "
              "judge-compile cpp a.cpp && echo '2 40' | ./main")
    result = _run(shipped_state, "judge", ["sh", "-c", script])
    assert result.status == "ok", result
    pch, answer = result.stdout.decode().splitlines()
    assert pch.startswith("! ") and pch.endswith("stdc++.h.gch")  # "!": the precompiled header was used
    assert answer == "42"
