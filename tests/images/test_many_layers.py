"""Images of many layers: more than one page of mount options would hold as absolute paths
(Docker allows about 125 layers; OverlayFS stacks up to 500 lower dirs)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import EMULATED_CPU, job, leftover_job_cgroups, run_once
from sandboxd.images import Image, ImageMount
from sandboxd.images.build import build_image
from sandboxd.images.spec import parse_spec
from sandboxd.runtime.mnt import OVERLAY_MAX_LOWER_LAYERS, MountPlanError, RootfsPlan

LAYERS = 130
BUSYBOX = Path("/usr/bin/busybox")  # statically linked (busybox-static): runs alone
# A build of 130 steps under emulation (the cgroup-v2 VM lane) takes about two minutes
# rootless, where the store adds each layer through a helper process (a second each there).
MANY_STEPS_TIMEOUT = pytest.mark.timeout(600 if EMULATED_CPU else 120)


@pytest.fixture
def build_state(tmp_path):
    """A state dir of its own (images, layers, the build cache), checked for leaks after.
    Its name has a ':', which OverlayFS reads as a separator in lowerdir only."""
    state = tmp_path / "st:ate"
    state.mkdir(mode=0o711)
    yield state
    assert leftover_job_cgroups() == []
    assert not (state / "images" / "tmp").exists() or list((state / "images" / "tmp").iterdir()) == []


def _build(state: Path, context: Path, text: str, name: str) -> list[str]:
    out = io.StringIO()
    build_image(parse_spec(text, "Imagefile"), "Imagefile", context, name, state, out)
    return out.getvalue().splitlines()


def _layered_spec(context: Path, base: str, directory: str, layers: int, rm: list[str]) -> str:
    """`layers` layers over `base`: COPY steps of one small file each into `directory`
    (bottom.txt first, top.txt last), with a RUN that deletes doomed.txt halfway up."""
    lines = [f"FROM {base}"]
    if base == "scratch":
        shutil.copy(BUSYBOX, context / "busybox")
        lines.append("COPY busybox /bin/busybox")
    for name in ("bottom.txt", "doomed.txt"):
        (context / name).write_text(f"{name}\n")
        lines.append(f"COPY {name} {directory}/{name}")
    middle = len(lines) + (layers - len(lines)) // 2
    index = 0
    while len(lines) < layers:  # FROM is no layer: one line short of `layers` here
        if len(lines) == middle:
            lines.append("RUN " + json.dumps([*rm, f"{directory}/doomed.txt"]))
            continue
        (context / f"f{index}").write_text(f"{index}\n")
        lines.append(f"COPY f{index} {directory}/many/f{index}")
        index += 1
    (context / "top.txt").write_text("top.txt\n")
    lines.append(f"COPY top.txt {directory}/top.txt")
    return "\n".join(lines) + "\n"


@MANY_STEPS_TIMEOUT
@pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs the static busybox (busybox-static)")
def test_a_scratch_image_of_130_layers_runs_and_shows_its_bottom_top_and_whiteout(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    spec = _layered_spec(context, "scratch", "/data", LAYERS, ["/bin/busybox", "rm"])
    lines = _build(build_state, context, spec, "many:1")
    assert f"({LAYERS} layers," in lines[-1]  # the RUN's build container stacked half of them
    result = run_once(build_state, job(["/bin/busybox", "sh", "-c",
                                        "cd /data && /bin/busybox cat bottom.txt top.txt;"
                                        " /bin/busybox ls many | /bin/busybox wc -l;"
                                        " /bin/busybox test -e doomed.txt || echo doomed.txt is gone"],
                                       image="many:1"))
    assert (result.status, result.stderr) == ("ok", b"")
    copies = LAYERS - 5  # busybox, bottom.txt, doomed.txt, the RUN and top.txt
    assert result.stdout == f"bottom.txt\ntop.txt\n{copies}\ndoomed.txt is gone\n".encode()


@pytest.mark.skipif(EMULATED_CPU, reason="another 130 steps take minutes under emulation; the mounts are the "
                                          "scratch image's, one more over /usr")
def test_a_host_image_of_130_layers_stacks_them_on_root_and_usr(build_state, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    spec = _layered_spec(context, "host", "/usr/local/share/many-layers", LAYERS, ["rm"])
    _build(build_state, context, spec, "many-host:1")
    result = run_once(build_state, job(["sh", "-c",
                                        "cd /usr/local/share/many-layers && cat bottom.txt top.txt;"
                                        " ls many | wc -l; test -e doomed.txt || echo doomed.txt is gone"],
                                       image="many-host:1"))
    assert (result.status, result.stderr) == ("ok", b"")
    assert result.stdout == f"bottom.txt\ntop.txt\n{LAYERS - 4}\ndoomed.txt is gone\n".encode()


def _deep_image(tmp_path: Path, count: int) -> Image:
    """An image of `count` lower dirs named as the store names layers (built without the
    builder, at no cost per layer): busybox in the bottom one, /data/f<i> in the i-th."""
    dirs = []
    for index in range(count):
        layer = tmp_path / "layers" / f"{index:064x}"
        (layer / "data").mkdir(parents=True)
        (layer / "data" / f"f{index}").write_text(f"{index}\n")
        dirs.append(str(layer))
    (Path(dirs[0]) / "bin").mkdir()
    shutil.copy(BUSYBOX, Path(dirs[0]) / "bin" / "busybox")
    return Image(name=f"deep:{count}", mounts=(ImageMount("/", tuple(reversed(dirs))),))  # top first


@pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs the static busybox (busybox-static)")
def test_overlayfs_limit_of_500_layers_is_reached_and_one_more_is_refused_with_its_count(build_state, tmp_path,
                                                                                          monkeypatch):
    too_many = _deep_image(tmp_path, OVERLAY_MAX_LOWER_LAYERS + 1)
    most = dataclasses.replace(too_many, name=f"deep:{OVERLAY_MAX_LOWER_LAYERS}",
                               mounts=(ImageMount("/", too_many.mounts[0].lowerdirs[1:]),))
    images = {image.name: image for image in (most, too_many)}
    monkeypatch.setattr("sandboxd.runtime.launch.resolve_image", lambda name, state_dir: images[name])
    top = OVERLAY_MAX_LOWER_LAYERS - 1
    argv = ["/bin/busybox", "cat", "/data/f0", f"/data/f{top}"]
    result = run_once(build_state, job(argv, image=most.name))
    assert (result.status, result.stdout) == ("ok", f"0\n{top}\n".encode())
    with pytest.raises(MountPlanError, match=r"has 501 layers, more than OverlayFS's limit of 500"):
        run_once(build_state, job(argv, image=too_many.name))


def _plan(scratch_dir: str, lowerdirs: tuple[str, ...], upper_dir: str | None = None) -> RootfsPlan:
    return RootfsPlan(scratch_dir=scratch_dir, image_mounts=(ImageMount("/", lowerdirs),),
                      writable_layer_bytes=1 << 20, shm_bytes=1 << 20, workdir="/work", job_uid=1000,
                      job_gid=1000, upper_dir=upper_dir)


def test_the_plan_checks_what_overlayfs_parses_and_the_page_the_options_must_fit_in():
    layers = tuple(f"/state/images/layers/{index:064x}" for index in range(OVERLAY_MAX_LOWER_LAYERS))
    _plan("/state/mnt", layers)  # 500 layers: the lower dirs go by descriptor, a few bytes each
    _plan("/state/mnt", ("/a,b", "/c:d"))  # never parsed: only their descriptors' numbers are
    _plan("/st:ate/mnt", layers[:1], "/st:ate/images/tmp/upper")  # ':' splits only lowerdir
    for scratch, upper in (("/state/a,b", None), ("/state/mnt", "/work/a\\b"), ("state/mnt", None)):
        with pytest.raises(MountPlanError, match="cannot be used in an overlay mount"):
            _plan(scratch, layers[:1], upper)
    with pytest.raises(MountPlanError, match="not an absolute path"):
        _plan("/state/mnt", ("layers/top",))
    with pytest.raises(MountPlanError, match="has no layers"):
        _plan("/state/mnt", ())
    with pytest.raises(MountPlanError, match=r"with 500 layers needs \d+ bytes of mount options, more than the limit"):
        _plan("/" + "s" * (os.sysconf("SC_PAGE_SIZE") // 2), layers)  # upperdir and workdir are below it
