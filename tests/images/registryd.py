"""Debian's real `docker-registry` (distribution 2.8) on a loopback port, for integration tests of
our registry client against the server everyone else's clients are tested against.

    with start_registry(tmp_path, auth="token") as registry:
        ...  # push to / pull from registry.url as registry.username:registry.password

Three ways to guard it, each enforced by the registry itself (test_registryd.py proves it):
  auth=None     open: anyone may push and pull.
  auth="basic"  HTTP basic auth against an htpasswd file (bcrypt, the only hash 2.8 accepts).
  auth="token"  Bearer tokens, as Docker Hub does it: the registry sends clients to a token
                server (token_server.py, started here) and verifies the JWTs it issues.

Everything lives under work_dir, so the rootless lane's unprivileged user can run it too:
the config, the storage root, the htpasswd file, the token issuer's key and certificate, and
the logs (`registry.log`, `token-server.log`, whose tails go into any start-up error).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import EMULATED_CPU

REGISTRY_BINARY = "docker-registry"
TOKEN_SERVER = Path(__file__).with_name("token_server.py")
# Go starts in milliseconds on hardware; the emulated lane is several times slower at everything.
START_TIMEOUT_S = 60.0 if EMULATED_CPU else 20.0
STOP_TIMEOUT_S = 10.0
# Another process may take the free port between our probe and the registry's bind.
BIND_ATTEMPTS = 3

USERNAME = "sandboxd-tester"
REALM = "sandboxd-test-registry"
SERVICE = "sandboxd-test-registry"
ISSUER = "sandboxd-test-token-server"
TOKEN_EXPIRES_IN_S = 300

TOKEN_SERVER_LINE = re.compile(r"token server listening on (http://\S+)")

# Loopback only: a proxy from the environment must not see these requests.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Registry:
    """What a test needs to reach one running registry: where it answers, the credentials it
    (or its token server) takes, and its storage, for tests of what our client does when the
    registry serves bytes that do not match their digest."""

    url: str  # "http://127.0.0.1:PORT"
    host: str  # "127.0.0.1:PORT", as it appears in image references
    storage_dir: Path  # the filesystem driver's root: tests may tamper with blobs there
    username: str | None  # None when the registry is open
    password: str | None

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (distribution's filesystem layout), so a
        test can corrupt or remove one behind the registry's back."""
        algorithm, _, hex_digest = digest.partition(":")
        return (self.storage_dir / "docker" / "registry" / "v2" / "blobs" / algorithm / hex_digest[:2]
                / hex_digest / "data")


