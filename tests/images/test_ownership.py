"""Unpacked layers keep their tar's owners as containers see them: a job reads what a layer
gives its uid, even mode 0600; the store refuses to mix layers unpacked another way, and
removes trees of every owner it made (rootless: subordinate ids)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest

from conftest import job, run_once
from sandboxd.images.build import build_image
from sandboxd.images.layer import LayerError
from sandboxd.images.owners import container_ownership
from sandboxd.images.spec import parse_spec
from sandboxd.images.store import ImageRecord, ImageStore, ImageStoreError

BUSYBOX = shutil.which("busybox") or "/usr/bin/busybox"
MAPPED = container_ownership().scheme != "single"
needs_mapping = pytest.mark.skipif(not MAPPED, reason="no subordinate ids: every file is the user's")


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o711)
    yield path
    assert not (path / "images" / "tmp").exists() or list((path / "images" / "tmp").iterdir()) == []


def _entry(archive: tarfile.TarFile, name: str, mode: int, owner: int = 0, data: bytes | None = None,
           kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.type = mode, owner, owner, kind
    info.size = len(data) if data is not None else 0
    archive.addfile(info, io.BytesIO(data) if data is not None else None)


def _tar(*entries: tuple, busybox: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        if busybox:
            _entry(archive, "bin", 0o755, kind=tarfile.DIRTYPE)
            with open(BUSYBOX, "rb") as binary:
                _entry(archive, "bin/busybox", 0o755, data=binary.read())
        for entry in entries:
            _entry(archive, *entry)
    return buffer.getvalue()


PRIVATE = (("home", 0o755, 0, None, tarfile.DIRTYPE),
           ("home/user", 0o700, 1000, None, tarfile.DIRTYPE),
           ("home/user/secret", 0o600, 1000, b"s3cret\n"),
           ("root-only", 0o600, 0, b"no\n"))


def _named(store: ImageStore, name: str, *layers: bytes) -> None:
    refs = tuple(store.add_layer(io.BytesIO(data)) for data in layers)
    store.tag(name, store.save(ImageRecord(base="scratch", layers=refs, env=(("PATH", "/bin"),))))


@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed")
def test_a_job_reads_a_file_a_layer_gives_its_uid_and_sees_the_layers_owners(state):
    _named(ImageStore(state), "owned:1", _tar(*PRIVATE, busybox=True))
    result = run_once(state, job(["/bin/busybox", "cat", "/home/user/secret"], image="owned:1"))
    assert (result.status, result.stdout) == ("ok", b"s3cret\n"), result
    result = run_once(state, job(["/bin/busybox", "stat", "-c", "%u:%g %a %n", "/home/user/secret", "/home/user",
                                  "/bin/busybox", "/home"], image="owned:1"))
    assert result.status == "ok", result
    root = "0:0" if MAPPED else "1000:1000"  # single: the job's one id owns everything
    assert result.stdout.decode().splitlines() == [
        "1000:1000 600 /home/user/secret", "1000:1000 700 /home/user", f"{root} 755 /bin/busybox", f"{root} 755 /home"]
    if MAPPED:
        denied = run_once(state, job(["/bin/busybox", "cat", "/root-only"], image="owned:1"))
        assert denied.exit_code == 1 and b"Permission denied" in denied.stderr


def test_files_a_run_step_makes_as_another_user_keep_their_owner_in_later_steps_and_jobs(state, tmp_path):
    # Build steps run without capabilities (root cannot chown there): the owner comes from USER.
    spec = ("FROM host\n"
            "RUN mkdir -p /opt/shared && chmod 777 /opt/shared\n"
            "USER 1000:1000\n"
            "RUN umask 077 && mkdir /opt/shared/private && echo mine > /opt/shared/private/x\n"
            "USER 0:0\n"
            "RUN stat -c '%u:%g %a' /opt/shared/private > /opt/seen-by-the-next-step\n")
    out = io.StringIO()
    try:
        build_image(parse_spec(spec, "Imagefile"), "Imagefile", tmp_path, "private:1", state, out)
    finally:
        print(out.getvalue())
    result = run_once(state, job(["sh", "-c", "cat /opt/seen-by-the-next-step /opt/shared/private/x; "
                                  "stat -c '%u:%g %a' /opt/shared/private/x"], image="private:1"))
    assert (result.status, result.stdout.decode()) == ("ok", "1000:1000 700\nmine\n1000:1000 600\n"), result


@needs_mapping
def test_an_id_the_containers_mapping_does_not_cover_is_refused(state):
    store = ImageStore(state)
    with pytest.raises(LayerError, match="uid 70000, which the containers' id mapping does not cover"):
        store.add_layer(io.BytesIO(_tar(*PRIVATE, ("far", 0o644, 70000, b"x"))))
    assert list((store.root / "layers").iterdir()) == []


@needs_mapping
def test_removal_and_failed_unpacks_leave_nothing_of_any_owner(state):
    store = ImageStore(state)
    layer = store.add_layer(io.BytesIO(_tar(*PRIVATE)))
    with pytest.raises(LayerError, match="twice"):
        store.add_layer(io.BytesIO(_tar(*PRIVATE, ("home/user/secret", 0o600, 1000, b"again"))))
    assert store.prune() == [layer.diff_id]
    assert list((store.root / "layers").iterdir()) == []


@needs_mapping
def test_a_store_whose_layers_were_unpacked_all_ours_is_not_mixed_with_owned_ones(state):
    store = ImageStore(state)
    old = store.add_layer(io.BytesIO(_tar(("a", 0o644, 0, b"a"))))
    (store.root / "ownership.json").unlink()  # as a store from before owners were kept
    store = ImageStore(state)
    with pytest.raises(ImageStoreError, match="sandboxd image prune"):
        store.add_layer(io.BytesIO(_tar(*PRIVATE)))
    assert store.prune() == [old.diff_id]
    store.add_layer(io.BytesIO(_tar(*PRIVATE)))  # an emptied store takes the containers' mapping
    assert json.loads((store.root / "ownership.json").read_bytes()) == container_ownership().record()
