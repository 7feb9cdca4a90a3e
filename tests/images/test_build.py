"""Building images from specs with real build containers, and running jobs over them."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import job, leftover_job_cgroups, run_once
from sandboxd.images.build import BuildError, build_image
from sandboxd.images.spec import parse_spec
from sandboxd.images.store import ImageStore


@pytest.fixture
def build_state(tmp_path):
    """A state dir of its own (images, layers, the build cache), checked for leaks after."""
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    yield state
    assert leftover_job_cgroups() == []
    assert not (state / "images" / "tmp").exists() or list((state / "images" / "tmp").iterdir()) == []


def _build(state: Path, context: Path, text: str, name: str = "test:1") -> tuple[str, list[str]]:
    out = io.StringIO()
    _, image_id = build_image(parse_spec(text, "Imagefile"), "Imagefile", context, name, state, out)
    return image_id, out.getvalue().splitlines()


def _run(state: Path, image: str, argv: list[str]):
    return run_once(state, job(argv, image=image))


def _verdicts(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines if line.startswith(" ---> ")]


SPEC = """FROM host
WORKDIR /opt/app
COPY first.txt ./
COPY second.txt ./
RUN cat first.txt second.txt > both.txt
"""


def test_a_second_build_does_no_work_and_a_changed_copy_input_rebuilds_from_there(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "first.txt").write_text("one\n")
    (context / "second.txt").write_text("two\n")
    _, first = _build(build_state, context, SPEC)
    assert _verdicts(first) == ["layer", "layer", "layer"]
    _, again = _build(build_state, context, SPEC)
    assert _verdicts(again) == ["cached", "cached", "cached"]
    (context / "second.txt").write_text("TWO\n")
    _, changed = _build(build_state, context, SPEC)
    assert _verdicts(changed) == ["cached", "layer", "layer"]
    result = _run(build_state, "test:1", ["cat", "/opt/app/both.txt"])
    assert (result.status, result.stdout) == ("ok", b"one\nTWO\n")


def test_a_file_deleted_in_an_upper_layer_is_absent_in_the_container(build_state, tmp_path):
    _build(build_state, tmp_path, "FROM host\nRUN mkdir -p /opt/d && echo x > /opt/d/gone && echo y > /opt/d/kept\n",
           "base:1")
    _build(build_state, tmp_path, "FROM base:1\nRUN rm /opt/d/gone\n", "derived:1")
    result = _run(build_state, "derived:1", ["sh", "-c", "ls /opt/d; test ! -e /opt/d/gone"])
    assert (result.status, result.stdout) == ("ok", b"kept\n")
    assert _run(build_state, "base:1", ["cat", "/opt/d/gone"]).stdout == b"x\n"


def test_a_job_over_a_scratch_image_sees_only_that_images_files(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    shutil.copy("/usr/sbin/ldconfig", context / "ldconfig")  # statically linked: runs alone
    _build(build_state, context, "FROM scratch\nCOPY ldconfig /bin/\n", "tiny:1")
    result = _run(build_state, "tiny:1", ["/bin/ldconfig", "--version"])
    assert result.status == "ok" and b"ldconfig" in result.stdout
    missing = _run(build_state, "tiny:1", ["/bin/sh", "-c", "true"])
    assert missing.exit_code == 127 and "cannot execute" in (missing.message or "")


def test_jobs_over_a_built_image_run_as_the_sandbox_user_and_steps_as_root(build_state, tmp_path):
    _, lines = _build(build_state, tmp_path, "FROM host\nRUN id -u > /opt/step-uid\n", "ids:1")
    result = _run(build_state, "ids:1", ["sh", "-c", "cat /opt/step-uid; id -u"])
    assert result.stdout == b"0\n1000\n"


def test_a_failing_run_step_names_its_line_and_leaves_no_image(build_state, tmp_path):
    with pytest.raises(BuildError, match=r"Imagefile:3: RUN failed \(exit code 3\)"):
        _build(build_state, tmp_path, "FROM host\nENV A=1\nRUN exit 3\n", "broken:1")
    from sandboxd.images.store import ImageStore

    assert ImageStore(build_state).list_images() == []


def test_copy_never_follows_a_symlink_out_of_the_context(build_state, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("s3cret")
    context = tmp_path / "ctx"
    context.mkdir()
    os.symlink(secret, context / "door")
    with pytest.raises(BuildError, match="symlink"):
        _build(build_state, context, "FROM host\nCOPY door/key /opt/\n", "leak:1")
    _build(build_state, context, "FROM host\nCOPY door /opt/door\n", "link:1")
    result = _run(build_state, "link:1", ["sh", "-c", "readlink /opt/door; cat /opt/door/key"])
    assert result.stdout == str(secret).encode() + b"\n"  # a dangling link in the image, no secret


def test_run_has_no_network_unless_the_step_asks(build_state, tmp_path):
    _build(build_state, tmp_path, "FROM host\nRUN readlink /proc/self/ns/net > /opt/off\n"
           "RUN --network=default readlink /proc/self/ns/net > /opt/on\n", "net:1")
    result = _run(build_state, "net:1", ["sh", "-c", "cat /opt/off /opt/on"])
    off, on = result.stdout.decode().split()
    assert on == os.readlink("/proc/self/ns/net")  # the host's network namespace
    assert off != on


def test_the_cli_builds_lists_inspects_removes_and_prunes(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Imagefile").write_text("FROM host\nLABEL role=demo\nCOPY Imagefile /opt/spec\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sandboxd", "image", *args, "--state-dir", str(build_state)],
                              capture_output=True, text=True, timeout=120)

    built = cli("build", "-t", "demo:v1", str(context))
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[0] == "Step 1/3 : FROM host" and "Built demo:v1" in built.stdout
    assert "demo:v1" in cli("ls").stdout
    assert '"role"' in cli("inspect", "demo:v1").stdout
    assert cli("rm", "demo:v1").returncode == 0
    assert cli("prune").stdout.count("removed layer") == 1
    assert cli("inspect", "demo:v1").returncode == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Imagefile").write_text("FROM host\nADD x /y\n")
    refused = cli("build", "-t", "bad:1", str(bad))
    assert refused.returncode == 2 and "Imagefile:2:" in refused.stderr


def test_two_builds_of_one_image_at_once_both_succeed_and_leave_one_consistent_store(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Imagefile").write_text("FROM host\nCOPY Imagefile /opt/spec\nRUN mkdir -p /opt/made && echo x > /opt/made/x\n")
    argv = [sys.executable, "-m", "sandboxd", "image", "build", "-t", "twice:1", "--state-dir", str(build_state),
            str(context)]
    builds = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [build.communicate(timeout=120)[0].decode() for build in builds]
    assert [build.returncode for build in builds] == [0, 0], outputs
    assert [name for name, _, _ in ImageStore(build_state).list_images()] == ["twice:1"]
    result = _run(build_state, "twice:1", ["cat", "/opt/spec", "/opt/made/x"])
    assert (result.status, result.stdout.decode().splitlines()[-1]) == ("ok", "x")


def test_a_step_beyond_the_layers_containers_stack_names_its_line(build_state, tmp_path, monkeypatch):
    import sandboxd.images.build

    monkeypatch.setattr(sandboxd.images.build, "MAX_IMAGE_LAYERS", 2)
    (tmp_path / "a").write_text("a")
    with pytest.raises(BuildError, match="Imagefile:4: this step would make layer 3: containers stack at most 2"):
        _build(build_state, tmp_path, "FROM scratch\nCOPY a /a\nCOPY a /b\nCOPY a /c\n")
