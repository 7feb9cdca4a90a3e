"""The built-in `host` image: the host's own /usr, read-only and zero-copy, under a small
generated root layer.

The root layer (a directory below the state dir) holds the usr-merge symlinks (bin -> usr/bin,
...), empty mount points and scratch dirs, and an `etc/` made of generated files (passwd, group,
hosts, ...) plus copies of an explicit allowlist of the host's /etc: what programs in /usr need
(the dynamic linker's cache, alternatives, the JDK's and Python's config, CA certificates, ...),
none of the host's secrets. Only world-readable regular files, symlinks (as symlinks, never
followed) and world-readable directories are copied, never through a symlink.

The layer's directory name carries a fingerprint of every input (the lstat of each allowlisted
file and directory, top-level link targets, the names of the symlinks inside copied directories
(whose replacement changes the directory's times), the host's top-level /bin, /lib... links, and
the generated content), so a host change (a package install rewriting ld.so.cache, a new
alternative, ...) yields a new layer. Computing it takes about a millisecond.
A layer is built in a temporary directory next to its final place and renamed into place, so
a layer directory that exists is complete, and concurrent builders all end up with one.
Superseded layers stay for a grace period (jobs may still run on them) and are then removed.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxd.images import Image, ImageMount

FORMAT_VERSION = 1

# Host /etc entries copied into the layer, relative to /etc. A shell pattern is allowed in the
# last component only. Missing entries are skipped.
ETC_ALLOWLIST: tuple[str, ...] = (
    "alternatives",  # /usr/bin/java, cc, awk, pager... are symlinks through here
    "bash.bashrc",
    "ca-certificates.conf",
    "debian_version",
    "fonts",  # fontconfig (matplotlib, the JDK's font code)
    "gai.conf",
    "host.conf",
    "inputrc",
    "java-*",  # /usr/lib/jvm/*/conf/* and lib/jvm.cfg are symlinks into /etc/java-NN-openjdk
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "lsb-release",
    "magic",
    "magic.mime",
    "maven",  # /usr/share/maven/conf -> /etc/maven
    "mime.types",
    "networks",
    "os-release",
    "profile",
    "protocols",
    "python3*",  # Debian's sitecustomize.py: /usr/lib/python3.X/sitecustomize.py -> /etc/python3.X/
    "rpc",
    "services",
    "shells",
    "ssl/certs",  # and the JDK's cacerts (ssl/certs/java/cacerts); never ssl/private
    "ssl/openssl.cnf",
    "timezone",
)

# Never copied, at any depth, even below an allowlisted directory (defence in depth).
NEVER_COPY = frozenset({
    "shadow", "shadow-", "gshadow", "gshadow-", "passwd-", "group-", "subuid", "subgid",
    "sudoers", "sudoers.d", "ssh", "private", "machine-id", "ld.so.preload", "krb5.keytab",
    "sandboxd",  # the service's own configuration
})

SANDBOX_USER = "sandbox"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_HOME = "/work"

# Generated files of the layer's etc/ (name -> content); all mode 0644.
GENERATED_ETC_FILES: dict[str, str] = {
    "passwd": (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:{SANDBOX_USER}:{SANDBOX_HOME}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": (
        "root:x:0:\n"
        f"{SANDBOX_USER}:x:{SANDBOX_GID}:\n"
        "nogroup:x:65534:\n"
    ),
    "hosts": (
        "127.0.0.1\tlocalhost sandbox\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    ),
    "hostname": "sandbox\n",
    "resolv.conf": "",
    "nsswitch.conf": (
        "passwd:         files\n"
        "group:          files\n"
        "shadow:         files\n"
        "gshadow:        files\n"
        "hosts:          files dns\n"
        "networks:       files\n"
        "protocols:      files\n"
        "services:       files\n"
        "ethers:         files\n"
        "rpc:            files\n"
        "netgroup:       files\n"
    ),
}
GENERATED_ETC_SYMLINKS: dict[str, str] = {"mtab": "../proc/self/mounts"}

# Empty directories of the layer (relative path, mode), parents first.
LAYER_DIRS: tuple[tuple[str, int], ...] = (
    ("usr", 0o755),
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("work", 0o755),
    ("run", 0o755),
    ("home", 0o755),
    ("root", 0o700),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/cache", 0o755),
    ("var/lib", 0o755),
    ("var/log", 0o755),
    ("etc", 0o755),
)
LAYER_SYMLINKS: tuple[tuple[str, str], ...] = (("var/run", "../run"),)

# Top-level host directories /usr's programs expect. On a usr-merged host they are symlinks,
# reproduced as they are; a real directory (a host without usr-merge) becomes a mount of its own.
ROOT_ALWAYS = ("bin", "sbin", "lib")  # symlinked into usr/ even if the host lacks them
ROOT_IF_PRESENT = ("lib32", "lib64", "libx32")

FINGERPRINT_CACHE_SECONDS = 1.0  # a process reuses a computed fingerprint this long
# A superseded layer is removed this long after a newer one replaced it: jobs that resolved
# the image earlier may still be running on it (the longest wall-time limit is 2 hours).
OLD_LAYER_GRACE_SECONDS = 3 * 3600.0
STALE_TEMP_SECONDS = 3600.0  # a build's temporary directory left by a crashed process

_FINGERPRINT_LENGTH = 24
_FINGERPRINT_RE = re.compile(rf"[0-9a-f]{{{_FINGERPRINT_LENGTH}}}")
_SUPERSEDED_MARKER = "superseded"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WORLD_RX = stat.S_IROTH | stat.S_IXOTH


# An input modified this recently may change again within the file system's timestamp
# granularity without its stat changing: such a fingerprint is marked racy, so the layer is
# built again once the inputs have settled (git's "racy clean" problem).
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class _TopEntry:
    name: str
    kind: str  # "symlink" or "dir" (a directory mounted from the host)
    target: str = ""


@dataclass(frozen=True)
class _Inputs:
    etc_root: str
    host_root: str
    top: tuple[_TopEntry, ...]
    fingerprint: str


def _generated_digest() -> bytes:
    digest = hashlib.sha256(f"sandboxd host image format {FORMAT_VERSION}\0".encode())
    parts = (ETC_ALLOWLIST, sorted(NEVER_COPY), sorted(GENERATED_ETC_FILES.items()),
             sorted(GENERATED_ETC_SYMLINKS.items()), LAYER_DIRS, LAYER_SYMLINKS, ROOT_ALWAYS, ROOT_IF_PRESENT)
    digest.update(repr(parts).encode())
    return digest.digest()


_GENERATED_DIGEST = _generated_digest()

# (state_dir, etc_root, host_root) -> (expiry on the monotonic clock, image, layer path)
_cache: dict[tuple[str, str, str], tuple[float, Image, str]] = {}


def host_image(state_dir: Path, *, etc_root: Path = Path("/etc"), host_root: Path = Path("/")) -> Image:
    """The `host` image, building its root layer below `state_dir` first if needed.

    `etc_root` (the /etc the layer's etc/ is copied from) and `host_root` (whose usr/ is
    mounted and whose bin, lib... links are reproduced) exist for tests.
    """
    state_dir = Path(state_dir)
    key = (os.fspath(state_dir), os.fspath(etc_root), os.fspath(host_root))
    now = time.monotonic()
    cached = _cache.get(key)
    if cached is not None and now < cached[0] and os.path.isdir(cached[2]):
        return cached[1]

    inputs = scan_inputs(Path(etc_root), Path(host_root))
    images_dir = _prepare_state_dirs(state_dir)
    layer = images_dir / inputs.fingerprint / "root"
    if not os.path.isdir(layer):
        _install_layer(images_dir, inputs)
    _collect_garbage(images_dir, inputs.fingerprint)

    image = _make_image(layer, inputs)
    _cache[key] = (now + FINGERPRINT_CACHE_SECONDS, image, os.fspath(layer))
    return image


def clear_cache() -> None:
    """Forget the per-process fingerprint cache (tests; a caller that knows the host changed)."""
    _cache.clear()


def host_fingerprint(etc_root: Path = Path("/etc"), host_root: Path = Path("/")) -> str:
    """The fingerprint of the layer the host's current state yields (uncached)."""
    return scan_inputs(Path(etc_root), Path(host_root)).fingerprint


