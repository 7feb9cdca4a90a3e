"""OCI image documents (config, manifest, index) for stored images, and the OCI image layout
as a tar: `image save` writes one, `image load` reads one (from sandboxd, skopeo, umoci...).

An image built FROM host holds only what it adds to this machine's /usr: it is not portable,
so it is neither saved nor pushed. A loaded image lies on `scratch`, as pulled images do.

A layout tar is untrusted input: its members are never extracted by name; only the blobs the
index and manifest name are read, each checked against its digest while it streams, and the
JSON documents are size-capped before they are parsed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.images import MAX_IMAGE_LAYERS
from sandboxd.images.layer import LayerError
from sandboxd.images.store import (GZIP_LAYER_MEDIA_TYPE, LAYER_MEDIA_TYPE, ImageRecord, ImageStore,
                                   ImageStoreError, parse_reference)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
LAYER_TYPES = (LAYER_MEDIA_TYPE, GZIP_LAYER_MEDIA_TYPE, DOCKER_LAYER_GZIP, DOCKER_LAYER)
REF_NAME = "org.opencontainers.image.ref.name"
MAX_DOCUMENT_BYTES = 4 << 20
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_USER_RE = re.compile(r"^(\d{1,10})(?::(\d{1,10}))?$")


class OciError(ValueError):
    """A layout, manifest or config is malformed, or an image cannot be exported."""


@dataclass(frozen=True)
class Documents:
    """An image's OCI documents, as the exact bytes their digests name."""

    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return digest_of(self.manifest)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_documents(record: ImageRecord, name: str) -> Documents:
    """The config and manifest of a stored image; OciError if it is not portable."""
    if record.base != "scratch":
        raise OciError(f"{name} is built FROM {record.base}: it holds only what it adds to this machine's "
                       "/usr and cannot leave it; build FROM scratch (or a pulled image) to save or push")
    config = {
        "created": record.created or None,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [f"{key}={value}" for key, value in record.env],
            "WorkingDir": record.workdir,
            "User": f"{record.uid}:{record.gid}",
            "Labels": dict(record.labels),
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in record.layers]},
    }
    config_bytes = _canonical({key: value for key, value in config.items() if value is not None})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.blob, "size": layer.blob_size_bytes}
                   for layer in record.layers],
    }
    return Documents(config_bytes, _canonical(manifest))


