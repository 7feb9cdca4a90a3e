"""Pulling an image from a registry into the store.

The manifest (from an index, the linux/amd64 one) and the config are size-capped and checked
against their digests; each layer blob is downloaded to `downloads/` while its digest and size
are checked, then unpacked by the store (which checks the diff id), at most PARALLEL_LAYERS
at once. A layer already in the store is not downloaded. An interrupted download stays in
`downloads/` and the next pull asks the registry for the rest only (an HTTP range); a blob
whose digest is wrong is deleted. Two pulls of one blob take turns on a lock: the second
finds the layer in the store. The image's name is written last: a pull that fails names
nothing, and what it stored is complete.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, TextIO

import aiohttp

from sandboxd.images.auth import credentials_for
from sandboxd.images.layer import LayerError
from sandboxd.images.oci import (INDEX_TYPES, MANIFEST_TYPES, MAX_DOCUMENT_BYTES, OCI_MANIFEST, OciError,
                                 check_layers, digest_of, parse_descriptor, record_from_config)
from sandboxd.images.progress import LayerProgress, Transfer
from sandboxd.images.reference import DIGEST_RE, Reference
from sandboxd.images.registry import RegistryClient, RegistryError, each_layer, new_session, read_capped
from sandboxd.images.store import ImageStore, LayerRef

PARALLEL_LAYERS = 3
WRITE_CHUNK_BYTES = 1 << 20
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES + INDEX_TYPES)  # distribution answers 404 to a partial list
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
PLATFORM = ("linux", "amd64")


@dataclass(frozen=True)
class Pulled:
    name: str  # "registry/path:tag" in the store
    image_id: str
    manifest_digest: str


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(f"the {what} is not JSON") from None
    if not isinstance(document, dict):
        raise RegistryError(f"the {what} is not a JSON object")
    return document


async def fetch_manifest(client: RegistryClient, path: str, reference: str,
                         scopes: tuple[str, ...]) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of a manifest or index; its digest is checked when the
    reference is one, and against what the registry says it is otherwise."""
    async with await client.request("GET", f"/v2/{path}/manifests/{reference}", scopes=scopes,
                                    headers={"Accept": ACCEPT_MANIFESTS}) as response:
        data = await read_capped(response, MAX_DOCUMENT_BYTES, "manifest")
        said_digest = response.headers.get("Docker-Content-Digest")
        content_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
    digest = digest_of(data)
    if reference.startswith("sha256:") and digest != reference:
        raise RegistryError(f"the manifest {reference} arrived with digest {digest}")
    if said_digest and said_digest.startswith("sha256:") and said_digest != digest:
        raise RegistryError(f"the manifest's digest is {digest}, not the {said_digest} the registry says")
    media_type = _json(data, "manifest").get("mediaType") or content_type or OCI_MANIFEST
    if media_type in SCHEMA1_TYPES:
        raise RegistryError("the image has a Docker schema 1 manifest (deprecated since 2017): not supported")
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise RegistryError(f"the manifest has media type {media_type!r}: not an image manifest or index")
    return data, media_type, digest


def platform_manifest(index: dict[str, Any]) -> str:
    """The digest of the linux/amd64 image of an index."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError("the index has no list of manifests")
    seen = []
    for entry in manifests:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        seen.append(f"{platform.get('os')}/{platform.get('architecture')}")
        if (platform.get("os"), platform.get("architecture")) == PLATFORM \
                and entry.get("mediaType", OCI_MANIFEST) in MANIFEST_TYPES:
            digest = entry.get("digest")
            if isinstance(digest, str) and DIGEST_RE.fullmatch(digest):
                return digest
    raise RegistryError(f"the index has no {'/'.join(PLATFORM)} image (it has: {', '.join(seen) or 'none'})")


async def fetch_blob_bytes(client: RegistryClient, path: str, digest: str, size_bytes: int,
                           scopes: tuple[str, ...], what: str) -> bytes:
    if size_bytes > MAX_DOCUMENT_BYTES:
        raise RegistryError(f"the {what} is said to be {size_bytes} bytes: more than {MAX_DOCUMENT_BYTES}")
    async with await client.request("GET", f"/v2/{path}/blobs/{digest}", scopes=scopes) as response:
        data = await read_capped(response, MAX_DOCUMENT_BYTES, what)
    if len(data) != size_bytes or digest_of(data) != digest:
        raise RegistryError(f"the {what} does not match its digest {digest} and size {size_bytes}")
    return data


@asynccontextmanager
async def _blob_lock(store: ImageStore, blob: str) -> AsyncIterator[None]:
    """One download of a blob at a time, across processes."""
    lock_path = store.download_path(blob).with_suffix(".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            try:
                still_ours = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                still_ours = False  # the previous holder removed it as we waited: lock anew
            if still_ours:
                try:
                    yield
                finally:
                    os.unlink(lock_path)
                return
        finally:
            os.close(fd)


async def _download(client: RegistryClient, path: str, blob: str, size_bytes: int, scopes: tuple[str, ...],
                    target: Path, progress: LayerProgress) -> None:
    """Download a blob into `target`, resuming what an interrupted pull left there."""
    have_bytes = target.stat().st_size if target.exists() else 0
    sha256 = hashlib.sha256()
    if 0 < have_bytes <= size_bytes:
        await asyncio.to_thread(_hash_file, target, sha256)
    else:
        have_bytes = 0
    if have_bytes == size_bytes and "sha256:" + sha256.hexdigest() == blob:
        progress.start(have_bytes)  # all there: the last pull ended before unpacking it
        return
    url = f"/v2/{path}/blobs/{blob}"
    headers = {"Range": f"bytes={have_bytes}-"} if have_bytes else {}
    response = await client.request("GET", url, scopes=scopes, headers=headers, expect=(200, 206, 416))
    if response.status == 416:  # the registry will not resume there: start over
        response.release()
        have_bytes, sha256 = 0, hashlib.sha256()
        response = await client.request("GET", url, scopes=scopes)
    async with response:
        if response.status == 200 and have_bytes:
            have_bytes, sha256 = 0, hashlib.sha256()  # the registry sends it all again
        elif response.status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have_bytes}-"):
            raise RegistryError(f"the registry answered another range than bytes {have_bytes}- of {blob}")
        progress.start(have_bytes)
        with open(target, "r+b" if have_bytes else "wb") as file:
            file.seek(have_bytes)
            file.truncate()
            received_bytes = have_bytes
            pending = bytearray()
            try:
                async for chunk in response.content.iter_chunked(256 << 10):
                    received_bytes += len(chunk)
                    if received_bytes > size_bytes:
                        raise RegistryError(f"the blob {blob} is larger than the {size_bytes} bytes its manifest says")
                    sha256.update(chunk)
                    pending += chunk
                    progress.advance(len(chunk))
                    if len(pending) >= WRITE_CHUNK_BYTES:
                        await asyncio.to_thread(file.write, bytes(pending))
                        pending.clear()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
                await asyncio.to_thread(file.write, bytes(pending))
                raise RegistryError(f"the download of {blob} was cut short at {received_bytes} of {size_bytes} "
                                    f"bytes ({error.__class__.__name__}); pull again to resume") from None
            await asyncio.to_thread(file.write, bytes(pending))
    if received_bytes != size_bytes:
        raise RegistryError(f"the download of {blob} ended at {received_bytes} of {size_bytes} bytes; "
                            "pull again to resume")
    if "sha256:" + sha256.hexdigest() != blob:
        target.unlink()
        raise RegistryError(f"the blob {blob} arrived with digest sha256:{sha256.hexdigest()}: refused")


def _hash_file(path: Path, sha256: Any) -> None:
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(1 << 20):
            sha256.update(chunk)


async def _ensure_layer(store: ImageStore, client: RegistryClient, path: str, scopes: tuple[str, ...],
                        layer: tuple[str, str, int, str], transfer: Transfer) -> LayerRef:
    _, blob, size_bytes, diff_id = layer
    progress = transfer.layer(blob, size_bytes)
    if (known := store.known_layer(diff_id, blob)) is not None:
        progress.done("already in the store")
        return known
    async with _blob_lock(store, blob):
        if (known := store.known_layer(diff_id, blob)) is not None:
            progress.done("pulled by another pull meanwhile")
            return known
        target = store.download_path(blob)
        await _download(client, path, blob, size_bytes, scopes, target, progress)
        try:
            stored = await asyncio.to_thread(store.add_layer_file, target, diff_id, blob)
        except LayerError as error:
            target.unlink(missing_ok=True)
            raise RegistryError(f"layer {blob}: {error}") from None
    progress.done()
    return stored


async def pull_image(store: ImageStore, reference: Reference, out: TextIO, *, name: str | None = None,
                     insecure: bool = False, environ: Mapping[str, str] | None = None,
                     created_fallback: str = "", interactive: bool | None = None) -> Pulled:
    """Pull `reference` (a remote_reference()) and name it `name`, else its local_name()."""
    assert reference.registry is not None
    scopes = (f"repository:{reference.path}:pull",)
    transfer = Transfer(out, "pull", interactive)
    async with new_session() as session:
        client = RegistryClient(session, reference.registry, credentials_for(reference.registry, environ), insecure)
        data, media_type, digest = await fetch_manifest(client, reference.path, reference.digest or reference.tag or "",
                                                        scopes)
        if media_type in INDEX_TYPES:
            digest = platform_manifest(_json(data, "index"))
            data, media_type, digest = await fetch_manifest(client, reference.path, digest, scopes)
            if media_type not in MANIFEST_TYPES:
                raise RegistryError(f"the index's {'/'.join(PLATFORM)} entry is not an image manifest")
        manifest = _json(data, "manifest")
        try:
            _, config_digest, config_size = parse_descriptor(manifest.get("config"), "config")
            config = _json(await fetch_blob_bytes(client, reference.path, config_digest, config_size, scopes,
                                                  "config"), "config")
            wanted = check_layers(manifest, config)
        except OciError as error:
            raise RegistryError(str(error)) from None
        transfer.note(f"Pulling {reference} ({digest[:19]}, {len(wanted)} layers)")
        try:
            layers = await each_layer(
                wanted, lambda layer: _ensure_layer(store, client, reference.path, scopes, layer, transfer),
                PARALLEL_LAYERS)
        finally:
            transfer.finish()
    try:
        record = record_from_config(config, tuple(layers), created_fallback)
    except OciError as error:
        raise RegistryError(str(error)) from None
    image_id = await asyncio.to_thread(store.save, record)
    local_name = await asyncio.to_thread(store.tag, name or reference.local_name(), image_id)
    await asyncio.to_thread(store.note_blob_sources, [layer.blob for layer in layers], reference.registry,
                            reference.path)
    transfer.note(f"Pulled {local_name} {image_id[:19]}")
    return Pulled(local_name, image_id, digest)