# --- inputs ---------------------------------------------------------------------------------

def scan_inputs(etc_root: Path, host_root: Path) -> _Inputs:
    digest = hashlib.sha256(_GENERATED_DIGEST)
    digest.update(f"\0{etc_root}\0{host_root}\0".encode("utf-8", "surrogateescape"))
    top = _scan_top(host_root)
    for entry in top:
        digest.update(f"t\0{entry.name}\0{entry.kind}\0{entry.target}\n".encode("utf-8", "surrogateescape"))
    visitor = _FingerprintVisitor()
    _walk_etc(etc_root, visitor)
    digest.update("\n".join(visitor.records).encode("utf-8", "surrogateescape"))
    if visitor.newest_ns > time.time_ns() - _RACY_NS:
        digest.update(b"\0racy")
    return _Inputs(os.fspath(etc_root), os.fspath(host_root), tuple(top), digest.hexdigest()[:_FINGERPRINT_LENGTH])


def _scan_top(host_root: Path) -> list[_TopEntry]:
    entries = []
    for name in ROOT_ALWAYS + ROOT_IF_PRESENT:
        path = os.path.join(host_root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if name in ROOT_ALWAYS:
                entries.append(_TopEntry(name, "symlink", f"usr/{name}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            entries.append(_TopEntry(name, "symlink", os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(_TopEntry(name, "dir"))
    return entries


class _EtcVisitor:
    """What the walk over the allowlisted part of /etc does with each entry it admits."""

    def parent_dir(self, relative: str, st: os.stat_result) -> None:
        """A directory on the way to a nested allowlist entry (e.g. ssl for ssl/certs)."""

    def directory(self, relative: str, st: os.stat_result) -> None:
        """A world-readable directory, copied whole; called before its children."""

    def file(self, relative: str, st: os.stat_result, dir_fd: int, name: str) -> None:
        """A world-readable regular file (as lstat saw it)."""

    def symlink(self, relative: str, st: os.stat_result | None, dir_fd: int, name: str) -> None:
        """A symlink; `st` is None inside a copied directory (seen through d_type only)."""


class _FingerprintVisitor(_EtcVisitor):
    # Inside a copied directory a symlink is fingerprinted by name only: a symlink cannot be
    # changed in place, so replacing one changes its directory's mtime and ctime, which are
    # fingerprinted. That saves a readlink per entry (/etc/alternatives has hundreds).

    def __init__(self) -> None:
        self.records: list[str] = []
        self.newest_ns = 0

    def _times(self, st: os.stat_result) -> str:
        self.newest_ns = max(self.newest_ns, st.st_mtime_ns, st.st_ctime_ns)
        return f"{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"

    def parent_dir(self, relative: str, st: os.stat_result) -> None:
        self.records.append(f"p\0{relative}\0{st.st_mode:o}")

    def directory(self, relative: str, st: os.stat_result) -> None:
        self.records.append(f"d\0{relative}\0{st.st_mode:o}\0{self._times(st)}")

    def file(self, relative: str, st: os.stat_result, dir_fd: int, name: str) -> None:
        self.records.append(f"f\0{relative}\0{st.st_mode:o}\0{st.st_size}\0{self._times(st)}")

    def symlink(self, relative: str, st: os.stat_result | None, dir_fd: int, name: str) -> None:
        if st is None:
            self.records.append(f"l\0{relative}")
        else:
            self.records.append(f"L\0{relative}\0{os.readlink(name, dir_fd=dir_fd)}")


def _walk_etc(etc_root: Path, visitor: _EtcVisitor) -> None:
    """Visit the allowlisted entries of etc_root, never following a symlink below it.

    Only world-readable regular files, world-readable and -searchable directories and
    symlinks are admitted; names in NEVER_COPY are skipped at any depth.
    """
    try:
        root_fd = os.open(etc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        seen: set[str] = set()
        root_names: list[str] | None = None
        for pattern in ETC_ALLOWLIST:
            parent, _, leaf = pattern.rpartition("/")
            parent_fd = _open_parents(root_fd, parent, visitor, seen) if parent else root_fd
            if parent_fd is None:
                continue
            try:
                if any(char in leaf for char in "*?["):
                    if parent_fd == root_fd:
                        if root_names is None:
                            root_names = sorted(os.listdir(root_fd))
                        names = fnmatch.filter(root_names, leaf)
                    else:
                        names = sorted(fnmatch.filter(os.listdir(parent_fd), leaf))
                else:
                    names = [leaf]
                for name in names:
                    relative = f"{parent}/{name}" if parent else name
                    if relative in seen or name in NEVER_COPY:
                        continue
                    seen.add(relative)
                    try:
                        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    _visit(parent_fd, name, relative, st, visitor)
            finally:
                if parent_fd != root_fd:
                    os.close(parent_fd)
    finally:
        os.close(root_fd)


def _open_parents(root_fd: int, parent: str, visitor: _EtcVisitor, seen: set[str]) -> int | None:
    """Open a nested allowlist entry's parent without following symlinks; None if unusable."""
    fd = root_fd
    relative = ""
    for part in parent.split("/"):
        relative = f"{relative}/{part}" if relative else part
        try:
            next_fd: int | None = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError:  # missing, a symlink (ELOOP) or not a directory
            next_fd = None
        if fd != root_fd:
            os.close(fd)
        if next_fd is None:
            return None
        fd = next_fd
        st = os.fstat(fd)
        if part in NEVER_COPY or st.st_mode & _WORLD_RX != _WORLD_RX:
            os.close(fd)
            return None
        if relative not in seen:
            seen.add(relative)
            visitor.parent_dir(relative, st)
    return fd


def _visit(dir_fd: int, name: str, relative: str, st: os.stat_result, visitor: _EtcVisitor) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        visitor.symlink(relative, st, dir_fd, name)
    elif stat.S_ISREG(mode) and mode & stat.S_IROTH:
        visitor.file(relative, st, dir_fd, name)
    elif stat.S_ISDIR(mode) and mode & _WORLD_RX == _WORLD_RX:
        _visit_directory(dir_fd, name, relative, visitor)
    # Anything else (not world-readable; a fifo, socket or device) is never copied. A chmod
    # that admits an entry later adds it to the fingerprint: nothing to record about it now.


def _visit_directory(parent_fd: int, name: str, relative: str, visitor: _EtcVisitor) -> None:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return  # removed or replaced while we looked
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & _WORLD_RX != _WORLD_RX:
            return
        visitor.directory(relative, st)
        with os.scandir(fd) as iterator:
            children = sorted(iterator, key=lambda child: child.name)
        for child in children:
            if child.name in NEVER_COPY:
                continue
            child_relative = f"{relative}/{child.name}"
            try:
                if child.is_symlink():  # from d_type: no system call in the common case
                    visitor.symlink(child_relative, None, fd, child.name)
                    continue
                child_st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            _visit(fd, child.name, child_relative, child_st, visitor)
    finally:
        os.close(fd)


# --- state dirs and garbage collection ------------------------------------------------------

def _mkdir(path: Path, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # whatever the umask


def _prepare_state_dirs(state_dir: Path) -> Path:
    """Create state_dir (0700 when new), state_dir/images and images/host (0711).

    Only the mounter (the service's uid, or container root mapped to it or to host root)
    resolves these paths, when it mounts the overlay; the job's accesses through the overlay
    are checked against the layer's own files, which are world-readable. So a private
    state_dir works, and the intermediate dirs are traversable but not listable by others.
    """
    if not state_dir.is_dir():
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        _mkdir(state_dir, 0o700)
    images = state_dir / "images"
    _mkdir(images, 0o711)
    host = images / "host"
    _mkdir(host, 0o711)
    return host


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _collect_garbage(images_dir: Path, current: str) -> None:
    """Best effort: drop superseded layers after their grace period, and dead temp dirs."""
    try:
        names = os.listdir(images_dir)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = images_dir / name
        try:
            if name == current:
                try:
                    os.unlink(path / _SUPERSEDED_MARKER)  # current again (the host changed back)
                except FileNotFoundError:
                    pass
            elif name.startswith(".trash-"):
                _remove_tree(path)
            elif name.startswith(".tmp-"):
                if now - os.lstat(path).st_mtime > STALE_TEMP_SECONDS:
                    _remove_tree(path)
            elif _FINGERPRINT_RE.fullmatch(name):
                marker = path / _SUPERSEDED_MARKER
                try:
                    superseded_at = os.stat(marker).st_mtime
                except FileNotFoundError:
                    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
                    superseded_at = now
                if now - superseded_at >= OLD_LAYER_GRACE_SECONDS:
                    # Out of the way atomically first: a layer directory that exists is complete.
                    trash = images_dir / f".trash-{name}-{secrets.token_hex(4)}"
                    os.rename(path, trash)
                    _remove_tree(trash)
        except OSError:
            continue


# --- building -------------------------------------------------------------------------------

def _install_layer(images_dir: Path, inputs: _Inputs) -> None:
    final = images_dir / inputs.fingerprint
    temp = images_dir / f".tmp-{inputs.fingerprint}-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(temp, 0o700)
    try:
        _build_layer(temp / "root", inputs)
        os.chmod(temp, 0o711)
        try:
            os.rename(temp, final)
        except OSError as error:
            # Another process installed the same fingerprint first: use theirs.
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final / "root"):
                raise
            _remove_tree(temp)
    except BaseException:
        _remove_tree(temp)
        raise


def _build_layer(root: Path, inputs: _Inputs) -> None:
    os.mkdir(root)
    os.chmod(root, 0o755)
    for relative, mode in LAYER_DIRS:
        path = root / relative
        os.mkdir(path)
        os.chmod(path, mode)
    for relative, target in LAYER_SYMLINKS:
        os.symlink(target, root / relative)
    for top in inputs.top:
        if top.kind == "symlink":
            os.symlink(top.target, root / top.name)
        else:
            os.mkdir(root / top.name)
            os.chmod(root / top.name, 0o755)
    etc = root / "etc"
    _walk_etc(Path(inputs.etc_root), _CopyVisitor(etc))
    for name, content in GENERATED_ETC_FILES.items():
        _write_file(etc / name, content.encode(), 0o644)
    for name, target in GENERATED_ETC_SYMLINKS.items():
        os.symlink(target, etc / name)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class _CopyVisitor(_EtcVisitor):
    """Copies what the walk admits into a fresh directory of ours: files as new files owned by
    us (0644, or 0755 if executable), directories 0755, symlinks as symlinks."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination

    def _mkdir(self, relative: str) -> None:
        path = self.destination / relative
        os.mkdir(path)
        os.chmod(path, 0o755)

    def parent_dir(self, relative: str, st: os.stat_result) -> None:
        self._mkdir(relative)

    def directory(self, relative: str, st: os.stat_result) -> None:
        self._mkdir(relative)

    def symlink(self, relative: str, st: os.stat_result | None, dir_fd: int, name: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.EINVAL):
                return  # removed, or no longer a symlink, since the walk listed it
            raise
        os.symlink(target, self.destination / relative)

    def file(self, relative: str, st: os.stat_result, dir_fd: int, name: str) -> None:
        try:
            source = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.ENXIO):
                return  # removed, replaced by a symlink, or unreadable
            raise
        try:
            st = os.fstat(source)  # what was opened, not what was listed
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IROTH:
                return
            mode = 0o644 | (st.st_mode & 0o111)
            out = os.open(self.destination / relative,
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                while chunk := os.read(source, 1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                os.fchmod(out, mode)
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(out)
        finally:
            os.close(source)


def _make_image(layer: Path, inputs: _Inputs) -> Image:
    host_root = Path(inputs.host_root)
    mounts = [ImageMount("/", (os.fspath(layer),)), ImageMount("/usr", (os.fspath(host_root / "usr"),))]
    for top in inputs.top:
        if top.kind == "dir":
            mounts.append(ImageMount(f"/{top.name}", (os.fspath(host_root / top.name),)))
    return Image(name="host", mounts=tuple(mounts), uid=SANDBOX_UID, gid=SANDBOX_GID)
