"""Image layers as tar streams: unpack one safely into a directory that OverlayFS uses as a
lower dir, and pack a directory (a build step's writable layer) back into a tar.

A layer tar comes from strangers (a registry, an `image load` file, a build container), so
every entry is checked before it touches the disk, and nothing is resolved through a
symlink: an entry's parent is reached from the layer's root directory fd one component at a
time with O_NOFOLLOW, and every operation is relative to that parent's fd.

The format is OCI's: `.wh.NAME` deletes NAME of the layers below, `.wh..wh..opq` makes its
directory opaque. Unpacked, they become what OverlayFS reads: a 0/0 character device, and the
`user.overlay.opaque` xattr. Containers mount their overlay inside their own user namespace
with `userxattr`, as root and rootless alike, so the user.* namespace is the one read.

Refused (LayerError; the caller unpacks into a fresh directory and removes it on error):
absolute names, `..` components, NUL, a name given twice, device nodes, hard links to
anything but a regular file earlier in the same layer, symlinks whose relative target climbs
out of the layer, an entry beneath a symlink or a non-directory, zstd compression.
Changed: setuid and setgid bits are cleared (jobs run with no_new_privs, where they would
never take effect), extended attributes are dropped (a layer must not set overlay's own),
owners go through `owner` (the container's id mapping) or are not kept at all.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
MAX_ENTRIES = 1_000_000
MAX_NAME_BYTES = 4096
_CHUNK_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_KEPT_MODE_BITS = 0o1777  # permissions and sticky; never setuid or setgid
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Owner = Callable[[int, int], "tuple[int, int]"]


class LayerError(ValueError):
    """A layer is malformed or unsafe; the message names the entry."""


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar: the layer's identity
    size_bytes: int  # of the uncompressed tar
    entries: int


class HashingStream(io.RawIOBase):
    """Reads (or writes) through to `stream`, hashing and counting what passes; what is read
    is also written to `copy`, if given."""

    def __init__(self, stream: BinaryIO, copy: BinaryIO | None = None) -> None:
        self._stream = stream
        self._copy = copy
        self.sha256 = hashlib.sha256()
        self.size_bytes = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        if self._copy is not None:
            self._copy.write(data)
        self.sha256.update(data)
        self.size_bytes += len(data)
        return len(data)

    def write(self, data) -> int:
        self._stream.write(data)
        self.sha256.update(data)
        self.size_bytes += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def _decompressed(stream: BinaryIO) -> BinaryIO:
    reader = io.BufferedReader(stream) if not hasattr(stream, "peek") else stream  # type: ignore[arg-type]
    magic = reader.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=reader, mode="rb")  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        raise LayerError("zstd-compressed layers are not supported; push or save the image with gzip")
    return reader  # type: ignore[return-value]


def entry_parts(name: str, what: str = "entry") -> tuple[str, ...]:
    """A tar name as path components inside the layer; () for the layer's root."""
    if "\0" in name:
        raise LayerError(f"{what} {name!r} contains NUL")
    if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
        raise LayerError(f"{what} name {name[:80]!r}... is longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise LayerError(f"{what} {name!r} is an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise LayerError(f"{what} {name!r} climbs out of the layer ('..')")
    return parts


def _check_symlink_target(parts: tuple[str, ...], target: str) -> None:
    """A relative target must stay in the layer; an absolute one is resolved in the
    container's own root, never on the host, so it is fine."""
    if "\0" in target or not target:
        raise LayerError(f"symlink {'/'.join(parts)!r} has an empty target or one with NUL")
    if target.startswith("/"):
        return
    depth = len(parts) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise LayerError(f"symlink {'/'.join(parts)!r} -> {target!r} points out of the layer")
        elif part not in ("", "."):
            depth += 1


class _Tree:
    """Directory fds of a layer being unpacked, reached without following symlinks."""

    def __init__(self, root_fd: int) -> None:
        self._fds: dict[tuple[str, ...], int] = {(): root_fd}
        self.implicit: set[tuple[str, ...]] = set()  # made for an entry beneath, no entry of its own

    def directory(self, parts: tuple[str, ...]) -> int:
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        parent = self.directory(parts[:-1])
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=parent)
            self.implicit.add(parts)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):  # ELOOP: a symlink, not followed
                raise LayerError(f"{'/'.join(parts)!r} is a symlink or not a directory, "
                                 f"yet entries are beneath it") from None
            raise
        self._fds[parts] = fd
        return fd

    def close(self) -> None:
        for parts, fd in self._fds.items():
            if parts:
                os.close(fd)
        self._fds = {}


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent_fd: int) -> None:
    source = archive.extractfile(member)
    fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
    try:
        if source is not None:
            while chunk := source.read(_CHUNK_BYTES):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def unpack_layer(stream: BinaryIO, destination: str, owner: Owner | None = None) -> LayerInfo:
    """Unpack a layer tar (plain or gzip) into `destination`, an empty directory of ours.
    owner(uid, gid) maps the tar's ids to the host's (the container's id mapping); None
    keeps every file ours. Returns the uncompressed tar's digest and size."""
    hashing = HashingStream(_decompressed(stream))
    root_fd = os.open(destination, _DIR_FLAGS)
    tree = _Tree(root_fd)
    seen: set[tuple[str, ...]] = set()
    regular_files: set[tuple[str, ...]] = set()
    directories: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
    count = 0
    try:
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as archive:  # type: ignore[call-overload]
                for member in archive:
                    count += 1
                    if count > MAX_ENTRIES:
                        raise LayerError(f"the layer has more than {MAX_ENTRIES} entries")
                    _unpack_member(archive, member, tree, seen, regular_files, directories, owner)
            while hashing.read(_CHUNK_BYTES):
                pass  # the end-of-archive padding is part of the digest too
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise LayerError(f"the layer is not a valid tar stream (truncated or corrupt): {error}") from None
        # Directories without an entry of their own are root's, 0755, as Docker makes them.
        explicit = {parts for parts, _ in directories}
        implicit = tarfile.TarInfo()
        implicit.mode = 0o755
        directories += [(parts, implicit) for parts in tree.implicit - explicit]
        # Deepest first: a directory's own mode (maybe read-only) and times come after its
        # children are in.
        for parts, member in sorted(directories, key=lambda item: -len(item[0])):
            fd = tree.directory(parts)
            os.fchmod(fd, member.mode & _KEPT_MODE_BITS)
            if owner is not None:
                os.fchown(fd, *owner(member.uid, member.gid))
            if member.mtime:
                os.utime(fd, ns=(int(member.mtime * 1e9),) * 2)
    finally:
        tree.close()
        os.close(root_fd)
    return LayerInfo(hashing.digest, hashing.size_bytes, count)


