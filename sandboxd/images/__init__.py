"""Images: what a container's root filesystem is made of (read-only lower dirs + metadata).

The runtime only sees `Image`: a list of OverlayFS mounts, each a stack of read-only host
directories, plus the defaults a job starts with. The built-in `host` image and built,
layered images both resolve to this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pathlib is not imported by the zygote, which needs ImageMount
    from pathlib import Path


class UnknownImageError(LookupError):
    """No image of that name exists."""


@dataclass(frozen=True)
class ImageMount:
    target: str  # absolute path in the container: "/" first, then e.g. "/usr"
    lowerdirs: tuple[str, ...]  # host directories, topmost layer first (overlay's order)


@dataclass(frozen=True)
class Image:
    name: str
    mounts: tuple[ImageMount, ...]
    env: tuple[tuple[str, str], ...] = (
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("HOME", "/work"),
        ("LANG", "C.UTF-8"),
    )
    uid: int = 1000  # the job's uid and gid inside the container
    gid: int = 1000


def available_images(state_dir: Path) -> list[dict[str, str]]:
    """The images jobs may name, for listings and validation at the edge."""
    return [{"name": "host", "description": "the host's /usr, read-only, with a minimal generated /etc"}]


def resolve_image(name: str, state_dir: Path) -> Image:
    if name == "host":
        from sandboxd.images.host import host_image

        return host_image(state_dir)
    raise UnknownImageError(f"unknown image {name!r} (available: host)")
