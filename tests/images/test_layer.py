"""Layer tars: unpacked safely into overlay lower dirs, packed back from a writable layer."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from sandboxd.images.layer import LayerError, pack_layer, unpack_layer

MTIME = 1_700_000_000


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, MTIME
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _tar(*entries: tuple[tarfile.TarInfo, bytes | None], gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    return gzip.compress(raw) if gz else raw


def _file(name: str, data: bytes = b"x", **fields) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, **fields), data


def _unpack(tmp_path: Path, data: bytes, owner=None) -> Path:
    destination = tmp_path / "layer"
    destination.mkdir()
    unpack_layer(io.BytesIO(data), str(destination), owner)
    return destination


def test_files_directories_symlinks_hard_links_and_fifos_unpack_with_their_modes_and_times(tmp_path):
    layer = _unpack(tmp_path, _tar(
        (_info("usr", tarfile.DIRTYPE, 0o755), None),
        _file("usr/tool", b"#!/bin/sh\n", mode=0o755),
        (_info("usr/alias", tarfile.SYMTYPE, linkname="tool"), None),
        (_info("usr/again", tarfile.LNKTYPE, linkname="usr/tool"), None),
        (_info("run/queue", tarfile.FIFOTYPE, 0o600), None),
    ))
    tool = layer / "usr/tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755 and tool.stat().st_mtime == MTIME
    assert os.readlink(layer / "usr/alias") == "tool"
    assert (layer / "usr/again").stat().st_ino == tool.stat().st_ino
    assert stat.S_ISFIFO((layer / "run/queue").lstat().st_mode)
    assert stat.S_IMODE((layer / "usr").stat().st_mode) == 0o755 and (layer / "usr").stat().st_mtime == MTIME


def test_parent_directories_without_an_entry_are_made_0755(tmp_path):
    layer = _unpack(tmp_path, _tar(_file("a/b/c")))
    assert stat.S_IMODE((layer / "a").stat().st_mode) == stat.S_IMODE((layer / "a/b").stat().st_mode) == 0o755


def test_a_read_only_directory_still_receives_its_children(tmp_path):
    layer = _unpack(tmp_path, _tar((_info("ro", tarfile.DIRTYPE, 0o555), None), _file("ro/inside")))
    assert (layer / "ro/inside").read_bytes() == b"x"
    assert stat.S_IMODE((layer / "ro").stat().st_mode) == 0o555


def test_the_diff_id_is_the_sha256_of_the_uncompressed_tar_gzipped_or_not(tmp_path):
    plain = _tar(_file("a", b"hello"))
    for index, data in enumerate((plain, gzip.compress(plain))):
        destination = tmp_path / f"l{index}"
        destination.mkdir()
        info = unpack_layer(io.BytesIO(data), str(destination))
        assert info.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
        assert (info.size_bytes, info.entries) == (len(plain), 1)


def _user_xattrs(directory: Path) -> bool:
    try:
        os.setxattr(directory, "user.probe", b"1")
    except OSError:
        return False  # tmpfs before Linux 6.6 (the cgroup v2 VM's /tmp)
    os.removexattr(directory, "user.probe")
    return True


def test_whiteouts_become_0_0_devices(tmp_path):
    layer = _unpack(tmp_path, _tar(_file("etc/.wh.motd", b"")))
    whiteout = (layer / "etc/motd").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)


def test_the_opaque_marker_becomes_an_xattr_or_a_clear_error_where_the_file_system_has_none(tmp_path):
    data = _tar(_file("var/cache/.wh..wh..opq", b""))
    if not _user_xattrs(tmp_path):
        with pytest.raises(LayerError, match="no user.* extended attributes"):
            _unpack(tmp_path, data)
        return
    layer = _unpack(tmp_path, data)
    assert os.getxattr(layer / "var/cache", "user.overlay.opaque") == b"y"
    assert not (layer / "var/cache/.wh..wh..opq").exists()


def test_setuid_and_setgid_bits_are_cleared_and_the_sticky_bit_kept(tmp_path):
    layer = _unpack(tmp_path, _tar(_file("bin/su", mode=0o6755), (_info("tmp", tarfile.DIRTYPE, 0o1777), None)))
    assert stat.S_IMODE((layer / "bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777


def test_owners_go_through_the_id_mapping(tmp_path):
    seen = []

    def owner(uid: int, gid: int) -> tuple[int, int]:
        seen.append((uid, gid))
        return os.getuid(), os.getgid()

    _unpack(tmp_path, _tar(_file("a", uid=1000, gid=1001), (_info("d", tarfile.DIRTYPE, 0o755, uid=7, gid=8), None)),
            owner)
    assert (1000, 1001) in seen and (7, 8) in seen


def test_extended_attributes_from_the_tar_are_not_kept(tmp_path):
    info, data = _file("dir/file")
    info.pax_headers = {"SCHILY.xattr.user.overlay.redirect": "/etc", "SCHILY.xattr.user.note": "x"}
    layer = _unpack(tmp_path, _tar((info, data)))
    assert os.listxattr(layer / "dir/file") == []


@pytest.mark.parametrize("name, reason", [
    ("/etc/passwd", "absolute"),
    ("a/../../escape", "'..'"),
    ("../escape", "'..'"),
])
def test_names_outside_the_layer_are_refused(tmp_path, name, reason):
    with pytest.raises(LayerError, match=reason):
        _unpack(tmp_path, _tar(_file(name)))
    assert not (tmp_path / "escape").exists()


def test_a_name_given_twice_is_refused(tmp_path):
    with pytest.raises(LayerError, match="twice"):
        _unpack(tmp_path, _tar(_file("a", b"1"), _file("./a", b"2")))


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device_nodes_are_refused(tmp_path, kind):
    with pytest.raises(LayerError, match="device node"):
        _unpack(tmp_path, _tar((_info("dev/sda", kind, devmajor=8, devminor=0), None)))


def test_a_hard_link_must_name_a_regular_file_earlier_in_the_layer(tmp_path):
    for target in ("/etc/shadow", "missing", "link"):
        with pytest.raises(LayerError):
            destination = tmp_path / target.replace("/", "_")
            destination.mkdir()
            unpack_layer(io.BytesIO(_tar(
                (_info("link", tarfile.SYMTYPE, linkname="/etc/shadow"), None),
                (_info("hard", tarfile.LNKTYPE, linkname=target), None),
            )), str(destination))


def test_a_symlink_climbing_out_of_the_layer_is_refused_and_absolute_targets_are_kept(tmp_path):
    layer = _unpack(tmp_path, _tar((_info("bin/sh", tarfile.SYMTYPE, linkname="/usr/bin/dash"), None),
                                   (_info("lib", tarfile.SYMTYPE, linkname="usr/lib"), None)))
    assert os.readlink(layer / "bin/sh") == "/usr/bin/dash"
    second = tmp_path / "second"
    second.mkdir()
    with pytest.raises(LayerError, match="points out of the layer"):
        _unpack(second, _tar((_info("a/b", tarfile.SYMTYPE, linkname="../../outside"), None)))


def test_an_entry_beneath_a_symlink_is_refused_and_nothing_is_written_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(LayerError, match="symlink or not a directory"):
        _unpack(tmp_path, _tar((_info("a", tarfile.SYMTYPE, linkname=str(outside)), None), _file("a/planted")))
    assert list(outside.iterdir()) == []


def test_an_entry_beneath_a_file_is_refused(tmp_path):
    with pytest.raises(LayerError, match="symlink or not a directory"):
        _unpack(tmp_path, _tar(_file("a"), _file("a/b")))


def test_a_whiteout_of_an_entry_of_its_own_layer_is_refused(tmp_path):
    with pytest.raises(LayerError, match="its own layer"):
        _unpack(tmp_path, _tar(_file("a"), _file(".wh.a", b"")))


@pytest.mark.parametrize("data", [
    b"this is not a tar at all" * 40,
    gzip.compress(b"\0" * 10)[:-4] + b"xxxx",
])
def test_garbage_is_a_layer_error(tmp_path, data):
    with pytest.raises(LayerError, match="not a valid tar"):
        _unpack(tmp_path, data)


def test_a_truncated_layer_is_a_layer_error(tmp_path):
    whole = _tar(_file("big", os.urandom(100_000)), gz=True)
    with pytest.raises(LayerError, match="not a valid tar"):
        _unpack(tmp_path, whole[: len(whole) // 2])


def test_zstd_layers_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(LayerError, match="zstd"):
        _unpack(tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 100)


def test_a_packed_tree_unpacks_to_the_same_tree_with_whiteouts_and_opaque_dirs(tmp_path):
    if not _user_xattrs(tmp_path):
        pytest.skip("this file system has no user.* xattrs to mark an opaque directory with; "
                    "the test above checks the error such a store gives")
    source = tmp_path / "upper"
    (source / "etc").mkdir(parents=True)
    (source / "etc/hostname").write_text("box\n")
    os.chmod(source / "etc/hostname", 0o640)
    os.symlink("hostname", source / "etc/alias")
    os.mknod(source / "etc/gone", stat.S_IFCHR, os.makedev(0, 0))
    (source / "cache").mkdir()
    os.setxattr(source / "cache", "user.overlay.opaque", b"y")
    packed = io.BytesIO()
    info = pack_layer(str(source), packed)
    assert info.diff_id == "sha256:" + hashlib.sha256(packed.getvalue()).hexdigest()
    names = tarfile.open(fileobj=io.BytesIO(packed.getvalue())).getnames()
    assert {"etc/.wh.gone", "cache/.wh..wh..opq"} <= set(names)

    layer = _unpack(tmp_path, packed.getvalue())
    assert (layer / "etc/hostname").read_text() == "box\n"
    assert stat.S_IMODE((layer / "etc/hostname").stat().st_mode) == 0o640
    assert os.readlink(layer / "etc/alias") == "hostname"
    assert (layer / "etc/gone").lstat().st_rdev == os.makedev(0, 0)
    assert os.getxattr(layer / "cache", "user.overlay.opaque") == b"y"


def test_packing_stores_a_symlink_to_outside_as_a_symlink_and_never_reads_through_it(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("s3cret")
    source = tmp_path / "upper"
    source.mkdir()
    os.symlink(str(secret), source / "door")
    packed = io.BytesIO()
    pack_layer(str(source), packed)
    archive = tarfile.open(fileobj=io.BytesIO(packed.getvalue()))
    assert archive.getnames() == ["door"] and archive.getmember("door").issym()
    assert b"s3cret" not in packed.getvalue()
