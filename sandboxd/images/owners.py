"""Who owns an unpacked layer's files: the owners its tar gives them, as containers see them.

Containers map their ids to the host's (sandboxd.runtime.user): inside 0 is the host user
running sandboxd (root, when root runs it), inside 1..65535 a subordinate range. A layer's
files are unpacked owned by the host ids the tar's ids map to, so a job (uid 1000 inside)
reads a file a layer gives to 1000 with mode 0600, as under Docker.

- root: the store chowns to the mapped host ids itself.
- subuid (rootless with an /etc/subuid range): the user cannot chown to subordinate ids, nor
  remove what they own, so a helper process (one per layer, or per removal) enters a user
  namespace of its own with the containers' id mapping (written by newuidmap and newgidmap,
  as for containers), and unpacks or removes there as that namespace's root.
  The layer's own root directory stays the user's (root's inside) whatever the tar says:
  the store renames it into place, and out again to remove it, which takes its owner.
- single (rootless without subordinate ids): containers see one id only, so every file stays
  the user's, as before owners were kept (jobs then run as that one id).

A tar id the mapping does not cover (65536 and above, or beyond a short /etc/subuid range)
is refused with a LayerError, as podman refuses an image that needs more ids than it has,
rather than quietly giving the file to nobody.

The store records which of these its layers were unpacked with (`record()`), and refuses to
mix layers of another (a store from before owners were kept has every file the user's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from sandboxd.images.layer import LayerError, LayerInfo, Owner, pack_layers, unpack_layer

if TYPE_CHECKING:
    from sandboxd.runtime.user import IdMapping

_CHUNK_BYTES = 1 << 20
_READY = b"R"
_GO = b"G"


def _translate(ranges, value: int, what: str) -> int:
    for inside, outside, count in ranges:
        if inside <= value < inside + count:
            return outside + value - inside
    covered = ", ".join(f"{inside}-{inside + count - 1}" if count > 1 else str(inside) for inside, _, count in ranges)
    raise LayerError(f"the layer gives a file to {what} {value}, which the containers' id mapping does not "
                     f"cover (inside {covered}); add subordinate ids in /etc/subuid and /etc/subgid")


def _owner(uid_ranges, gid_ranges) -> Owner:
    return lambda uid, gid: (_translate(uid_ranges, uid, "uid"), _translate(gid_ranges, gid, "gid"))


@dataclass(frozen=True)
class Ownership:
    scheme: str  # the containers' mapping scheme: "root", "subuid" or "single"
    mapping: IdMapping | None = None  # None for "single": every file is ours

    def record(self) -> dict:
        """What the store keeps in ownership.json, and compares on every write of layers."""
        if self.mapping is None or self.scheme == "single":
            return {"owners": "ours"}
        return {"owners": "mapped",
                "uid_ranges": [[r.inside, r.outside, r.count] for r in self.mapping.uid_ranges],
                "gid_ranges": [[r.inside, r.outside, r.count] for r in self.mapping.gid_ranges]}

    def unpack(self, stream: BinaryIO, destination: str) -> LayerInfo:
        """unpack_layer() into `destination` (an empty directory of ours), owners as above."""
        if self.mapping is None or self.scheme == "single":
            return unpack_layer(stream, destination, None)
        uid_ranges = [(r.inside, r.outside, r.count) for r in self.mapping.uid_ranges]
        gid_ranges = [(r.inside, r.outside, r.count) for r in self.mapping.gid_ranges]
        if self.scheme == "root":
            return unpack_layer(stream, destination, _owner(uid_ranges, gid_ranges))
        reply = _in_namespace(self.mapping, ["unpack", destination, json.dumps([uid_ranges, gid_ranges])], stream)
        return LayerInfo(reply["diff_id"], reply["size_bytes"], reply["entries"])

    def pack(self, sources: list[tuple[str, str]], out: BinaryIO, inside_ids: Owner) -> LayerInfo:
        """pack_layers() of a build step's writable layers: rootless with subordinate ids, in
        the helper, which reads what the step gave other ids (mode 0600, say) and sees its
        owners as the container did; else here, mapping host ids back with inside_ids."""
        if self.scheme != "subuid" or self.mapping is None:
            return pack_layers(sources, out, inside_ids)
        out.flush()
        reply = _in_namespace(self.mapping, ["pack", json.dumps(sources), str(out.fileno())], pass_fds=(out.fileno(),))
        out.seek(0, os.SEEK_END)
        return LayerInfo(reply["diff_id"], reply["size_bytes"], reply["entries"])

    def remove(self, path: str) -> None:
        """Remove what is left of a tree after the user removed what they could (rootless
        with subordinate ids: files of other ids than the user's)."""
        if self.scheme == "subuid" and self.mapping is not None and os.path.lexists(path):
            _in_namespace(self.mapping, ["remove", path])


def container_ownership() -> Ownership:
    """The ownership that matches the id mapping containers get from this user."""
    from sandboxd.runtime.user import choose_id_mapping

    mapping = choose_id_mapping(0, 0)
    return Ownership(mapping.scheme, None if mapping.scheme == "single" else mapping)


def _in_namespace(mapping: IdMapping, arguments: list[str], stream: BinaryIO | None = None,
                  pass_fds: tuple[int, ...] = ()) -> dict:
    """Run this module's helper with `arguments` in a user namespace of its own, mapped as
    containers are; `stream` (all of it) goes to its stdin. Returns its JSON reply; raises
    LayerError for a layer it refused, OSError for any other failure."""
    from sandboxd.runtime.user import write_id_maps

    helper = subprocess.Popen([sys.executable, "-m", "sandboxd.images.owners", *arguments],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              pass_fds=pass_fds)
    try:
        assert helper.stdin is not None and helper.stdout is not None
        if helper.stdout.read(1) == _READY:
            write_id_maps(helper.pid, mapping)
            try:
                helper.stdin.write(_GO)
                helper.stdin.flush()
                while stream is not None and (chunk := stream.read(_CHUNK_BYTES)):
                    helper.stdin.write(chunk)
            except BrokenPipeError:
                pass  # it stopped reading: a refused layer; its reply says why
        stdout, stderr = helper.communicate()
    except BaseException:
        helper.kill()
        helper.wait()
        raise
    try:
        reply = json.loads(stdout)
    except ValueError:
        reply = {}
    if helper.returncode != 0 or not isinstance(reply, dict):
        detail = stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"the image store's user namespace helper failed ({arguments[0]}, status "
                      f"{helper.returncode}): {detail[-1] if detail else 'no message'}")
    if "layer_error" in reply:
        raise LayerError(reply["layer_error"])
    if "error" in reply:
        raise OSError(reply["error"])
    return reply


