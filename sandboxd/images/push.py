"""Pushing a stored image to a registry.

Each layer blob is first looked for in the target repository (HEAD); one the store knows to be
in another repository of the same registry is mounted from there (no bytes move); any other
is uploaded, in one PUT up to `chunk_bytes`, in PATCH chunks of that size beyond. The config
follows, then the manifest, with its media type, under the tag. The manifest and blobs are
the bytes `image save` writes, so the image pulls back byte-identical, with the same id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Mapping, TextIO
from urllib.parse import quote, urljoin

from yarl import URL

from sandboxd.images.auth import credentials_for
from sandboxd.images.oci import OCI_MANIFEST, OciError, digest_of, image_documents
from sandboxd.images.progress import LayerProgress, Transfer
from sandboxd.images.reference import Reference
from sandboxd.images.registry import RegistryClient, RegistryError, each_layer, new_session
from sandboxd.images.store import ImageStore, LayerRef, parse_reference

DEFAULT_CHUNK_BYTES = 16 << 20
PARALLEL_LAYERS = 3
OCTET_STREAM = {"Content-Type": "application/octet-stream"}


class _Upload:
    """One blob upload session of a repository: its Location moves with each chunk."""

    def __init__(self, client: RegistryClient, scopes: tuple[str, ...], location: str) -> None:
        self.client, self.scopes, self.location = client, scopes, location

    def _url(self, digest: str | None = None) -> URL:
        location = urljoin(str(self.client.base), self.location)
        if digest:
            location += ("&" if "?" in location else "?") + "digest=" + quote(digest, safe="")
        return URL(location, encoded=True)

    def _moved(self, response) -> None:
        self.location = response.headers.get("Location") or self.location

    async def send_chunk(self, data: bytes, offset_bytes: int) -> None:
        headers = {**OCTET_STREAM, "Content-Range": f"{offset_bytes}-{offset_bytes + len(data) - 1}",
                   "Content-Length": str(len(data))}
        async with await self.client.request("PATCH", self._url(), scopes=self.scopes, headers=headers, data=data,
                                             expect=(202,)) as response:
            self._moved(response)

    async def finish(self, digest: str, data: bytes | None = None, file: Path | None = None,
                     size_bytes: int = 0) -> None:
        """PUT ?digest=, with the whole blob (monolithic) or none of it (after chunks)."""
        headers = {**OCTET_STREAM, "Content-Length": str(size_bytes if file else len(data or b""))}
        if file is not None:
            with open(file, "rb") as stream:  # aiohttp reads a file body in its executor
                async with await self.client.request("PUT", self._url(digest), scopes=self.scopes, headers=headers,
                                                     data=stream, expect=(201,)) as response:
                    said = response.headers.get("Docker-Content-Digest")
        else:
            async with await self.client.request("PUT", self._url(digest), scopes=self.scopes, headers=headers,
                                                 data=data or b"", expect=(201,)) as response:
                said = response.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise RegistryError(f"the registry stored {said} for the blob {digest}")


async def _blob_exists(client: RegistryClient, path: str, digest: str, scopes: tuple[str, ...]) -> bool:
    async with await client.request("HEAD", f"/v2/{path}/blobs/{digest}", scopes=scopes,
                                    expect=(200, 404)) as response:
        return response.status == 200


async def _start_upload(client: RegistryClient, path: str, scopes: tuple[str, ...],
                        mount: tuple[str, str] | None = None) -> _Upload | None:
    """A new upload session; None when `mount` (digest, from repository) mounted the blob."""
    url = f"/v2/{path}/blobs/uploads/"
    if mount:
        url += f"?mount={quote(mount[0], safe='')}&from={quote(mount[1], safe='/')}"
    async with await client.request("POST", url, scopes=scopes, expect=(201, 202)) as response:
        if response.status == 201:
            return None
        location = response.headers.get("Location")
    if not location:
        raise RegistryError(f"the registry started an upload in {path} without a Location")
    return _Upload(client, scopes, location)


async def _push_layer(store: ImageStore, client: RegistryClient, path: str, layer: LayerRef,
                      chunk_bytes: int, progress: LayerProgress) -> None:
    scopes = (f"repository:{path}:pull,push",)
    if await _blob_exists(client, path, layer.blob, scopes):
        progress.done(f"already in {path}")
        return
    upload = None
    for source in store.blob_sources(layer.blob, client.registry):
        if source == path:
            continue
        mount_scopes = scopes + (f"repository:{source}:pull",)
        upload = await _start_upload(client, path, mount_scopes, (layer.blob, source))
        if upload is None:
            progress.done(f"mounted from {source}")
            return
        break  # the registry did not have it there after all: it opened an upload instead
    upload = upload or await _start_upload(client, path, scopes)
    blob = store.blob_path(layer.blob)
    size_bytes = blob.stat().st_size
    progress.start()
    if size_bytes <= chunk_bytes:
        await upload.finish(layer.blob, file=blob, size_bytes=size_bytes)
    else:
        with open(blob, "rb") as file:
            offset_bytes = 0
            while chunk := await asyncio.to_thread(file.read, chunk_bytes):
                await upload.send_chunk(chunk, offset_bytes)
                offset_bytes += len(chunk)
                progress.advance(len(chunk))
        await upload.finish(layer.blob)
    progress.done()


async def push_image(store: ImageStore, local_name: str, reference: Reference, out: TextIO, *,
                     insecure: bool = False, environ: Mapping[str, str] | None = None,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES, interactive: bool | None = None) -> str:
    """Push the stored image `local_name` as `reference` (a remote_reference() with a tag);
    returns the manifest's digest."""
    assert reference.registry is not None
    if reference.digest or not reference.tag:
        raise RegistryError(f"push to a tag, not a digest: {reference}")
    if chunk_bytes < 1:
        raise RegistryError("the upload chunk size must be at least one byte")
    name = parse_reference(local_name)
    _, record = await asyncio.to_thread(store.resolve, name)
    try:
        documents = image_documents(record, name)
    except OciError as error:
        raise RegistryError(str(error)) from None
    path = reference.path
    scopes = (f"repository:{path}:pull,push",)
    transfer = Transfer(out, "push", interactive)
    transfer.note(f"Pushing {name} to {reference} ({len(record.layers)} layers)")
    async with new_session() as session:
        client = RegistryClient(session, reference.registry, credentials_for(reference.registry, environ), insecure)
        await client.ping()
        try:
            await each_layer(record.layers, lambda layer: _push_layer(
                store, client, path, layer, chunk_bytes, transfer.layer(layer.blob, layer.blob_size_bytes)),
                PARALLEL_LAYERS)
        finally:
            transfer.finish()
        config_digest = digest_of(documents.config)
        if not await _blob_exists(client, path, config_digest, scopes):
            upload = await _start_upload(client, path, scopes)
            assert upload is not None
            await upload.finish(config_digest, data=documents.config)
        async with await client.request("PUT", f"/v2/{path}/manifests/{quote(reference.tag, safe='')}",
                                        scopes=scopes, headers={"Content-Type": OCI_MANIFEST},
                                        data=documents.manifest, expect=(201,)) as response:
            said = response.headers.get("Docker-Content-Digest")
    if said and said != documents.manifest_digest:
        raise RegistryError(f"the registry stored the manifest as {said}, not {documents.manifest_digest}")
    await asyncio.to_thread(store.note_blob_sources, [layer.blob for layer in record.layers], reference.registry,
                            path)
    transfer.note(f"Pushed {reference}@{documents.manifest_digest}")
    return documents.manifest_digest