def _unpack_member(archive: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree, seen: set,
                   regular_files: set, directories: list, owner: Owner | None) -> None:
    parts = entry_parts(member.name)
    if not parts:
        if member.isdir():
            directories.append(((), member))
            return
        raise LayerError(f"entry {member.name!r} names the layer's root but is not a directory")
    if parts in seen:
        raise LayerError(f"entry {'/'.join(parts)!r} appears twice in the layer")
    seen.add(parts)
    parent_fd = tree.directory(parts[:-1])
    name = parts[-1]
    if name == OPAQUE_MARKER:
        if not member.isreg():
            raise LayerError(f"opaque marker {'/'.join(parts)!r} is not a regular file")
        try:
            os.setxattr(parent_fd, OPAQUE_XATTRS[0], b"y")
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise
            raise LayerError(f"opaque directory {'/'.join(parts[:-1]) or '/'!r}: the image store's file system "
                             "has no user.* extended attributes (tmpfs before Linux 6.6); put the state "
                             "directory on ext4, xfs or btrfs") from None
        return
    if name.startswith(WHITEOUT_PREFIX):
        hidden = name[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or not member.isreg():
            raise LayerError(f"whiteout {'/'.join(parts)!r} is malformed")
        if parts[:-1] + (hidden,) in seen:
            raise LayerError(f"whiteout {'/'.join(parts)!r} deletes an entry of its own layer")
        seen.add(parts[:-1] + (hidden,))
        try:
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent_fd)
        except FileExistsError:
            raise LayerError(f"whiteout {'/'.join(parts)!r} deletes an entry of its own layer") from None
        return
    mode = member.mode & _KEPT_MODE_BITS
    times = (int(member.mtime * 1e9),) * 2
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                tree.directory(parts)  # made for an earlier child: must be a real directory
            directories.append((parts, member))
            return
        if member.isreg():
            _write_member(archive, member, name, parent_fd)
            regular_files.add(parts)
        elif member.issym():
            _check_symlink_target(parts, member.linkname)
            os.symlink(member.linkname, name, dir_fd=parent_fd)
        elif member.islnk():
            target = entry_parts(member.linkname, "hard link target")
            if target not in regular_files:
                raise LayerError(f"hard link {'/'.join(parts)!r} -> {member.linkname!r}: the target is not "
                                 "a regular file earlier in this layer")
            os.link(target[-1], name, src_dir_fd=tree.directory(target[:-1]), dst_dir_fd=parent_fd,
                    follow_symlinks=False)
            return  # shares the target's inode: its mode, owner and times
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent_fd)
        elif member.ischr() or member.isblk():
            raise LayerError(f"entry {'/'.join(parts)!r} is a device node")
        else:
            raise LayerError(f"entry {'/'.join(parts)!r} has an unsupported type {member.type!r}")
    except FileExistsError:
        raise LayerError(f"entry {'/'.join(parts)!r} conflicts with an earlier entry") from None
    if not member.issym():
        os.chmod(name, mode, dir_fd=parent_fd)
    if owner is not None:
        os.chown(name, *owner(member.uid, member.gid), dir_fd=parent_fd, follow_symlinks=False)
    os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)