def _helper(arguments: list[str]) -> int:
    """In the helper process: enter a user namespace, let the parent map it, then act as its
    root (its ids are the parent's, which the mapping makes 0; it holds every capability
    in it, over files of mapped ids only)."""
    import shutil

    from sandboxd.runtime.libc import CLONE_NEWUSER, unshare

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    unshare(CLONE_NEWUSER)
    stdout.write(_READY)
    stdout.flush()
    if stdin.read(1) != _GO:
        return 1
    reply: dict
    try:
        if arguments[0] == "unpack":
            destination, ranges = arguments[1], json.loads(arguments[2])
            identity = [[(inside, inside, count) for inside, _, count in kind] for kind in ranges]
            info = unpack_layer(stdin, destination, _owner(*identity))
            os.chown(destination, 0, 0)  # the user must be able to rename it into (and out of) layers/
            reply = {"diff_id": info.diff_id, "size_bytes": info.size_bytes, "entries": info.entries}
            while stdin.read(_CHUNK_BYTES):
                pass  # whatever follows the tar is the parent's to hash
        elif arguments[0] == "pack":
            with os.fdopen(int(arguments[2]), "wb") as out:  # inside, ids are the container's
                info = pack_layers([tuple(source) for source in json.loads(arguments[1])], out,
                                   lambda uid, gid: (uid, gid))
            reply = {"diff_id": info.diff_id, "size_bytes": info.size_bytes, "entries": info.entries}
        elif arguments[0] == "remove":
            shutil.rmtree(arguments[1])
            reply = {}
        else:
            return 2
    except LayerError as error:
        reply = {"layer_error": str(error)}
    except OSError as error:
        reply = {"error": str(error)}
    stdout.write(json.dumps(reply).encode())
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