@contextlib.contextmanager
def start_registry(work_dir: Path, auth: str | None = None) -> Iterator[Registry]:
    """A running registry (with its token server for auth="token"), both stopped on exit.

    Raises AssertionError, with the tail of the logs, when either does not come up."""
    if auth not in (None, "basic", "token"):
        raise ValueError(f"auth must be None, 'basic' or 'token', not {auth!r}")
    if shutil.which(REGISTRY_BINARY) is None:
        raise AssertionError(f"{REGISTRY_BINARY} is not installed (Debian package docker-registry)")
    work_dir.mkdir(parents=True, exist_ok=True)
    storage_dir = work_dir / "registry-storage"
    storage_dir.mkdir(exist_ok=True)
    username = password = None
    config: dict = {
        "version": "0.1",
        # "listening on" is an info line; the access log (stdout) only repeats every request.
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage_dir)}, "delete": {"enabled": True}},
        # A secret of our own: without one the registry warns on every start.
        "http": {"addr": "", "secret": secrets.token_hex(16)},
    }
    with contextlib.ExitStack() as stack:
        if auth is not None:
            username, password = USERNAME, secrets.token_urlsafe(12)
        if auth == "basic":
            htpasswd = work_dir / "htpasswd"
            htpasswd.write_text(f"{username}:{_bcrypt(password)}\n")
            config["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
        elif auth == "token":
            assert username is not None and password is not None
            realm = stack.enter_context(_token_server(work_dir, username, password))
            config["auth"] = {"token": {"realm": realm, "service": SERVICE, "issuer": ISSUER,
                                        "rootcertbundle": str(work_dir / "token-issuer.crt")}}
        host = stack.enter_context(_registry_process(work_dir, config))
        yield Registry(url=f"http://{host}", host=host, storage_dir=storage_dir, username=username,
                       password=password)


def _bcrypt(password: str) -> str:
    """A `$2b$` hash, which Go's bcrypt (the registry's htpasswd) reads like `$2y$`. The
    `crypt` module is the standard library's only bcrypt (deprecated, gone in Python 3.13;
    no pip dependency for tests). Cost 4, the least: the registry checks it on every request."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    assert hashed is not None and hashed.startswith("$2b$04$"), hashed
    return hashed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(process: subprocess.Popen, reader: threading.Thread | None = None) -> None:
    """Terminate (both exit at once on SIGTERM), kill if that did not do, and reap; the
    thread reading its output, if any, sees the end before the pipe is closed under it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if reader is not None:
        reader.join()
    if process.stdout is not None:
        process.stdout.close()


class _LogCopier(threading.Thread):
    """Copies the registry's output to its log file, noting the "listening on" line that it
    logs once its socket is bound: readiness is that line, or the output's end (it exited)."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        super().__init__(name=f"registry-log-{process.pid}", daemon=True)
        self.process = process
        self.log_path = log_path
        self.listening = False
        self.changed = threading.Event()

    def run(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                if not self.listening and b'msg="listening on ' in line:
                    self.listening = True
                    self.changed.set()
        self.changed.set()


@contextlib.contextmanager
def _registry_process(work_dir: Path, config: dict) -> Iterator[str]:
    """The registry serving on a loopback port; yields "127.0.0.1:PORT"."""
    config_path = work_dir / "registry.yml"  # JSON is YAML: no quoting to get wrong
    log_path = work_dir / "registry.log"
    # The registry overrides its config from REGISTRY_* variables: none may leak in.
    env = {name: value for name, value in os.environ.items() if not name.startswith("REGISTRY_")}
    for attempt in range(1, BIND_ATTEMPTS + 1):
        host = f"127.0.0.1:{_free_port()}"
        config["http"]["addr"] = host
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        with open(log_path, "ab") as log:
            log.write(f"--- sandboxd tests: start {attempt} on {host}\n".encode())
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config_path)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   cwd=work_dir, start_new_session=True)
        copier = _LogCopier(process, log_path)
        copier.start()
        try:
            copier.changed.wait(START_TIMEOUT_S)
            if copier.listening:
                _check_answers(f"http://{host}", log_path)
                break
            if process.poll() is None:
                raise AssertionError(f"the registry did not listen within {START_TIMEOUT_S:.0f} s:\n"
                                     f"{_tail(log_path)}")
            _stop(process, copier)
            if "address already in use" in _tail(log_path, 5) and attempt < BIND_ATTEMPTS:
                continue
            raise AssertionError(f"the registry exited with status {process.returncode}:\n{_tail(log_path)}")
        except BaseException:
            _stop(process, copier)
            raise
    try:
        yield host
    finally:
        _stop(process, copier)


def _check_answers(url: str, log_path: Path) -> None:
    """One request to confirm the listener is the registry: /v2/ answers 200, or 401 under auth."""
    try:
        with _opener.open(url + "/v2/", timeout=START_TIMEOUT_S) as response:
            status, headers = response.status, response.headers
    except urllib.error.HTTPError as error:
        status, headers = error.code, error.headers
        error.close()
    if status not in (200, 401) or headers.get("Docker-Distribution-Api-Version") != "registry/2.0":
        raise AssertionError(f"GET /v2/ answered {status}, not as a registry:\n{_tail(log_path)}")


@dataclass(frozen=True)
class _IssuerKey:
    """The token issuer's RSA key and self-signed certificate."""

    cert_pem: bytes
    cert_der_b64: str
    modulus_hex: str
    private_exponent_hex: str


_issuer_key: _IssuerKey | None = None


def _openssl(*args: str) -> bytes:
    done = subprocess.run(["openssl", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"openssl {args[0]} failed ({done.returncode}):\n"
                             f"{done.stderr.decode(errors='replace')}")
    return done.stdout


def _rsa_number(text: str, name: str) -> str:
    """A number from `openssl rsa -text`: "NAME:" then indented lines of hex pairs."""
    match = re.search(rf"^{name}:\s*\n((?:[ \t]+[0-9a-f:]+\n)+)", text, re.MULTILINE)
    assert match is not None, f"no {name} in openssl's output"
    return re.sub(r"[^0-9a-f]", "", match.group(1))


def _issuer(work_dir: Path) -> _IssuerKey:
    """Made once per test process (key generation is the slow part, under emulation above
    all), with the `openssl` CLI: the `cryptography` package is not available to the tests."""
    global _issuer_key
    if _issuer_key is None:
        scratch = work_dir / "token-issuer-keygen"
        scratch.mkdir(mode=0o700, exist_ok=True)
        key, cert = scratch / "key.pem", scratch / "cert.pem"
        # Valid from now on: the registry's Go x509 checks dates when it verifies the x5c chain.
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                 "-days", "7", "-subj", "/CN=sandboxd test token issuer")
        der = _openssl("x509", "-in", str(cert), "-outform", "DER")
        text = _openssl("rsa", "-in", str(key), "-noout", "-text").decode()
        _issuer_key = _IssuerKey(cert_pem=cert.read_bytes(), cert_der_b64=base64.b64encode(der).decode(),
                                 modulus_hex=_rsa_number(text, "modulus"),
                                 private_exponent_hex=_rsa_number(text, "privateExponent"))
        shutil.rmtree(scratch)
    return _issuer_key


@contextlib.contextmanager
def _token_server(work_dir: Path, username: str, password: str) -> Iterator[str]:
    """token_server.py for this registry, its certificate written as the registry's
    rootcertbundle; yields the realm (the token endpoint's URL)."""
    key = _issuer(work_dir)
    (work_dir / "token-issuer.crt").write_bytes(key.cert_pem)
    config_path = work_dir / "token-server.json"
    config = {"issuer": ISSUER, "service": SERVICE, "username": username, "password": password,
              "x5c": [key.cert_der_b64], "n": key.modulus_hex, "d": key.private_exponent_hex,
              "expires_in": TOKEN_EXPIRES_IN_S}
    descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w") as file:
        json.dump(config, file)
    log_path = work_dir / "token-server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, str(TOKEN_SERVER), str(config_path)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                   cwd=work_dir, start_new_session=True, text=True)
    try:
        url = _await_line(process, TOKEN_SERVER_LINE, log_path)
        yield url + "/token"
    finally:
        _stop(process)


def _await_line(process: subprocess.Popen, pattern: re.Pattern[str], log_path: Path) -> str:
    """Group 1 of the first stdout line matching pattern, read within START_TIMEOUT_S."""
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + START_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            line = process.stdout.readline()
            if not line:
                break
            seen += line
            if match := pattern.search(line):
                return match.group(1)
    raise AssertionError(f"the token server did not start:\n{seen}{_tail(log_path)}")