# --- packing ---------------------------------------------------------------------------------

def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def _is_opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


def _walk(dir_fd: int, prefix: str) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """(relative name, lstat, parent fd, name) of everything beneath dir_fd, sorted, parents
    first; directories are opened with O_NOFOLLOW from their parent's fd."""
    for name in sorted(os.listdir(dir_fd)):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        relative = prefix + name
        yield relative, st, dir_fd, name
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield from _walk(child, relative + "/")
            finally:
                os.close(child)


def pack_layer(source: str, out: BinaryIO, inside_ids: Owner | None = None) -> LayerInfo:
    """Write the tree under `source` (a build step's writable layer) as a layer tar to `out`:
    whiteout devices become `.wh.` entries and opaque directories get `.wh..wh..opq`.
    inside_ids(uid, gid) maps host ids back to the container's (None: 0/0 for all)."""
    return pack_layers([("", source)], out, inside_ids)


def pack_layers(sources: list[tuple[str, str]], out: BinaryIO, inside_ids: Owner | None = None) -> LayerInfo:
    """pack_layer() of several trees into one tar, each under its prefix ("" or "usr/"): a
    build step over several overlay mounts has a writable layer per mount."""
    hashing = HashingStream(out)  # type: ignore[arg-type]
    count = 0
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for prefix, source in sources:
            root_fd = os.open(source, _DIR_FLAGS)
            try:
                for relative, st, parent_fd, name in _walk(root_fd, prefix):
                    count += _pack_entry(archive, relative, st, parent_fd, name, inside_ids)
            finally:
                os.close(root_fd)
    return LayerInfo(hashing.digest, hashing.size_bytes, count)


def _pack_entry(archive: tarfile.TarFile, relative: str, st: os.stat_result, parent_fd: int, name: str,
                inside_ids: Owner | None) -> int:
    info = tarfile.TarInfo(relative)
    info.mode = st.st_mode & _KEPT_MODE_BITS
    info.uid, info.gid = inside_ids(st.st_uid, st.st_gid) if inside_ids else (0, 0)
    info.mtime = st.st_mtime
    if _is_whiteout(st):
        head, _, tail = relative.rpartition("/")
        info.name = (head + "/" if head else "") + WHITEOUT_PREFIX + tail
        info.mode = 0o644
        archive.addfile(info)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            opaque = _is_opaque(fd)
        finally:
            os.close(fd)
        if opaque:
            marker = tarfile.TarInfo(relative + "/" + OPAQUE_MARKER)
            marker.mode, marker.mtime = 0o644, st.st_mtime
            archive.addfile(marker)
            return 2
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(name, dir_fd=parent_fd)
        archive.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, _READ_FLAGS, dir_fd=parent_fd)
        with os.fdopen(fd, "rb") as content:
            opened = os.fstat(content.fileno())
            if (opened.st_ino, opened.st_dev) != (st.st_ino, st.st_dev):
                raise LayerError(f"{relative!r} changed while the layer was packed")
            info.size = opened.st_size
            archive.addfile(info, content)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
        archive.addfile(info)
    else:
        raise LayerError(f"{relative!r} is a device node or socket: a layer cannot hold it")
    return 1
