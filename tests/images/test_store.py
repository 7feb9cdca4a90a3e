"""The image store: layers unpacked once and shared, names, listing, removal and pruning."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading

import pytest

from sandboxd.images.layer import LayerError
from sandboxd.images.store import (GZIP_LAYER_MEDIA_TYPE, LAYER_MEDIA_TYPE, ImageRecord, ImageStore, ImageStoreError,
                                   LayerRef, parse_reference)


def _layer_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "state")


def _image(store: ImageStore, *layers: bytes) -> ImageRecord:
    refs = tuple(store.add_layer(io.BytesIO(data)) for data in layers)
    return ImageRecord(base="scratch", layers=refs, env=(("PATH", "/bin"),), created="2026-11-29T00:00:00Z")


def test_a_layer_is_unpacked_once_under_its_diff_id_and_shared_by_images(store):
    data = _layer_tar({"etc/motd": b"hi\n"})
    first = store.add_layer(io.BytesIO(data))
    assert first == LayerRef(_digest(data), len(data), _digest(data), len(data), LAYER_MEDIA_TYPE)
    assert store.blob_path(first.blob).read_bytes() == data  # kept as received
    assert (store.layer_dir(first.diff_id) / "etc/motd").read_bytes() == b"hi\n"
    again = store.add_layer(io.BytesIO(data), expected_diff_id=first.diff_id)
    assert again == first
    one = store.save(ImageRecord(base="scratch", layers=(first,)))
    two = store.save(ImageRecord(base="scratch", layers=(first,), labels=(("role", "judge"),)))
    assert one != two and store.record(two).layers == store.record(one).layers


def test_two_writers_adding_the_same_layer_end_with_one_complete_copy(store):
    data = _layer_tar({f"file{index}": b"x" * 1000 for index in range(200)})
    results, errors = [], []

    def add() -> None:
        try:
            results.append(store.add_layer(io.BytesIO(data)))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(results)) == 1
    assert len(list(store.layer_dir(results[0].diff_id).iterdir())) == 200
    assert list((store.root / "tmp").iterdir()) == []


def test_a_layer_whose_digest_is_not_the_expected_one_leaves_nothing(store):
    data = _layer_tar({"a": b"1"})
    with pytest.raises(LayerError, match="not the expected"):
        store.add_layer(io.BytesIO(data), expected_diff_id="sha256:" + "0" * 64)
    assert not store.has_layer(_digest(data))
    assert list((store.root / "tmp").iterdir()) == []


def test_a_bad_layer_leaves_nothing(store):
    bad = _layer_tar({"ok": b"1"}).replace(b"ok", b"..", 1)
    with pytest.raises(LayerError):
        store.add_layer(io.BytesIO(bad))
    assert list((store.root / "layers").iterdir()) == [] and list((store.root / "tmp").iterdir()) == []


def test_names_resolve_to_their_image_and_default_to_latest(store):
    record = _image(store, _layer_tar({"a": b"1"}))
    image_id = store.save(record)
    assert store.tag("judge", image_id) == "judge:latest"
    store.tag("team/judge:v1.2", image_id)
    assert store.resolve("judge:latest") == (image_id, record)
    assert store.resolve("team/judge:v1.2")[1] == record
    assert [name for name, _, _ in store.list_images()] == ["judge:latest", "team/judge:v1.2"]


@pytest.mark.parametrize("reference", ["Judge", "judge:", "judge:-x", "/abs", "a//b", "host", "scratch",
                                       "judge@sha256:" + "0" * 64, "a" * 300, "judge:" + "t" * 129])
def test_invalid_or_reserved_names_are_refused(reference):
    with pytest.raises(ImageStoreError):
        parse_reference(reference)


@pytest.mark.parametrize(("reference", "canonical"), [
    ("registry.example:5000/team/x", "registry.example:5000/team/x:latest"),
    ("127.0.0.1:5000/x:1.0", "127.0.0.1:5000/x:1.0"),
    ("localhost/x", "localhost/x:latest"),
])
def test_names_of_pulled_images_keep_their_registry(reference, canonical):
    assert parse_reference(reference) == canonical


def test_an_image_whose_layer_is_missing_is_not_listed_nor_resolved(store):
    record = _image(store, _layer_tar({"a": b"1"}))
    store.tag("broken", store.save(record))
    layer = store.layer_dir(record.layers[0].diff_id)
    for entry in layer.iterdir():
        entry.unlink()
    layer.rmdir()
    assert store.list_images() == []
    with pytest.raises(ImageStoreError, match="missing layers"):
        store.resolve("broken")


def test_saving_an_image_needs_its_layers_in_the_store(store):
    with pytest.raises(ImageStoreError, match="not in the store"):
        store.save(ImageRecord(base="scratch", layers=(LayerRef("sha256:" + "1" * 64, 10, "sha256:" + "1" * 64, 10,
                                                                 LAYER_MEDIA_TYPE),)))


def test_prune_removes_only_what_no_name_reaches(store):
    shared = _layer_tar({"shared": b"s"})
    only_old = _layer_tar({"old": b"o"})
    kept = store.save(_image(store, shared, _layer_tar({"new": b"n"})))
    dropped = store.save(_image(store, shared, only_old))
    store.tag("kept", kept)
    store.tag("dropped", dropped)
    assert store.remove("dropped") == dropped
    assert store.prune() == [_digest(only_old)]
    assert store.has_layer(_digest(shared)) and not store.has_layer(_digest(only_old))
    assert store.resolve("kept")[0] == kept
    with pytest.raises(ImageStoreError):
        store.record(dropped)
    with pytest.raises(ImageStoreError, match="no image named"):
        store.remove("dropped")


def test_prune_keeps_layers_the_caller_still_needs(store):
    cached = _layer_tar({"cache": b"c"})
    layer = store.add_layer(io.BytesIO(cached))
    assert store.prune(keep_layers=frozenset({layer.diff_id})) == []
    assert store.has_layer(layer.diff_id)


def test_a_gzip_layer_keeps_its_compressed_blob_and_both_digests(store):
    import gzip

    plain = _layer_tar({"a": b"1" * 1000})
    packed = gzip.compress(plain)
    layer = store.add_layer(io.BytesIO(packed), expected_diff_id=None, expected_blob=_digest(packed))
    assert (layer.diff_id, layer.blob, layer.media_type) == (_digest(plain), _digest(packed), GZIP_LAYER_MEDIA_TYPE)
    assert store.blob_path(layer.blob).read_bytes() == packed
    with pytest.raises(LayerError, match="blob's digest"):
        other = gzip.compress(_layer_tar({"b": b"2"}))
        store.add_layer(io.BytesIO(other), expected_blob=_digest(packed))


def test_prune_removes_the_blobs_of_what_it_removes(store):
    data = _layer_tar({"gone": b"g"})
    layer = store.add_layer(io.BytesIO(data))
    assert store.prune() == [layer.diff_id]
    assert not store.blob_path(layer.blob).exists()
