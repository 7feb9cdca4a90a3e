"""Push and pull against Debian's real registry (distribution 2.8) on loopback, open and behind
basic and token auth; skopeo, an independent client, reads what we push and writes what we
pull; and what a broken or hostile registry sends is refused, leaving the store consistent."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from conftest import job, run_once
from registryd import Registry, start_registry
from sandboxd.images import MAX_IMAGE_LAYERS
from sandboxd.images.build import build_image
from sandboxd.images.oci import OCI_INDEX, save_image
from sandboxd.images.pull import pull_image
from sandboxd.images.push import push_image
from sandboxd.images.reference import remote_reference
from sandboxd.images.registry import RegistryError
from sandboxd.images.spec import parse_spec
from sandboxd.images.store import ImageStore

REPO = Path(__file__).resolve().parents[2]
SPEC = """FROM scratch
COPY busybox /bin/busybox
COPY hello.txt /srv/hello.txt
ENV GREETING=hi
WORKDIR /srv
"""
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _state(tmp_path: Path, name: str) -> Path:
    state = tmp_path / name
    state.mkdir(mode=0o711)
    return state


@pytest.fixture
def built(tmp_path):
    """A small image FROM scratch (a static busybox, a text file) in a store of its own."""
    context = tmp_path / "context"
    context.mkdir()
    shutil.copyfile("/usr/bin/busybox", context / "busybox")
    os.chmod(context / "busybox", 0o755)
    (context / "hello.txt").write_text("hello from a layer\n")
    state = _state(tmp_path, "built")
    build_image(parse_spec(SPEC, "Imagefile"), "Imagefile", context, "app:1", state, io.StringIO())
    return state


def _push(state: Path, name: str, reference: str, environ=None, **kwargs) -> tuple[str, list[str]]:
    out = io.StringIO()
    digest = asyncio.run(push_image(ImageStore(state), name, remote_reference(reference), out,
                                    environ=environ or {}, **kwargs))
    return digest, out.getvalue().splitlines()


def _pull(state: Path, reference: str, environ=None, **kwargs):
    out = io.StringIO()
    pulled = asyncio.run(pull_image(ImageStore(state), remote_reference(reference), out, environ=environ or {},
                                    **kwargs))
    return pulled, out.getvalue().splitlines()


def _store_files(state: Path) -> dict[str, bytes]:
    root = state / "images"
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and path.parts[-2] in ("sha256", "records")}


def _creds(registry: Registry) -> dict[str, str]:
    return {"SANDBOXD_REGISTRY_USERNAME": registry.username or "", "SANDBOXD_REGISTRY_PASSWORD": registry.password or ""}


# --- round trips against the real registry ---------------------------------------------------

def test_a_pushed_image_pulls_back_byte_identical_and_runs(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        # A chunk smaller than busybox: its blob goes up in PATCH chunks, the others in one PUT.
        digest, lines = _push(built, "app:1", f"{registry.host}/team/app:1", chunk_bytes=256 << 10)
        assert lines[-1] == f"Pushed {registry.host}/team/app:1@{digest}"
        pulled_state = _state(tmp_path, "pulled")
        pulled, lines = _pull(pulled_state, f"{registry.host}/team/app:1")
    local_id, _ = ImageStore(built).resolve("app:1")
    assert (pulled.name, pulled.image_id, pulled.manifest_digest) == (f"{registry.host}/team/app:1", local_id, digest)
    assert _store_files(pulled_state) == {path: data for path, data in _store_files(built).items()
                                          if path in _store_files(pulled_state)}
    assert len([line for line in lines if ": pulled " in line]) == 2
    result = run_once(pulled_state, job(["/bin/busybox", "sh", "-c", "cat /srv/hello.txt; echo $GREETING"],
                                        image=pulled.name))
    assert (result.status, result.stdout) == ("ok", b"hello from a layer\nhi\n")
    assert ImageStore(pulled_state).resolve(pulled.name)[1].workdir == "/srv"


def test_push_skips_blobs_already_there_and_mounts_from_another_repository(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        _, lines = _push(built, "app:1", f"{registry.host}/team/copy:1")
        assert sum("mounted from team/app" in line for line in lines) == 2
        _, lines = _push(built, "app:1", f"{registry.host}/team/copy:2")
        assert sum("already in team/copy" in line for line in lines) == 2
        pulled, _ = _pull(_state(tmp_path, "pulled"), f"{registry.host}/team/copy:2")
    assert pulled.image_id == ImageStore(built).resolve("app:1")[0]


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_push_and_pull_with_credentials_and_refusal_without(tmp_path, built, auth):
    with start_registry(tmp_path / "registry", auth=auth) as registry:
        reference = f"{registry.host}/team/app:1"
        with pytest.raises(RegistryError, match="user name and password|refused anonymous|answered 401"):
            _push(built, "app:1", reference)
        wrong = {**_creds(registry), "SANDBOXD_REGISTRY_PASSWORD": "wrong"}
        with pytest.raises(RegistryError, match="refused the credentials"):
            _push(built, "app:1", reference, environ=wrong)
        _push(built, "app:1", reference, environ=_creds(registry))
        # The credentials, this time, from an auth file in the format Docker and skopeo write.
        auth_file = tmp_path / "auth.json"
        token = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
        auth_file.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        pulled, _ = _pull(_state(tmp_path, "pulled"), reference, environ={"SANDBOXD_AUTH_FILE": str(auth_file)})
    assert pulled.image_id == ImageStore(built).resolve("app:1")[0]


def test_an_index_gives_the_linux_amd64_image(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        amd64_digest, _ = _push(built, "app:1", f"{registry.host}/team/app:amd64")
        other = _state(tmp_path, "other")
        build_image(parse_spec("FROM scratch\nCOPY hello.txt /other\n", "Imagefile"), "Imagefile",
                    tmp_path / "context", "other:1", other, io.StringIO())
        arm64_digest, _ = _push(other, "other:1", f"{registry.host}/team/app:arm64")

        def entry(digest: str, architecture: str) -> dict:
            size = len(_get(registry, f"/v2/team/app/manifests/{digest}"))
            return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                    "platform": {"os": "linux", "architecture": architecture}}

        _put_manifest(registry, "team/app", "multi", OCI_INDEX,
                      {"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": [entry(arm64_digest, "arm64"), entry(amd64_digest, "amd64")]})
        _put_manifest(registry, "team/app", "armonly", OCI_INDEX,
                      {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry(arm64_digest, "arm64")]})
        state = _state(tmp_path, "pulled")
        pulled, _ = _pull(state, f"{registry.host}/team/app:multi")
        with pytest.raises(RegistryError, match="no linux/amd64 image .*linux/arm64"):
            _pull(state, f"{registry.host}/team/app:armonly")
    assert (pulled.image_id, pulled.manifest_digest) == (ImageStore(built).resolve("app:1")[0], amd64_digest)


def _get(registry: Registry, path: str) -> bytes:
    request = urllib.request.Request(registry.url + path, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"})
    with _opener.open(request) as response:
        return response.read()


def _put_manifest(registry: Registry, path: str, tag: str, media_type: str, document: dict) -> None:
    request = urllib.request.Request(f"{registry.url}/v2/{path}/manifests/{tag}", method="PUT",
                                     data=json.dumps(document).encode(), headers={"Content-Type": media_type})
    with _opener.open(request) as response:
        assert response.status == 201


def test_a_spec_builds_from_a_registry_image_pulled_once(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        state = _state(tmp_path, "derived")
        spec = parse_spec(f"FROM {registry.host}/team/app:1\nRUN [\"/bin/busybox\", \"rm\", \"/srv/hello.txt\"]\n",
                          "Imagefile")
        out = io.StringIO()
        build_image(spec, "Imagefile", tmp_path, "derived:1", state, out)
        assert f"Pulled {registry.host}/team/app:1" in out.getvalue()
        out = io.StringIO()
        build_image(spec, "Imagefile", tmp_path, "derived:1", state, out)
        assert "Pulling" not in out.getvalue() and " ---> cached" in out.getvalue()
    result = run_once(state, job(["/bin/busybox", "ls", "/srv"], image="derived:1"))
    assert (result.status, result.stdout) == ("ok", b"")


def test_an_image_built_over_the_host_is_refused_for_push(tmp_path):
    state = _state(tmp_path, "state")
    build_image(parse_spec("FROM host\nENV A=1\n", "Imagefile"), "Imagefile", tmp_path, "onhost:1", state,
                io.StringIO())
    with start_registry(tmp_path / "registry") as registry:
        with pytest.raises(RegistryError, match="FROM host.*cannot leave"):
            _push(state, "onhost:1", f"{registry.host}/x:1")


# --- skopeo, an independent client, both ways ------------------------------------------------

def test_skopeo_reads_what_we_push(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        digest, _ = _push(built, "app:1", f"{registry.host}/team/app:1")
        source = f"docker://{registry.host}/team/app:1"
        inspected = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", source], check=True,
                                              capture_output=True).stdout)
        subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false", source, f"oci:{tmp_path / 'oci'}:app"],
                       check=True, capture_output=True)
    _, record = ImageStore(built).resolve("app:1")
    assert inspected["Digest"] == digest
    assert inspected["Layers"] == [layer.blob for layer in record.layers]
    assert "GREETING=hi" in inspected["Env"]
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest


def test_we_pull_and_run_what_skopeo_pushes_gzip_compressed_with_docker_media_types(tmp_path, built):
    layout = tmp_path / "layout"
    save_image(ImageStore(built), "app:1", tmp_path / "app.tar")
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "app.tar"), "-C", str(layout)], check=True)
    # skopeo compresses each layer itself and writes a Docker schema 2 manifest and config.
    subprocess.run(["skopeo", "copy", "-q", "--dest-compress", f"oci:{layout}:app:1", f"dir:{tmp_path / 'gz'}"],
                   check=True, capture_output=True)
    with start_registry(tmp_path / "registry") as registry:
        subprocess.run(["skopeo", "copy", "-q", "--format", "v2s2", "--dest-tls-verify=false",
                        f"dir:{tmp_path / 'gz'}", f"docker://{registry.host}/skopeo/app:1"],
                       check=True, capture_output=True)
        manifest = json.loads(_get_docker_manifest(registry, "/v2/skopeo/app/manifests/1"))
        state = _state(tmp_path, "pulled")
        pulled, _ = _pull(state, f"{registry.host}/skopeo/app:1")
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    _, record = ImageStore(state).resolve(pulled.name)
    assert [layer.blob for layer in record.layers] == [layer["digest"] for layer in manifest["layers"]]
    result = run_once(state, job(["/bin/busybox", "cat", "/srv/hello.txt"], image=pulled.name))
    assert (result.status, result.stdout) == ("ok", b"hello from a layer\n")


def _get_docker_manifest(registry: Registry, path: str) -> bytes:
    request = urllib.request.Request(registry.url + path, headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with _opener.open(request) as response:
        return response.read()


# --- what goes wrong ---------------------------------------------------------------------------

def _nothing_named_nor_half_written(state: Path) -> None:
    store = ImageStore(state)
    assert store.list_images() == []
    assert not (state / "images" / "tmp").exists() or list((state / "images" / "tmp").iterdir()) == []


def test_a_blob_with_a_wrong_digest_is_refused_and_nothing_is_named(tmp_path, built):
    _, record = ImageStore(built).resolve("app:1")
    big = max(record.layers, key=lambda layer: layer.blob_size_bytes)
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        data = bytearray(registry.blob_path(big.blob).read_bytes())
        data[len(data) // 2] ^= 0xFF
        registry.blob_path(big.blob).write_bytes(bytes(data))
        state = _state(tmp_path, "pulled")
        with pytest.raises(RegistryError, match=f"blob {big.blob} arrived with digest"):
            _pull(state, f"{registry.host}/team/app:1")
    _nothing_named_nor_half_written(state)
    assert not (state / "images" / "downloads" / big.blob[7:]).exists()


def test_a_blob_cut_short_is_kept_and_the_next_pull_completes_the_image(tmp_path, built):
    _, record = ImageStore(built).resolve("app:1")
    big = max(record.layers, key=lambda layer: layer.blob_size_bytes)
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        whole = registry.blob_path(big.blob).read_bytes()
        registry.blob_path(big.blob).write_bytes(whole[:len(whole) // 3])  # the registry serves a third
        state = _state(tmp_path, "pulled")
        with pytest.raises(RegistryError, match=f"ended at {len(whole) // 3} of {len(whole)} bytes"):
            _pull(state, f"{registry.host}/team/app:1")
        _nothing_named_nor_half_written(state)
        assert (state / "images" / "downloads" / big.blob[7:]).stat().st_size == len(whole) // 3
        # Restored; the registry remembers the blob's size as it stat'ed it and refuses the
        # rest (416): the pull starts that blob over.
        registry.blob_path(big.blob).write_bytes(whole)
        pulled, _ = _pull(state, f"{registry.host}/team/app:1")
    assert pulled.image_id == ImageStore(built).resolve("app:1")[0]
    assert list((state / "images" / "downloads").iterdir()) == []


def test_a_download_cut_mid_body_resumes_where_it_stopped(tmp_path, hostile):
    state = _state(tmp_path, "pulled")
    with pytest.raises(RegistryError, match="cut short at 5120 of 10240 bytes"):
        _pull(state, f"{hostile}/flaky/app:1")
    _nothing_named_nor_half_written(state)
    pulled, lines = _pull(state, f"{hostile}/flaky/app:1")
    assert any("resuming at 5.1 kB" in line for line in lines), lines
    _, record = ImageStore(state).resolve(pulled.name)
    assert (ImageStore(state).layer_dir(record.layers[0].diff_id) / "srv" / "hello.txt").read_bytes() == \
        b"hello from a layer\n"


def test_an_unknown_tag_gives_the_registry_s_own_error(tmp_path):
    with start_registry(tmp_path / "registry") as registry:
        with pytest.raises(RegistryError, match="answered 404.*MANIFEST_UNKNOWN"):
            _pull(_state(tmp_path, "pulled"), f"{registry.host}/team/none:1")


def test_two_pulls_of_one_image_at_once_both_succeed(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        state = _state(tmp_path, "pulled")
        argv = [sys.executable, "-m", "sandboxd", "image", "pull", "--state-dir", str(state),
                f"{registry.host}/team/app:1"]
        pulls = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        outputs = [pull.communicate(timeout=60)[0].decode() for pull in pulls]
    assert [pull.returncode for pull in pulls] == [0, 0], outputs
    store = ImageStore(state)
    assert [name for name, _, _ in store.list_images()] == [f"{registry.host}/team/app:1"]
    assert len(list((state / "images" / "layers").glob("*.json"))) == 2
    assert list((state / "images" / "downloads").iterdir()) == []


def test_a_full_disk_fails_the_pull_cleanly(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        state = _state(tmp_path, "small")
        # A 1 MiB file system for the store (busybox alone is 2 MB), in a mount namespace of
        # its own: the same as root and rootless.
        script = ('mount -t tmpfs -o size=1m tmpfs "$1" && cd "$2" && '
                  '"$3" -m sandboxd image pull --state-dir "$1" "$4"; echo "exit $?"; '
                  '"$3" -m sandboxd image ls --json; ls -A "$1/images/tmp"')
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                               str(state), str(REPO), sys.executable, f"{registry.host}/team/app:1"],
                              capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert "No space left on device" in done.stderr, done.stderr
    assert lines[-2:] == ["exit 1", "[]"], done.stdout


class _Hostile:
    """A loopback server that speaks just enough of the registry API to send what it should not.
    Its image is real: one layer with a text file. `flaky` cuts the first download of
    the layer mid-body and serves ranges after."""

    def __init__(self) -> None:
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as archive:
            info = tarfile.TarInfo("srv/hello.txt")
            info.size = len(b"hello from a layer\n")
            archive.addfile(info, io.BytesIO(b"hello from a layer\n"))
        self.layer = layer.getvalue()
        self.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_digest(self.layer)]}}).encode()
        self.deep_config = json.dumps({"rootfs": {"type": "layers",
                                                  "diff_ids": [_digest(self.layer)] * (MAX_IMAGE_LAYERS + 1)}}).encode()
        self.cut_once: set[str] = set()

    def manifest(self, layer_size: int) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _digest(self.config), "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _digest(self.layer), "size": layer_size}]}).encode()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/v2/":
            return web.Response(text="{}")
        repository = path[len("/v2/"):].partition("/")[0]  # its first component: /v2/<this>/app/...
        manifest_type = "application/vnd.oci.image.manifest.v1+json"
        if "/blobs/" in path:
            for config in (self.config, self.deep_config):
                if path.endswith(_digest(config)):
                    return web.Response(body=config)
            if repository in ("cut", "flaky") and repository not in self.cut_once:
                if repository == "flaky":
                    self.cut_once.add(repository)
                response = web.StreamResponse(headers={"Content-Length": str(len(self.layer))})
                await response.prepare(request)
                await response.write(self.layer[:len(self.layer) // 2])
                request.transport.close()  # the connection drops mid-body
                return response
            start = int(request.headers.get("Range", "bytes=0-")[len("bytes="):].rstrip("-"))
            if start:
                return web.Response(body=self.layer[start:], status=206, headers={
                    "Content-Range": f"bytes {start}-{len(self.layer) - 1}/{len(self.layer)}"})
            return web.Response(body=self.layer)
        if repository == "garbage":
            return web.Response(body=b"\x00not json", content_type=manifest_type)
        if repository == "huge":
            return web.Response(body=b" " * (5 << 20), content_type=manifest_type)
        if repository == "broken":
            return web.json_response({"errors": [{"code": "UNKNOWN", "message": "disk on fire"}]}, status=500)
        if repository == "oversized":
            return web.Response(body=self.manifest(10), content_type=manifest_type)
        if repository == "deep":  # more layers than OverlayFS stacks
            manifest = json.loads(self.manifest(len(self.layer)))
            manifest["layers"] *= MAX_IMAGE_LAYERS + 1
            manifest["config"].update(digest=_digest(self.deep_config), size=len(self.deep_config))
            return web.Response(body=json.dumps(manifest).encode(), content_type=manifest_type)
        return web.Response(body=self.manifest(len(self.layer)), content_type=manifest_type)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hostile():
    server = _Hostile()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.mark.parametrize(("repository", "message"), [
    ("garbage", "the manifest is not JSON"),
    ("huge", "manifest is 5242880 bytes: more than the 4194304 allowed"),
    ("broken", r"answered 500 .*UNKNOWN: disk on fire"),
    ("oversized", "larger than the 10 bytes its manifest says"),
    ("cut", "was cut short at 5120 of 10240 bytes"),
    ("deep", f"the image has {MAX_IMAGE_LAYERS + 1} layers: containers stack at most {MAX_IMAGE_LAYERS}"),
])
def test_what_a_hostile_registry_sends_is_refused(tmp_path, hostile, repository, message):
    state = _state(tmp_path, "pulled")
    with pytest.raises(RegistryError, match=message):
        _pull(state, f"{hostile}/{repository}/app:1")
    _nothing_named_nor_half_written(state)


def test_the_cli_pulls_with_a_line_per_layer_and_names_errors(tmp_path, built):
    with start_registry(tmp_path / "registry") as registry:
        _push(built, "app:1", f"{registry.host}/team/app:1")
        state = _state(tmp_path, "pulled")
        cli = [sys.executable, "-m", "sandboxd", "image"]
        done = subprocess.run(cli + ["pull", "--state-dir", str(state), f"{registry.host}/team/app:1", "-t", "mine:2"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        failed = subprocess.run(cli + ["pull", "--state-dir", str(state), f"{registry.host}/Bad:1"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("Pulled mine:2 sha256:")
    assert sum(": pulled " in line for line in done.stdout.splitlines()) == 2
    assert (failed.returncode, failed.stderr.strip()) == (2, f"sandboxd: error: invalid image name "
                                                             f"'{registry.host}/Bad:1': lower-case letters, digits "
                                                             "and '.', '_', '-' between them, '/' between components")
