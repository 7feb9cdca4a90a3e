"""Credentials from the environment or an auth file, and WWW-Authenticate challenges."""

from __future__ import annotations

import base64
import json

import pytest

from sandboxd.images.auth import Credentials, CredentialsError, credentials_for, parse_challenge


def test_a_bearer_challenge_gives_its_realm_service_and_scope():
    challenge = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                                'scope="repository:a/b:pull,push",error="insufficient_scope"')
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.param("realm") == "https://auth.example/token"
    assert challenge.param("service") == "registry.example"
    assert challenge.param("scope") == "repository:a/b:pull,push"
    assert challenge.param("error") == "insufficient_scope"


def test_a_basic_challenge_and_unknown_schemes():
    assert parse_challenge('Basic realm="x"') == parse_challenge('basic realm="x"')
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge('Negotiate abc') is None
    assert parse_challenge('') is None


def _auth_file(tmp_path, document) -> dict[str, str]:
    path = tmp_path / "auth.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return {"SANDBOXD_AUTH_FILE": str(path)}


def test_the_auth_file_gives_each_registry_its_own_credentials(tmp_path):
    environ = _auth_file(tmp_path, {"auths": {
        "a.example:5000": {"auth": base64.b64encode(b"alice:pa:ss").decode()},
        "https://index.docker.io/v1/": {"username": "hub", "password": "secret"},
    }})
    assert credentials_for("a.example:5000", environ) == Credentials("alice", "pa:ss")
    assert credentials_for("docker.io", environ) == Credentials("hub", "secret")
    assert credentials_for("b.example", environ) is None


def test_the_environment_overrides_the_file_and_needs_both_values(tmp_path):
    environ = _auth_file(tmp_path, {"auths": {"a.example": {"auth": base64.b64encode(b"alice:x").decode()}}})
    both = {**environ, "SANDBOXD_REGISTRY_USERNAME": "bob", "SANDBOXD_REGISTRY_PASSWORD": "y"}
    assert credentials_for("a.example", both) == Credentials("bob", "y")
    with pytest.raises(CredentialsError, match="set both"):
        credentials_for("a.example", {"SANDBOXD_REGISTRY_USERNAME": "bob"})


def test_no_auth_file_means_anonymous(tmp_path):
    assert credentials_for("a.example", {"SANDBOXD_AUTH_FILE": str(tmp_path / "none.json")}) is None
    assert credentials_for("a.example", {"XDG_CONFIG_HOME": str(tmp_path)}) is None


@pytest.mark.parametrize(("document", "complaint"), [
    ("not json", "not a JSON object"),
    ({"auths": []}, "not an object"),
    ({"auths": {"a.example": {"auth": "%%%"}}}, "not base64"),
    ({"auths": {"a.example": {"auth": base64.b64encode(b"nocolon").decode()}}}, "not base64 of user:password"),
    ({"auths": {"a.example": {}}}, "neither"),
])
def test_a_malformed_auth_file_is_a_clear_error(tmp_path, document, complaint):
    with pytest.raises(CredentialsError, match=complaint):
        credentials_for("a.example", _auth_file(tmp_path, document))


def test_a_password_never_shows_in_a_repr():
    assert "s3cret" not in repr(Credentials("alice", "s3cret"))
