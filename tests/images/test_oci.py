"""OCI image layouts: `image save` and `image load`, checked against skopeo both ways."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import job, leftover_job_cgroups, run_once
from sandboxd.images.build import build_image, utc_now
from sandboxd.images.oci import OciError, load_image, save_image
from sandboxd.images.spec import parse_spec
from sandboxd.images.store import ImageStore

SKOPEO = shutil.which("skopeo")


@pytest.fixture
def built(tmp_path):
    """A state dir holding `tiny:1`: FROM scratch, a static binary, config from ENV/USER/LABEL."""
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    context = tmp_path / "ctx"
    context.mkdir()
    shutil.copy("/usr/sbin/ldconfig", context / "ldconfig")
    spec = parse_spec("FROM scratch\nCOPY ldconfig /bin/\nENV MODE=test\nUSER 1000:1000\nLABEL role=tiny\n", "Imagefile")
    build_image(spec, "Imagefile", context, "tiny:1", state, io.StringIO())
    yield state
    assert leftover_job_cgroups() == []


def _run(state: Path, image: str, argv: list[str]):
    return run_once(state, job(argv, image=image))


def test_a_saved_image_loads_back_byte_identical_into_another_store_and_runs(built, tmp_path):
    layout = tmp_path / "tiny.tar"
    digest = save_image(ImageStore(built), "tiny:1", layout)
    other = tmp_path / "other"
    other.mkdir(mode=0o711)
    name, _ = load_image(ImageStore(other), layout, None, utc_now())
    assert name == "tiny:1"
    again = tmp_path / "again.tar"
    assert save_image(ImageStore(other), "tiny:1", again) == digest  # same manifest, same blobs
    _, record = ImageStore(other).resolve("tiny:1")
    assert (dict(record.env)["MODE"], record.uid, dict(record.labels)) == ("test", 1000, {"role": "tiny"})
    result = _run(other, "tiny:1", ["/bin/ldconfig", "--version"])
    assert result.status == "ok" and b"ldconfig" in result.stdout


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (scripts/bootstrap.sh --test installs it)")
def test_skopeo_reads_a_saved_image_and_an_image_skopeo_wrote_loads_and_runs(built, tmp_path):
    ours = tmp_path / "ours.tar"
    save_image(ImageStore(built), "tiny:1", ours)
    inspected = subprocess.run([SKOPEO, "inspect", f"oci-archive:{ours}"], capture_output=True, text=True, timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Labels"] == {"role": "tiny"}
    theirs = tmp_path / "theirs.tar"
    copied = subprocess.run([SKOPEO, "copy", "--dest-compress", f"oci-archive:{ours}", f"oci-archive:{theirs}:skopeo:2"],
                            capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr
    store = ImageStore(built)
    name, _ = load_image(store, theirs, None, utc_now())
    assert name == "skopeo:2"
    assert [layer.media_type for layer in store.resolve(name)[1].layers] == \
        ["application/vnd.oci.image.layer.v1.tar+gzip"]  # skopeo recompressed it: the gzip path
    assert _run(built, name, ["/bin/ldconfig", "--version"]).status == "ok"


def test_an_image_built_from_host_cannot_be_saved(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    build_image(parse_spec("FROM host\nENV A=1\n", "Imagefile"), "Imagefile", tmp_path, "local:1", state, io.StringIO())
    with pytest.raises(OciError, match="FROM host"):
        save_image(ImageStore(state), "local:1", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def _rewrite(layout: Path, out: Path, change) -> None:
    with tarfile.open(layout) as source, tarfile.open(out, "w") as target:
        for member in source.getmembers():
            if not member.isreg():
                target.addfile(member)
                continue
            data = source.extractfile(member).read()
            data = change(member.name, data)
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))


def test_a_layout_whose_layer_does_not_match_its_digest_is_refused_and_stores_nothing(built, tmp_path):
    layout = tmp_path / "tiny.tar"
    save_image(ImageStore(built), "tiny:1", layout)
    _, record = ImageStore(built).resolve("tiny:1")
    blob_name = "blobs/sha256/" + record.layers[0].blob[7:]
    tampered = tmp_path / "tampered.tar"
    middle = lambda data: data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]  # noqa: E731
    _rewrite(layout, tampered, lambda name, data: middle(data) if name == blob_name else data)
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o711)
    with pytest.raises(OciError, match="digest"):
        load_image(ImageStore(fresh), tampered, "evil:1", utc_now())
    assert ImageStore(fresh).list_images() == []
    assert not (fresh / "images" / "layers").exists() or list((fresh / "images" / "layers").iterdir()) == []


def test_garbage_and_malformed_layouts_are_clear_errors(tmp_path):
    store = ImageStore(tmp_path / "state")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(OciError, match="not a readable tar"):
        load_image(store, junk, "x:1", utc_now())
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as archive:
        info = tarfile.TarInfo("index.json")
        data = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(OciError, match="names no manifest"):
        load_image(store, empty, "x:1", utc_now())