def _document(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise OciError(f"the {what} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise OciError(f"the {what} is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise OciError(f"the {what} is not a JSON object")
    return document


def parse_descriptor(raw: Any, what: str) -> tuple[str, str, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("digest"), str) or not _DIGEST_RE.match(raw["digest"]) \
            or not isinstance(raw.get("size"), int) or raw["size"] < 0:
        raise OciError(f"the {what} descriptor is malformed (a sha256 digest and a size are required)")
    return str(raw.get("mediaType", "")), raw["digest"], raw["size"]


def record_from_config(config: dict[str, Any], layers: tuple, created_fallback: str) -> ImageRecord:
    """An image record from an OCI (or Docker) config; ids only, never user names."""
    settings = config.get("config") or {}
    if not isinstance(settings, dict):
        raise OciError("the config's `config` is not an object")
    env = []
    for entry in settings.get("Env") or []:
        if not isinstance(entry, str) or "=" not in entry or "\0" in entry:
            raise OciError(f"the config's Env entry {entry!r} is not KEY=VALUE")
        key, _, value = entry.partition("=")
        env.append((key, value))
    user = settings.get("User") or "0"
    match = _USER_RE.match(str(user))
    if not match:
        raise OciError(f"the config's User {user!r} is not numeric: user names are not resolved")
    uid = int(match.group(1))
    gid = int(match.group(2)) if match.group(2) else uid
    labels = settings.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise OciError("the config's Labels are not a map of strings")
    workdir = settings.get("WorkingDir") or "/"
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        raise OciError(f"the config's WorkingDir {workdir!r} is not an absolute path")
    created = config.get("created") if isinstance(config.get("created"), str) else created_fallback
    return ImageRecord(base="scratch", layers=layers, env=tuple(env), workdir=workdir, uid=uid, gid=gid,
                       labels=tuple(sorted(labels.items())), created=created)


def check_layers(manifest: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """(media type, blob digest, size, diff id) per layer, bottom first."""
    layers = manifest.get("layers")
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(layers, list) or not isinstance(diff_ids, list) or len(layers) != len(diff_ids):
        raise OciError("the manifest's layers and the config's diff_ids do not match one to one")
    if len(layers) > MAX_IMAGE_LAYERS:
        raise OciError(f"the image has {len(layers)} layers: containers stack at most {MAX_IMAGE_LAYERS}")
    checked = []
    for index, (raw, diff_id) in enumerate(zip(layers, diff_ids)):
        media_type, digest, size = parse_descriptor(raw, f"layer {index}")
        if media_type not in LAYER_TYPES:
            raise OciError(f"layer {index} has media type {media_type!r}: only tar and tar+gzip layers are supported")
        if not isinstance(diff_id, str) or not _DIGEST_RE.match(diff_id):
            raise OciError(f"diff_id {index} is not a sha256 digest")
        checked.append((media_type, digest, size, diff_id))
    return checked


# --- the layout tar --------------------------------------------------------------------------

def _entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
    # Owned by whoever writes the layout: a rootless reader (skopeo) recreates the owners it
    # finds, and may only give its own.
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, os.getuid(), os.getgid()
    return info


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _entry(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def save_image(store: ImageStore, reference: str, path: Path) -> str:
    """Write the image as an OCI image layout tar at `path`; returns the manifest digest."""
    name = parse_reference(reference)
    _, record = store.resolve(name)
    documents = image_documents(record, name)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": documents.manifest_digest, "size": len(documents.manifest),
         "annotations": {REF_NAME: name}, "platform": {"architecture": "amd64", "os": "linux"}}]}
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
        _add_bytes(archive, "oci-layout", _canonical({"imageLayoutVersion": "1.0.0"}))
        for directory in ("blobs", "blobs/sha256"):
            archive.addfile(_entry(directory, tarfile.DIRTYPE, 0o755))
        _add_bytes(archive, "index.json", _canonical(index))
        for data in (documents.config, documents.manifest):
            _add_bytes(archive, "blobs/sha256/" + digest_of(data)[7:], data)
        for layer in record.layers:
            info = _entry("blobs/sha256/" + layer.blob[7:])
            with open(store.blob_path(layer.blob), "rb") as blob:
                info.size = os.fstat(blob.fileno()).st_size
                archive.addfile(info, blob)
    partial.rename(path)  # a file at `path` is a whole layout
    return documents.manifest_digest


class _Layout:
    """Blobs of a layout tar, found by name without extracting anything."""

    def __init__(self, archive: tarfile.TarFile) -> None:
        self._archive = archive
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in archive.getmembers():
            name = member.name.removeprefix("./")
            if name in self._members:
                raise OciError(f"the layout holds {name!r} twice")
            self._members[name] = member

    def read(self, name: str, what: str) -> bytes:
        member = self._members.get(name)
        if member is None or not member.isreg():
            raise OciError(f"the layout has no {what} ({name})")
        if member.size > MAX_DOCUMENT_BYTES:
            raise OciError(f"the {what} is larger than {MAX_DOCUMENT_BYTES} bytes")
        return self._archive.extractfile(member).read()  # type: ignore[union-attr]

    def blob(self, digest: str, what: str, size: int | None = None) -> bytes:
        data = self.read("blobs/sha256/" + digest[7:], what)
        if digest_of(data) != digest or (size is not None and len(data) != size):
            raise OciError(f"the {what} does not match its digest {digest}")
        return data

    def stream(self, digest: str, what: str) -> io.BufferedReader:
        member = self._members.get("blobs/sha256/" + digest[7:])
        if member is None or not member.isreg():
            raise OciError(f"the layout has no {what} ({digest})")
        return self._archive.extractfile(member)  # type: ignore[return-value]


def load_image(store: ImageStore, path: Path, reference: str | None, created_fallback: str) -> tuple[str, str]:
    """Read an OCI image layout tar of one image into the store and name it `reference`, else
    what the index's ref.name annotation says. Returns (name:tag, image id)."""
    try:
        with tarfile.open(path, "r:*") as archive:
            layout = _Layout(archive)
            index = _document(layout.read("index.json", "index"), "index")
            manifests = index.get("manifests")
            if not isinstance(manifests, list) or not manifests:
                raise OciError("the index names no manifest")
            if len(manifests) > 1:
                raise OciError("the layout holds several images: load a layout of one image")
            media_type, digest, size = parse_descriptor(manifests[0], "manifest")
            manifest = _document(layout.blob(digest, "manifest", size), "manifest")
            if manifest.get("mediaType", media_type or OCI_MANIFEST) not in MANIFEST_TYPES:
                raise OciError(f"the manifest has media type {manifest.get('mediaType')!r}")
            _, config_digest, config_size = parse_descriptor(manifest.get("config"), "config")
            config = _document(layout.blob(config_digest, "config", config_size), "config")
            layers = []
            for index_number, (_, blob, _, diff_id) in enumerate(check_layers(manifest, config)):
                layers.append(store.add_layer(layout.stream(blob, f"layer {index_number}"),
                                              expected_diff_id=diff_id, expected_blob=blob))
            record = record_from_config(config, tuple(layers), created_fallback)
            annotations = manifests[0].get("annotations")
            name = reference or (annotations.get(REF_NAME) if isinstance(annotations, dict) else None)
    except (tarfile.TarError, EOFError) as error:
        raise OciError(f"{path} is not a readable tar: {error}") from None
    except LayerError as error:
        raise OciError(str(error)) from None
    if not isinstance(name, str) or not name:
        raise OciError("the layout does not name its image: give it a name (-t NAME[:TAG])")
    image_id = store.save(record)
    try:
        return store.tag(name, image_id), image_id
    except ImageStoreError as error:
        raise OciError(str(error)) from None
