"""Registry credentials and authentication challenges.

Credentials come from the environment (`SANDBOXD_REGISTRY_USERNAME` and
`SANDBOXD_REGISTRY_PASSWORD`, for the registry a command talks to) or from an auth file in the
format Docker, podman and skopeo write (`{"auths": {"HOST[:PORT]": {"auth": base64("user:pass")}}}`):
`SANDBOXD_AUTH_FILE`, else `$XDG_CONFIG_HOME/sandboxd/auth.json` (`~/.config/...`). They go
only to the registry they are for and to the token service that registry names; never into
a job or a build step.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

MAX_AUTH_FILE_BYTES = 1 << 20
_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


class CredentialsError(ValueError):
    """The auth file or the environment's credentials are malformed."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class Challenge:
    """What a registry's 401 asks for: `Basic realm=...` or `Bearer realm=...,service=...,scope=...`."""

    scheme: str  # "basic" or "bearer", lower-case
    params: tuple[tuple[str, str], ...]

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)


def parse_challenge(header: str) -> Challenge | None:
    """The first Basic or Bearer challenge of a WWW-Authenticate header (None if none)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params = []
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _AUTH_PARAM.match(rest, position)
        if match is None or match.end() == position:
            break
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params.append((match.group(1).lower(), re.sub(r"\\(.)", r"\1", value)))
        position = match.end()
    return Challenge(scheme.lower(), tuple(params))


def default_auth_file(environ: Mapping[str, str]) -> Path:
    if environ.get("SANDBOXD_AUTH_FILE"):
        return Path(environ["SANDBOXD_AUTH_FILE"])
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"),
                                                                 ".config")
    return Path(config_home) / "sandboxd" / "auth.json"


def credentials_for(registry: str, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials to use with `registry` ("host[:port]"), or None to go anonymously."""
    environ = os.environ if environ is None else environ
    username, password = environ.get("SANDBOXD_REGISTRY_USERNAME"), environ.get("SANDBOXD_REGISTRY_PASSWORD")
    if username or password:
        if not (username and password is not None):
            raise CredentialsError("set both SANDBOXD_REGISTRY_USERNAME and SANDBOXD_REGISTRY_PASSWORD, or neither")
        return Credentials(username, password)
    path = default_auth_file(environ)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_AUTH_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CredentialsError(f"cannot read the auth file {path}: {error.strerror}") from None
    if len(data) > MAX_AUTH_FILE_BYTES:
        raise CredentialsError(f"the auth file {path} is larger than {MAX_AUTH_FILE_BYTES} bytes")
    try:
        auths = json.loads(data).get("auths", {})
    except (ValueError, AttributeError):
        raise CredentialsError(f"the auth file {path} is not a JSON object with \"auths\"") from None
    if not isinstance(auths, dict):
        raise CredentialsError(f"the auth file {path}: \"auths\" is not an object")
    # Docker writes Docker Hub's entry under its old index URL.
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    entry = next((auths[key] for key in keys if key in auths), None)
    if entry is None:
        return None
    return _entry_credentials(entry, path, registry)


def _entry_credentials(entry: object, path: Path, registry: str) -> Credentials:
    where = f"the auth file {path}, entry {registry!r}"
    if not isinstance(entry, dict):
        raise CredentialsError(f"{where} is not an object")
    if isinstance(entry.get("auth"), str):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{where}: \"auth\" is not base64 of user:password") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise CredentialsError(f"{where}: \"auth\" is not base64 of user:password")
        return Credentials(username, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    raise CredentialsError(f"{where} has neither \"auth\" nor \"username\" and \"password\"")
