"""Building an image from a spec: FROM gives the first state; each step gives the next.

COPY and RUN make layers; ENV, WORKDIR, LABEL and USER change only the image's config. A
layer is cached under a key made of its parent's key, the instruction and the digests of its
inputs (for COPY, every name, mode and content it copies), so an unchanged rebuild makes no
layer, and a changed COPY input rebuilds from that step on.

COPY reads the build context without ever following a symlink: each path is reached from the
context's directory fd one component at a time with O_NOFOLLOW; symlinks inside the copied
tree are copied as symlinks. RUN runs in a build container of our own runtime over the image
so far, as the image's USER (root by default: these are the operator's builds, not tenants'
jobs), with no network unless the step says `--network=default`, under BUILD_LIMITS; its
writable layer is kept in a host directory and packed into the step's layer, never followed
through a symlink. Its output is printed after it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

from sandboxd.images import BUILD_STEP_PREFIX, MAX_IMAGE_LAYERS, resolve_image
from sandboxd.images.auth import CredentialsError
from sandboxd.images.layer import LayerError, pack_layer
from sandboxd.images.spec import Copy, Env, Instruction, Label, Run, Spec, User, Workdir
from sandboxd.images.reference import ReferenceError, remote_reference
from sandboxd.images.registry import RegistryError
from sandboxd.images.store import ImageRecord, ImageStore, ImageStoreError, LayerRef
from sandboxd.units import human_bytes

if TYPE_CHECKING:
    from sandboxd.runtime.launch import Runtime

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OUTPUT_TAIL_BYTES = 4000


class BuildError(RuntimeError):
    """A step failed; the message names the spec's file and line."""


def build_limits():
    """What one RUN step may use: a compiler toolchain's install, not a job's few seconds."""
    from sandboxd.limits import default_limit_policy

    return dataclasses.replace(
        default_limit_policy().defaults, cpu_time_s=600.0, wall_time_s=1800.0, memory_bytes=2 << 30,
        pids=512, cpus=float(os.cpu_count() or 1), output_bytes=1 << 20, file_size_bytes=4 << 30,
        open_files=4096,
    )


@dataclass
class _State:
    record: ImageRecord
    key: str  # the cache key of the state: its parent chain and every instruction so far


