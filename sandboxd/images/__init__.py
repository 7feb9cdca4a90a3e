"""Images: what a container's root filesystem is made of (read-only lower dirs + metadata).

The runtime only sees `Image`: a list of OverlayFS mounts, each a stack of read-only host
directories, plus the defaults a job starts with. The built-in `host` image and built,
layered images both resolve to this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


BUILD_STEP_PREFIX = "@build/"  # + an image id: a build step's view, its own USER kept
# OverlayFS stacks at most 500 lower dirs in one mount; a base (host) adds a few of its own.
MAX_IMAGE_LAYERS = 490


def available_images(state_dir: Path) -> list[dict[str, Any]]:
    """The images jobs may name, for listings and validation at the edge."""
    from sandboxd.images.store import ImageStore

    images = [{"name": "host", "description": "the host's /usr, read-only, with a minimal generated /etc"}]
    for name, image_id, record in ImageStore(state_dir).list_images():
        images.append({"name": name, "id": image_id, "base": record.base, "created": record.created,
                       "layers": len(record.layers), "size_bytes": sum(layer.size_bytes for layer in record.layers)})
    return images


def resolve_image(name: str, state_dir: Path) -> Image:
    if name == "host":
        from sandboxd.images.host import host_image

        return host_image(state_dir)
    from sandboxd.images.store import ImageStore, ImageStoreError, runtime_image

    store = ImageStore(state_dir)
    try:
        if name.startswith(BUILD_STEP_PREFIX):
            image_id = name[len(BUILD_STEP_PREFIX):]
            return runtime_image(name, store.record(image_id), store, state_dir, build_step=True)
        _, record = store.resolve(name)
    except ImageStoreError as error:
        raise UnknownImageError(f"unknown image {name!r}: {error}") from None
    return runtime_image(name, record, store, state_dir)
