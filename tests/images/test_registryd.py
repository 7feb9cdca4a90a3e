"""The test registry's auth modes are enforced by the registry itself, not assumed: what the real
`docker-registry` answers with, without and with wrong credentials, and that nothing of it
outlives start_registry()."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from registryd import SERVICE, start_registry
from servicekit import processes_mentioning

# Loopback only: a proxy from the environment must not see these requests.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request(url: str, authorization: str | None = None, method: str = "GET", data: bytes | None = None) -> Reply:
    req = urllib.request.Request(url, data=data, method=method)
    if authorization is not None:
        req.add_header("Authorization", authorization)
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with _opener.open(req, timeout=30) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers), error.read())


def basic(username: str | None, password: str | None) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@pytest.fixture
def work_dir(tmp_path: Path):
    yield tmp_path
    # The registry and the token server name their config files under the work dir.
    assert processes_mentioning(tmp_path) == [], "a registry or token server outlived start_registry()"


def bearer_challenge(reply: Reply) -> dict[str, str]:
    scheme, _, params = reply.headers["Www-Authenticate"].partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def fetch_token(challenge: dict[str, str], scope: str, authorization: str | None = None) -> Reply:
    query = urllib.parse.urlencode({"service": challenge["service"], "scope": scope})
    return request(f"{challenge['realm']}?{query}", authorization)


def test_an_open_registry_serves_anyone(work_dir):
    with start_registry(work_dir) as registry:
        assert (registry.username, registry.password) == (None, None)
        assert registry.url == f"http://{registry.host}" and registry.host.startswith("127.0.0.1:")
        reply = request(registry.url + "/v2/")
        assert reply.status == 200
        assert reply.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_blobs_land_where_blob_path_says(work_dir):
    """Tests corrupt blobs behind the registry's back: the path must be the one it reads."""
    data = b"a blob\n"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with start_registry(work_dir) as registry:
        # distribution 2.8 takes no single-POST upload (it answers 202 and ignores the body).
        session = request(f"{registry.url}/v2/x/y/blobs/uploads/", method="POST", data=b"")
        assert session.status == 202, session.body
        location = urllib.parse.urljoin(registry.url, session.headers["Location"])
        separator = "&" if "?" in location else "?"
        reply = request(f"{location}{separator}digest={digest}", method="PUT", data=data)
        assert reply.status == 201, reply.body
        assert registry.blob_path(digest).read_bytes() == data
        registry.blob_path(digest).write_bytes(b"tampered")
        assert request(f"{registry.url}/v2/x/y/blobs/{digest}").body == b"tampered"


def test_basic_auth_is_required_and_checked(work_dir):
    with start_registry(work_dir, auth="basic") as registry:
        anonymous = request(registry.url + "/v2/")
        assert anonymous.status == 401
        assert anonymous.headers["Www-Authenticate"] == 'Basic realm="sandboxd-test-registry"'
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert request(registry.url + "/v2/", basic(registry.username, registry.password)).status == 200
        assert request(registry.url + "/v2/", basic(registry.username, "wrong")).status == 401
        assert request(registry.url + "/v2/", basic("someone-else", registry.password)).status == 401
        # Past authentication a repository that was never pushed is unknown, not forbidden.
        reply = request(registry.url + "/v2/x/y/tags/list", basic(registry.username, registry.password))
        assert (reply.status, reply.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")


def test_token_auth_sends_clients_to_the_token_server(work_dir):
    with start_registry(work_dir, auth="token") as registry:
        anonymous = request(registry.url + "/v2/")
        assert anonymous.status == 401
        challenge = bearer_challenge(anonymous)
        assert challenge == {"realm": challenge["realm"], "service": SERVICE}
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/token", challenge["realm"])
        # The challenge for a repository names the scope a client should ask for.
        reply = request(registry.url + "/v2/x/y/tags/list")
        assert reply.status == 401
        assert bearer_challenge(reply)["scope"] == "repository:x/y:pull"
        # The registry takes no credentials but tokens.
        assert request(registry.url + "/v2/", basic(registry.username, registry.password)).status == 401


def test_a_token_grants_what_the_user_asked_for(work_dir):
    with start_registry(work_dir, auth="token") as registry:
        challenge = bearer_challenge(request(registry.url + "/v2/"))
        reply = fetch_token(challenge, "repository:x/y:pull,push", basic(registry.username, registry.password))
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300
        bearer = "Bearer " + body["token"]
        assert request(registry.url + "/v2/", bearer).status == 200
        tags = request(registry.url + "/v2/x/y/tags/list", bearer)
        assert (tags.status, tags.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
        # Only that repository: another one is out of the token's scope.
        other = request(registry.url + "/v2/x/z/tags/list", bearer)
        assert other.status == 401
        assert bearer_challenge(other)["error"] == "insufficient_scope"


def test_anonymous_tokens_grant_nothing_and_wrong_passwords_get_none(work_dir):
    with start_registry(work_dir, auth="token") as registry:
        challenge = bearer_challenge(request(registry.url + "/v2/"))
        reply = fetch_token(challenge, "repository:x/y:pull")
        assert reply.status == 200, reply.body
        bearer = "Bearer " + reply.json()["token"]
        assert request(registry.url + "/v2/", bearer).status == 200
        tags = request(registry.url + "/v2/x/y/tags/list", bearer)
        assert tags.status == 401
        assert bearer_challenge(tags)["error"] == "insufficient_scope"
        assert fetch_token(challenge, "repository:x/y:pull", basic(registry.username, "wrong")).status == 401


def test_the_registry_checks_the_token_signature(work_dir):
    """A token whose claims were edited (an anonymous one given access) is refused: the
    registry really verifies what token_server.py signs."""
    with start_registry(work_dir, auth="token") as registry:
        challenge = bearer_challenge(request(registry.url + "/v2/"))
        header, claims, signature = fetch_token(challenge, "repository:x/y:pull").json()["token"].split(".")
        decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        assert decoded["access"] == []
        decoded["access"] = [{"type": "repository", "name": "x/y", "actions": ["pull"]}]
        forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
        reply = request(registry.url + "/v2/x/y/tags/list", f"Bearer {header}.{forged}.{signature}")
        assert reply.status == 401
        assert bearer_challenge(reply)["error"] == "invalid_token"  # not merely short of scope