def _key(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _base_state(spec: Spec, store: ImageStore, spec_name: str, out: TextIO) -> _State:
    image = spec.base.image
    now = utc_now()
    if image in ("scratch", "host"):
        # Over host, jobs run as its sandbox user and /work is theirs; steps run as root.
        return _State(ImageRecord(base=image, layers=(), workdir="/", created=now), _key("base", image))
    try:
        image_id, record = _from_image(image, store, out, now)
    except (ImageStoreError, ReferenceError, RegistryError, CredentialsError) as error:
        raise BuildError(f"{spec_name}:{spec.base.line}: FROM {image}: {error}") from None
    return _State(dataclasses.replace(record, created=now), _key("image", image_id))


def _from_image(image: str, store: ImageStore, out: TextIO, now: str) -> tuple[str, ImageRecord]:
    """A local image of that name; else the registry's, pulled unless it was pulled before."""
    if "@" not in image:
        try:
            return store.resolve(image)
        except ImageStoreError:
            pass
    remote = remote_reference(image)
    try:
        return store.resolve(remote.local_name())
    except ImageStoreError:
        pass
    from sandboxd.images.pull import pull_image

    pulled = asyncio.run(pull_image(store, remote, out, created_fallback=now))
    return pulled.image_id, store.record(pulled.image_id)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- COPY ------------------------------------------------------------------------------------

def _open_beneath(root_fd: int, relative: str) -> tuple[int, str]:
    """(the fd of the parent directory, the last name) of a context path, every directory
    on the way opened with O_NOFOLLOW: a symlink in the path is refused, never followed."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if not parts:
        return os.dup(root_fd), "."
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError:
        os.close(fd)
        raise
    return fd, parts[-1]


def _context_entries(context_fd: int, source: str) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """(path relative to the source, lstat, parent fd, name) of a source and everything under
    it, sorted; "" is the source itself."""
    parent_fd, name = _open_beneath(context_fd, source)
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        yield "", st, parent_fd, name
        if stat.S_ISDIR(st.st_mode):
            dir_fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                yield from _walk(dir_fd, "")
            finally:
                os.close(dir_fd)
    finally:
        os.close(parent_fd)


def _walk(dir_fd: int, prefix: str) -> Iterator[tuple[str, os.stat_result, int, str]]:
    for name in sorted(os.listdir(dir_fd)):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        yield prefix + name, st, dir_fd, name
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield from _walk(child, prefix + name + "/")
            finally:
                os.close(child)


def _copy_plan(step: Copy, context_fd: int, spec_name: str) -> list[tuple[str, str, int]]:
    """(source path in the context, destination in the image, source kind) per source."""
    planned = []
    for source in step.sources:
        try:
            parent_fd, name = _open_beneath(context_fd, source)
        except OSError as error:
            raise BuildError(f"{spec_name}:{step.line}: COPY {source!r}: {error.strerror} "
                             "(a path through a symlink is not followed)") from None
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise BuildError(f"{spec_name}:{step.line}: COPY {source!r}: no such file in the build context") from None
        finally:
            os.close(parent_fd)
        if step.destination.endswith("/") and not stat.S_ISDIR(st.st_mode):
            destination = step.destination + source.rstrip("/").rsplit("/", 1)[-1]
        else:
            destination = step.destination.rstrip("/") or "/"
        planned.append((source, destination, stat.S_IFMT(st.st_mode)))
    return planned


def _copy_digest(step: Copy, context_fd: int, planned: list[tuple[str, str, int]]) -> str:
    digest = hashlib.sha256(repr((step.chown, step.chmod)).encode())
    for source, destination, _ in planned:
        digest.update(f"\0{source}\0{destination}\0".encode())
        for relative, st, parent_fd, name in _context_entries(context_fd, source):
            digest.update(f"{relative}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode)}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(name, dir_fd=parent_fd).encode(errors="surrogateescape"))
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, _READ_FLAGS, dir_fd=parent_fd)
                with os.fdopen(fd, "rb") as content:
                    while chunk := content.read(1 << 20):
                        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _stage_copy(step: Copy, context_fd: int, planned: list[tuple[str, str, int]], stage: Path) -> None:
    """Lay the copied files out under `stage` as they will be in the image."""
    for source, destination, _ in planned:
        target = stage / destination.lstrip("/")
        for relative, st, parent_fd, name in _context_entries(context_fd, source):
            path = target / relative if relative else target
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            mode = step.chmod if step.chmod is not None else stat.S_IMODE(st.st_mode) & 0o1777
            if stat.S_ISDIR(st.st_mode):
                path.mkdir(mode=0o700, exist_ok=True)
                os.chmod(path, mode if step.chmod is None else step.chmod | 0o100)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=parent_fd), path)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, _READ_FLAGS, dir_fd=parent_fd)
                with os.fdopen(fd, "rb") as content, open(path, "xb") as out:
                    while chunk := content.read(1 << 20):
                        out.write(chunk)
                os.chmod(path, mode)
            else:
                continue  # sockets, fifos, devices of the context are not copied
            os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_layer(step: Copy, planned, context_fd: int, store: ImageStore) -> LayerRef:
    owner = step.chown or (0, 0)
    with store.work_dir() as work:
        stage = work / "stage"
        stage.mkdir(mode=0o755)
        _stage_copy(step, context_fd, planned, stage)
        with open(work / "layer.tar", "w+b") as tar:
            pack_layer(str(stage), tar, lambda uid, gid: owner)
            tar.seek(0)
            return store.add_layer(tar)


# --- RUN -------------------------------------------------------------------------------------

def _inside_ids(state_dir: Path):
    """Host ids back to the container's, through the id mapping containers use."""
    from sandboxd.runtime.user import choose_id_mapping

    mapping = choose_id_mapping(0, 0)

    def back(ranges, host_id: int) -> int:
        for id_range in ranges:
            if id_range.outside <= host_id < id_range.outside + id_range.count:
                return id_range.inside + host_id - id_range.outside
        return 65534

    return lambda uid, gid: (back(mapping.uid_ranges, uid), back(mapping.gid_ranges, gid))


def _run_layer(step: Run, state: _State, store: ImageStore, state_dir: Path, runtime: Runtime,
               spec_name: str, out: TextIO) -> LayerRef:
    from sandboxd.job import JobSpec

    image_id = store.save(state.record)
    step_image = BUILD_STEP_PREFIX + image_id
    mounts = resolve_image(step_image, state_dir).mounts
    with store.work_dir() as work:
        upper = work / "upper"
        upper.mkdir(mode=0o700)
        result = runtime.run(JobSpec(argv=step.argv, limits=build_limits(), image=step_image,
                                     workdir=state.record.workdir, upper_dir=str(upper), network=step.network))
        for stream in (result.stdout, result.stderr):
            if stream:
                out.write(stream.decode(errors="replace"))
                out.write("" if stream.endswith(b"\n") else "\n")
        if result.status != "ok":
            detail = f"exit code {result.exit_code}" if result.exit_code is not None else result.status
            raise BuildError(f"{spec_name}:{step.line}: RUN failed ({detail})"
                             + (f": {result.message}" if result.message else ""))
        sources = []
        for index, mount in enumerate(mounts):
            layer_dir = upper / f"upper{index}"
            if layer_dir.is_dir():
                prefix = mount.target.strip("/")
                sources.append((prefix + "/" if prefix else "", str(layer_dir)))
        with open(work / "layer.tar", "w+b") as tar:
            store.ownership.pack(sources, tar, _inside_ids(state_dir))
            tar.seek(0)
            return store.add_layer(tar)


# --- the build -------------------------------------------------------------------------------

def build_image(spec: Spec, spec_name: str, context: Path, reference: str, state_dir: Path,
                out: TextIO = sys.stdout) -> tuple[str, str]:
    """Build `spec` with `context` as its build context and name the result; prints a line
    per step. Returns (name:tag, image id)."""
    from sandboxd.images.store import parse_reference

    started = time.monotonic()
    name = parse_reference(reference)
    store = ImageStore(state_dir)
    store.remove_stale_tmp()
    context_fd = os.open(context, _DIR_FLAGS)
    runtime: Runtime | None = None
    steps: list[Instruction] = [spec.base, *spec.steps]
    try:
        out.write(f"Step 1/{len(steps)} : {spec.base.text}\n")
        state = _base_state(spec, store, spec_name, out)
        for number, step in enumerate(spec.steps, 2):
            out.write(f"Step {number}/{len(steps)} : {step.text}\n")
            out.flush()
            step_started = time.monotonic()
            record = state.record
            if isinstance(step, (Copy, Run)):
                if len(record.layers) >= MAX_IMAGE_LAYERS:
                    raise BuildError(f"{spec_name}:{step.line}: this step would make layer {len(record.layers) + 1}: "
                                     f"containers stack at most {MAX_IMAGE_LAYERS}; merge steps")
                if isinstance(step, Copy):
                    planned = _copy_plan(step, context_fd, spec_name)
                    key = _key(state.key, step.keyword, repr(step.sources), step.destination,
                               _copy_digest(step, context_fd, planned))
                else:
                    key = _key(state.key, step.keyword, json.dumps(step.argv), str(step.network),
                               repr((record.env, record.workdir, record.uid, record.gid)))
                layer = store.cached_layer(key)
                if layer is not None:
                    out.write(f" ---> cached {layer.diff_id[:19]}\n")
                else:
                    if isinstance(step, Copy):
                        layer = _copy_layer(step, planned, context_fd, store)
                    else:
                        if runtime is None:
                            from sandboxd.runtime.launch import Runtime

                            runtime = Runtime(state_dir=state_dir)
                        layer = _run_layer(step, state, store, state_dir, runtime, spec_name, out)
                    store.cache_layer(key, layer)
                    out.write(f" ---> layer {layer.diff_id[:19]} {human_bytes(layer.size_bytes)} "
                              f"({time.monotonic() - step_started:.2f} s)\n")
                state = _State(dataclasses.replace(record, layers=record.layers + (layer,)), key)
                continue
            if isinstance(step, Env):
                env = dict(record.env)
                env.update(step.pairs)
                record = dataclasses.replace(record, env=tuple(env.items()))
            elif isinstance(step, Workdir):
                record = dataclasses.replace(record, workdir=step.path)
            elif isinstance(step, Label):
                labels = dict(record.labels)
                labels.update(step.pairs)
                record = dataclasses.replace(record, labels=tuple(labels.items()))
            elif isinstance(step, User):
                record = dataclasses.replace(record, uid=step.uid, gid=step.gid)
            state = _State(record, _key(state.key, step.text))
        image_id = store.save(state.record)
        store.tag(name, image_id)
    except (LayerError, ImageStoreError) as error:
        raise BuildError(f"{spec_name}: {error}") from None
    finally:
        os.close(context_fd)
        if runtime is not None:
            runtime.close()
    size = sum(layer.size_bytes for layer in state.record.layers)
    out.write(f"Built {name} {image_id[:19]} ({len(state.record.layers)} layers, {human_bytes(size)}) "
              f"in {time.monotonic() - started:.1f} s\n")
    return name, image_id


def read_spec(path: Path) -> tuple[Spec, str]:
    """Parse a spec file; SpecError names the file and line."""
    from sandboxd.images.spec import MAX_SPEC_BYTES, parse_spec

    with open(path, "rb") as file:
        data = file.read(MAX_SPEC_BYTES + 1)  # one byte more: the parser says it is too big
    return parse_spec(data.decode("utf-8", errors="replace"), str(path)), str(path)
