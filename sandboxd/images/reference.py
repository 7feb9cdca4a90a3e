"""Image references, as Docker writes them: `[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]`.

A first component with a '.' or a ':', or `localhost`, names a registry; without one the
image is Docker Hub's (`debian:12` is `docker.io/library/debian:12`). Local names use the
same grammar: a pulled image is named by its full reference, so `image ls` says where it
came from and a FROM that names it finds it without asking the registry again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's API is served
DEFAULT_TAG = "latest"
MAX_NAME_CHARS = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?|\[[0-9A-Fa-f:]+\](?::[0-9]{{1,5}})?)"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
DIGEST = r"sha256:[0-9a-f]{64}"
# The whole grammar, for validation at the edge (specs, the API): the registry part is only
# taken as one when it looks like a host (checked again by split_reference).
REFERENCE_RE = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{DIGEST})?")
_HOST_RE = re.compile(_HOST)
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(_TAG)
DIGEST_RE = re.compile(DIGEST)


class ReferenceError(ValueError):
    """A reference does not follow the grammar; the message says which part."""


def names_registry(first_component: str) -> bool:
    return "." in first_component or ":" in first_component or first_component == "localhost" \
        or first_component.startswith("[")


@dataclass(frozen=True)
class Reference:
    registry: str | None  # "host[:port]" as written; None: not written (Docker Hub, or local)
    path: str  # "library/debian", "judge"
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.path}" if self.registry else self.path

    def local_name(self) -> str:
        """The canonical "name:tag" an image has in the store; one pulled by digest alone is
        tagged "sha256-<hex>", as cosign names what belongs to a digest."""
        tag = self.tag or (f"sha256-{self.digest[7:]}" if self.digest else DEFAULT_TAG)
        return f"{self.name}:{tag}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def split_reference(text: str) -> Reference:
    """Parse a reference; ReferenceError says what is wrong with it."""
    if len(text) > MAX_NAME_CHARS + 200 or not text:
        raise ReferenceError(f"invalid image reference {text[:80]!r}: empty or too long")
    rest, at, digest = text.partition("@")
    if at and not DIGEST_RE.fullmatch(digest):
        raise ReferenceError(f"invalid digest in {text!r}: only sha256:<64 hex digits> is supported")
    registry = None
    first, slash, remainder = rest.partition("/")
    if slash and names_registry(first):
        if not _HOST_RE.fullmatch(first):
            raise ReferenceError(f"invalid registry {first!r} in {text!r}")
        registry, rest = first, remainder
    path, colon, tag = rest.rpartition(":") if ":" in rest.rpartition("/")[2] else (rest, "", "")
    if not _PATH_RE.fullmatch(path) or len(path) > MAX_NAME_CHARS:
        raise ReferenceError(f"invalid image name {text!r}: lower-case letters, digits and '.', '_', '-' "
                             "between them, '/' between components")
    if colon and not _TAG_RE.fullmatch(tag):
        raise ReferenceError(f"invalid tag in {text!r}: letters, digits, '.', '_', '-' (up to 128)")
    return Reference(registry, path, tag or None, digest or None)


def remote_reference(text: str) -> Reference:
    """A reference to pull or push: Docker Hub's when no registry is written (`debian` is
    `docker.io/library/debian:latest`); the tag defaults to `latest` unless a digest is given."""
    reference = split_reference(text)
    registry = reference.registry or DOCKER_HUB
    path = reference.path
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    tag = reference.tag or (None if reference.digest else DEFAULT_TAG)
    return Reference(registry, path, tag, reference.digest)


def api_host(registry: str) -> str:
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry
