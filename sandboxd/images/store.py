"""The image store: content-addressed layers, unpacked once and shared by every image, and
names for images.

    <state_dir>/images/
      layers/<hex>/      a layer (named by its diff id: the sha256 of its uncompressed tar),
                         unpacked once, used as an overlay lower dir by every image that has it
      layers/<hex>.json  its record: sizes, and the blob it first came as
      blobs/sha256/<hex> layer tars as they came (plain or gzip); one layer may have several
      records/<hex>.json an image: its base, its layers bottom first (each with its blob), its
                         config; the name is the sha256 of the file's bytes: the image's id
      refs.json          "name:tag" -> image id
      cache/<hex>.json   the build cache: a step's key -> the layer it made
      downloads/<hex>    blobs being pulled; an interrupted pull leaves its part here to resume
      sources.json       blob -> the registry repositories known to hold it (for cross-repo mounts)
      tmp/               work in progress; what a crash leaves here is removed later
      store.lock         flock: one writer of names at a time
      ownership.json     how layers' owners were unpacked (sandboxd.images.owners); a store
                         holding layers without it is from before owners were kept: all ours

Whatever exists under layers/, blobs/ and records/ is complete: each is written in tmp/ and
renamed into place. A name is written last, under the lock, so `list_images()` never shows
an image whose parts are missing; `prune()` removes (under the same lock) what no name reaches.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from sandboxd.images import Image, ImageMount
from sandboxd.images.layer import HashingStream, LayerError
from sandboxd.images.owners import Ownership, container_ownership
from sandboxd.images.reference import ReferenceError, split_reference

RESERVED_NAMES = ("host", "scratch")
STALE_TMP_S = 3600.0
MAX_SOURCES_PER_BLOB = 8
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


_LISTINGS: dict[str, tuple[tuple, list]] = {}  # store root -> (its change key, its listing)


def remove_tree(path: Path) -> None:
    """shutil.rmtree, also through directories of ours without permissions: overlay leaves its
    work dir mode 000 in a build step's writable layer, and a rootless builder is not root.
    What is not ours (a subordinate uid's, rootless) is then removed in a user namespace
    mapped as containers are; what still fails stays, for remove_stale_tmp() to try again."""

    def unlock(function, failed_path: str, exc_info) -> None:
        try:
            st = os.lstat(failed_path)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            os.chmod(failed_path, 0o700)  # a directory, ours, in a tree no process uses now
            shutil.rmtree(failed_path, ignore_errors=True)

    shutil.rmtree(path, onerror=unlock)
    if os.geteuid() != 0 and os.path.lexists(path):
        try:
            container_ownership().remove(str(path))
        except OSError:
            pass


def _held(path: Path) -> bool:
    """Whether a download's lock file is held: a long download must keep its lock."""
    if path.suffix != ".lock":
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class ImageStoreError(ValueError):
    """A name is invalid, an image is unknown, or the store cannot do what was asked."""


LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
GZIP_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class LayerRef:
    diff_id: str  # "sha256:<hex>" of its uncompressed tar
    size_bytes: int  # of its uncompressed tar
    blob: str  # "sha256:<hex>" of the tar as stored and shipped (gzip or not)
    blob_size_bytes: int
    media_type: str  # LAYER_MEDIA_TYPE or GZIP_LAYER_MEDIA_TYPE

    @classmethod
    def from_dict(cls, raw: dict) -> LayerRef:
        return cls(raw["diff_id"], raw["size_bytes"], raw["blob"], raw["blob_size_bytes"], raw["media_type"])


@dataclass(frozen=True)
class ImageRecord:
    base: str  # "scratch" or "host": what the layers lie on
    layers: tuple[LayerRef, ...]  # bottom first
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    uid: int = 0
    gid: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    created: str = ""  # ISO 8601 UTC

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        raw = json.loads(data)
        return cls(
            base=raw["base"],
            layers=tuple(LayerRef.from_dict(layer) for layer in raw["layers"]),
            env=tuple((key, value) for key, value in raw["env"]),
            workdir=raw["workdir"],
            uid=raw["uid"],
            gid=raw["gid"],
            labels=tuple((key, value) for key, value in raw["labels"]),
            created=raw["created"],
        )


def parse_reference(reference: str) -> str:
    """`[REGISTRY[:PORT]/]NAME[:TAG]` as the canonical "name:tag"; ImageStoreError names what is
    wrong. A store names images by tag: a digest is the registry's business."""
    try:
        parsed = split_reference(reference)
    except ReferenceError as error:
        raise ImageStoreError(str(error)) from None
    if parsed.digest:
        raise ImageStoreError(f"{reference!r}: local images are named NAME[:TAG], without a digest")
    if parsed.name in RESERVED_NAMES:
        raise ImageStoreError(f"{parsed.name!r} is a built-in name")
    return parsed.local_name()


def _hex(diff_id: str) -> str:
    match = _DIGEST_RE.match(diff_id)
    if not match:
        raise ImageStoreError(f"not a sha256 digest: {diff_id!r}")
    return match.group(1)


def _describe(record: dict | None) -> str:
    if record is None or record.get("owners") == "ours":
        return "all the store's user's (no subordinate ids, or from before owners were kept)"
    if record.get("owners") != "mapped":
        return "in an unknown way (ownership.json is unreadable)"
    ranges = ", ".join(f"{inside}->{outside} ({count})" for inside, outside, count in record["uid_ranges"])
    return f"with uids mapped {ranges}"


def _media_type(blob: Path) -> str:
    with open(blob, "rb") as file:
        return GZIP_LAYER_MEDIA_TYPE if file.read(2) == b"\x1f\x8b" else LAYER_MEDIA_TYPE


class ImageStore:
    def __init__(self, state_dir: Path, ownership: Ownership | None = None) -> None:
        """Reading needs nothing on disk; the first write makes the store's directories.
        ownership says how a layer's owners are unpacked (None: as the containers this user
        runs map them, see sandboxd.images.owners)."""
        self.root = Path(state_dir) / "images"
        self._ownership = ownership
        self._ownership_checked = False

    @property
    def ownership(self) -> Ownership:
        if self._ownership is None:
            self._ownership = container_ownership()
        return self._ownership

    def _check_ownership(self) -> None:
        """Before unpacking: the store's layers must all have owners unpacked the same way.
        A store without layers takes this one's; one holding layers of another (or from
        before owners were kept: all ours) is refused, not mixed."""
        if self._ownership_checked:
            return
        wanted = self.ownership.record()
        with self.locked():
            try:
                recorded = json.loads((self.root / "ownership.json").read_bytes())
            except FileNotFoundError:
                recorded = None
            except ValueError:
                recorded = {"owners": "unreadable"}
            if recorded != wanted:
                layers = any(path.is_dir() for path in (self.root / "layers").iterdir())
                if layers and (recorded or {"owners": "ours"}) != wanted:
                    raise ImageStoreError(
                        f"the image store {self.root} holds layers whose owners were unpacked "
                        f"{_describe(recorded)}, but containers now map ids {_describe(wanted)}; "
                        "remove its images (sandboxd image rm NAME for each, then sandboxd image prune) "
                        "and build or pull them again")
                self._write_json("ownership.json", wanted)
        self._ownership_checked = True

    def _ensure_dirs(self) -> None:
        for directory in (self.root, self.root / "layers", self.root / "records", self.root / "tmp"):
            directory.mkdir(mode=0o711, parents=True, exist_ok=True)

    # --- locking and temp dirs -------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        self._ensure_dirs()
        fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _new_tmp(self) -> Path:
        self._ensure_dirs()
        path = self.root / "tmp" / f"{int(time.time())}-{secrets.token_hex(8)}"
        path.mkdir(mode=0o700)
        return path

    def remove_stale_tmp(self) -> None:
        """What interrupted writers (a crash, a kill) left in tmp/ an hour or more ago, and
        downloads no one has resumed for as long."""
        now = time.time()
        if (self.root / "tmp").is_dir():
            for entry in (self.root / "tmp").iterdir():
                started = entry.name.partition("-")[0]
                if started.isdigit() and now - int(started) > STALE_TMP_S:
                    remove_tree(entry)
        if (self.root / "downloads").is_dir():
            for entry in (self.root / "downloads").iterdir():
                try:
                    if now - entry.lstat().st_mtime > STALE_TMP_S and not _held(entry):
                        entry.unlink()
                except FileNotFoundError:
                    pass

    # --- layers ----------------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / _hex(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def layer(self, diff_id: str) -> LayerRef | None:
        """The record of a layer in the store (None if it is not complete there)."""
        try:
            layer = LayerRef.from_dict(json.loads((self.root / "layers" / f"{_hex(diff_id)}.json").read_bytes()))
        except (FileNotFoundError, ValueError, KeyError):
            return None
        return layer if self.has_layer(diff_id) and self.blob_path(layer.blob).is_file() else None

    def known_layer(self, diff_id: str, blob: str) -> LayerRef | None:
        """The layer, as that blob, if both are in the store. One layer may come as several
        blobs (plain, gzip): an image refers to the blob it came as, and leaves the store so."""
        known = self.layer(diff_id)
        if known is None or not self.blob_path(blob).is_file():
            return None
        path = self.blob_path(blob)
        return LayerRef(known.diff_id, known.size_bytes, blob, path.stat().st_size, _media_type(path))

    def add_layer(self, stream: BinaryIO, expected_diff_id: str | None = None,
                  expected_blob: str | None = None) -> LayerRef:
        """Unpack a layer tar (plain or gzip) into the store, and keep the tar as received (its
        blob), once: a layer that is there already is not unpacked again. LayerError for a
        bad or unsafe tar, or one whose digests are not the expected ones; nothing of it
        stays behind."""
        if expected_diff_id is not None and expected_blob is not None \
                and (known := self.known_layer(expected_diff_id, expected_blob)) is not None:
            return known
        return self._add_layer(stream, expected_diff_id, expected_blob, downloaded=None)

    def add_layer_file(self, path: Path, expected_diff_id: str, expected_blob: str) -> LayerRef:
        """add_layer() of a downloaded blob, which is moved into blobs/ rather than copied."""
        if (known := self.known_layer(expected_diff_id, expected_blob)) is not None:
            path.unlink(missing_ok=True)
            return known
        with open(path, "rb") as stream:
            return self._add_layer(stream, expected_diff_id, expected_blob, downloaded=path)

    def _add_layer(self, stream: BinaryIO, expected_diff_id: str | None, expected_blob: str | None,
                   downloaded: Path | None) -> LayerRef:
        self._check_ownership()
        work = self._new_tmp()
        try:
            tree = work / "tree"
            tree.mkdir(mode=0o755)
            blob_file = downloaded or work / "blob"
            with ExitStack() as stack:
                copy = None if downloaded else stack.enter_context(open(blob_file, "xb"))
                tee = HashingStream(stream, copy)
                reader = io.BufferedReader(tee)
                info = self.ownership.unpack(reader, str(tree))
                while reader.read(1 << 20):
                    pass  # whatever follows the tar's end is part of the blob
            blob = "sha256:" + tee.sha256.hexdigest()
            if expected_diff_id is not None and info.diff_id != expected_diff_id:
                raise LayerError(f"the layer's digest is {info.diff_id}, not the expected {expected_diff_id}")
            if expected_blob is not None and blob != expected_blob:
                raise LayerError(f"the layer blob's digest is {blob}, not the expected {expected_blob}")
            layer = LayerRef(info.diff_id, info.size_bytes, blob, tee.size_bytes, _media_type(blob_file))
            self.blob_path(blob).parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            os.replace(blob_file, self.blob_path(blob))
            (work / "layer.json").write_text(json.dumps(asdict(layer)))
            final = self.layer_dir(info.diff_id)
            try:
                os.rename(tree, final)
            except OSError:
                if not final.is_dir():
                    raise  # else another writer put the same layer in place first: keep theirs
            if self.layer(info.diff_id) is None:  # the layer's first blob is the one it is known by
                os.replace(work / "layer.json", self.root / "layers" / f"{_hex(info.diff_id)}.json")
            return layer
        finally:
            remove_tree(work)

    # --- downloads, and where blobs were seen -------------------------------------------------

    def download_path(self, blob: str) -> Path:
        """Where a blob is downloaded to: kept when a pull is interrupted, so the next resumes."""
        directory = self.root / "downloads"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory / _hex(blob)

    def blob_sources(self, blob: str, registry: str) -> list[str]:
        """Repositories of `registry` known to hold `blob` (it was pulled from or pushed there)."""
        try:
            sources = json.loads((self.root / "sources.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return []
        return [repository for where in sources.get(blob, ()) for host, _, repository in [where.partition("/")]
                if host == registry]

    def note_blob_sources(self, blobs: list[str], registry: str, repository: str) -> None:
        with self.locked():
            try:
                sources = json.loads((self.root / "sources.json").read_bytes())
            except (FileNotFoundError, ValueError):
                sources = {}
            where = f"{registry}/{repository}"
            for blob in blobs:
                known = [source for source in sources.get(blob, []) if source != where]
                sources[blob] = ([where] + known)[:MAX_SOURCES_PER_BLOB]
            self._write_json("sources.json", sources)

    # --- the build cache: a step's key -> the layer it made ---------------------------------

    def cached_layer(self, key: str) -> LayerRef | None:
        try:
            raw = json.loads((self.root / "cache" / f"{_hex(key)}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return self.layer(raw["diff_id"])

    def cache_layer(self, key: str, layer: LayerRef) -> None:
        (self.root / "cache").mkdir(mode=0o711, exist_ok=True)
        work = self._new_tmp()
        try:
            (work / "entry.json").write_text(json.dumps(asdict(layer)))
            os.rename(work / "entry.json", self.root / "cache" / f"{_hex(key)}.json")
        finally:
            remove_tree(work)

    @contextmanager
    def work_dir(self) -> Iterator[Path]:
        """A private directory under tmp/, removed afterwards."""
        work = self._new_tmp()
        try:
            yield work
        finally:
            remove_tree(work)

    # --- images and names ------------------------------------------------------------------

    def save(self, record: ImageRecord) -> str:
        """Store an image record (its layers must be in the store); returns its id."""
        missing = [layer.diff_id for layer in record.layers if not self.has_layer(layer.diff_id)]
        if missing:
            raise ImageStoreError(f"the image's layers are not in the store: {', '.join(missing)}")
        data = record.to_json()
        image_id = "sha256:" + hashlib.sha256(data).hexdigest()
        final = self.root / "records" / f"{_hex(image_id)}.json"
        if not final.exists():
            work = self._new_tmp()
            try:
                (work / "record.json").write_bytes(data)
                os.rename(work / "record.json", final)
            finally:
                remove_tree(work)
        return image_id

    def record(self, image_id: str) -> ImageRecord:
        try:
            return ImageRecord.from_json((self.root / "records" / f"{_hex(image_id)}.json").read_bytes())
        except FileNotFoundError:
            raise ImageStoreError(f"no image {image_id}") from None

    def _refs(self) -> dict[str, str]:
        try:
            return json.loads((self.root / "refs.json").read_bytes())
        except FileNotFoundError:
            return {}

    def _write_refs(self, refs: dict[str, str]) -> None:
        self._write_json("refs.json", refs)

    def _write_json(self, name: str, document: dict) -> None:
        work = self._new_tmp()
        try:
            (work / name).write_text(json.dumps(document, sort_keys=True, indent=1))
            os.rename(work / name, self.root / name)
        finally:
            remove_tree(work)

    def tag(self, reference: str, image_id: str) -> str:
        """Name an image ("name[:tag]"); returns the canonical "name:tag"."""
        name = parse_reference(reference)
        self.record(image_id)  # it must exist
        with self.locked():
            refs = self._refs()
            refs[name] = image_id
            self._write_refs(refs)
        return name

    def resolve(self, reference: str) -> tuple[str, ImageRecord]:
        """The id and record a name points to; ImageStoreError if none (or if broken)."""
        name = parse_reference(reference)
        image_id = self._refs().get(name)
        if image_id is None:
            raise ImageStoreError(f"no image named {name!r}")
        record = self.record(image_id)
        if not all(self.has_layer(layer.diff_id) for layer in record.layers):
            raise ImageStoreError(f"image {name!r} is missing layers; pull or build it again")
        return image_id, record

    def list_images(self) -> list[tuple[str, str, ImageRecord]]:
        """(name:tag, id, record) of every complete named image, by name. Cached while the
        names and the layers directory are unchanged: the service checks names per request."""
        try:
            refs, layers = os.stat(self.root / "refs.json"), os.stat(self.root / "layers")
        except FileNotFoundError:
            return []
        key = (str(self.root), refs.st_ino, refs.st_mtime_ns, layers.st_mtime_ns)
        cached = _LISTINGS.get(key[0])
        if cached is None or cached[0] != key:
            cached = _LISTINGS[key[0]] = (key, self._list_uncached())
        return list(cached[1])

    def _list_uncached(self) -> list[tuple[str, str, ImageRecord]]:
        listed = []
        for name, image_id in sorted(self._refs().items()):
            try:
                record = self.record(image_id)
            except (ImageStoreError, ValueError, KeyError):
                continue
            if all(self.has_layer(layer.diff_id) for layer in record.layers):
                listed.append((name, image_id, record))
        return listed

    def remove(self, reference: str) -> str:
        """Drop a name (its layers stay until prune()); returns the image id it named."""
        name = parse_reference(reference)
        with self.locked():
            refs = self._refs()
            if name not in refs:
                raise ImageStoreError(f"no image named {name!r}")
            image_id = refs.pop(name)
            self._write_refs(refs)
        return image_id

    def prune(self, keep_layers: frozenset[str] = frozenset()) -> list[str]:
        """Remove records, layers, their blobs and build cache entries that no name reaches
        (nor keep_layers); returns the removed layers' diff ids."""
        removed = []
        if not self.root.is_dir():
            return removed
        with self.locked():
            named = set(self._refs().values())
            reachable = set(keep_layers)
            kept_blobs = set()
            for image_id in named:
                try:
                    layers = self.record(image_id).layers
                except ImageStoreError:
                    continue
                reachable |= {layer.diff_id for layer in layers}
                kept_blobs |= {layer.blob for layer in layers}
            for path in (self.root / "records").glob("*.json"):
                if "sha256:" + path.stem not in named:
                    path.unlink()
            for path in (self.root / "cache").glob("*.json") if (self.root / "cache").is_dir() else ():
                try:
                    if json.loads(path.read_bytes())["diff_id"] not in reachable:
                        path.unlink()
                except (ValueError, KeyError):
                    path.unlink()
            for path in (self.root / "layers").iterdir():
                diff_id = "sha256:" + path.name.partition(".")[0]
                if diff_id in reachable:
                    continue
                if path.is_dir() and not path.is_symlink():
                    # Renamed out of layers/ first: no image resolves to a half-removed layer.
                    doomed = self._new_tmp() / "doomed"
                    os.rename(path, doomed)
                    remove_tree(doomed.parent)
                    removed.append(diff_id)
                else:
                    path.unlink()
            kept_blobs |= {known.blob for diff_id in reachable if (known := self.layer(diff_id)) is not None}
            blobs = self.root / "blobs" / "sha256"
            for path in blobs.iterdir() if blobs.is_dir() else ():
                if "sha256:" + path.name not in kept_blobs:
                    path.unlink()
        return removed


def runtime_image(name: str, record: ImageRecord, store: ImageStore, state_dir: Path,
                  build_step: bool = False) -> Image:
    """What the runtime mounts for a stored image: its layers (top first) over its base's
    lower dirs; over `host`, each layer's part under a mount of host's goes onto that mount.
    Jobs never run as uid 0 (it is the host's root when the service is): an image whose
    USER is root runs its jobs as the sandbox user; only its build steps run as root."""
    from sandboxd.images.host import SANDBOX_GID, SANDBOX_UID, host_image

    layers = [store.layer_dir(layer.diff_id) for layer in reversed(record.layers)]
    if record.base == "host":
        base = host_image(state_dir)
        mounts = []
        for mount in base.mounts:
            relative = mount.target.lstrip("/")
            ours = [layer / relative if relative else layer for layer in layers]
            ours = [path for path in ours if path.is_dir() and not path.is_symlink()]
            mounts.append(ImageMount(mount.target, tuple(map(str, ours)) + mount.lowerdirs))
    else:
        if not layers:
            empty = store.root / "empty"
            empty.mkdir(mode=0o755, exist_ok=True)
            layers = [empty]
        mounts = [ImageMount("/", tuple(map(str, layers)))]
    env = dict(Image.__dataclass_fields__["env"].default)
    env.update(record.env)
    uid, gid = record.uid, record.gid
    if uid == 0 and not build_step:
        uid, gid = SANDBOX_UID, SANDBOX_GID
    return Image(name=name, mounts=tuple(mounts), env=tuple(env.items()), uid=uid, gid=gid)
