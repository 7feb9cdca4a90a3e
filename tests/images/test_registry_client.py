"""The registry client's choices that need no registry: the scheme, and which token realms
credentials may travel to."""

from __future__ import annotations

import asyncio

import pytest

from sandboxd.images.auth import Challenge, Credentials
from sandboxd.images.registry import RegistryClient, RegistryError, is_loopback, new_session


@pytest.mark.parametrize(("registry", "loopback"), [
    ("127.0.0.1:5000", True), ("localhost", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("127.9.9.9", True), ("registry.example", False), ("10.0.0.1:5000", False), ("[2001:db8::1]", False),
])
def test_loopback_registries_are_recognised(registry, loopback):
    assert is_loopback(registry) is loopback


def _scheme(registry: str, insecure: bool = False) -> str:
    async def scheme() -> str:
        async with new_session() as session:
            return RegistryClient(session, registry, None, insecure).scheme

    return asyncio.run(scheme())


def test_plain_http_only_for_loopback_or_when_asked():
    assert _scheme("127.0.0.1:5000") == "http"
    assert _scheme("registry.example") == "https"
    assert _scheme("registry.example", insecure=True) == "http"


@pytest.mark.parametrize(("realm", "complaint"), [
    ("http://auth.example/token", "over plain HTTP"),
    ("ftp://auth.example/token", "not an HTTP URL"),
    ("", "without naming its realm"),
])
def test_credentials_never_go_to_a_realm_in_clear_or_of_another_scheme(realm, complaint):
    async def fetch() -> None:
        async with new_session() as session:
            client = RegistryClient(session, "registry.example", Credentials("alice", "secret"))
            await client._fetch_token(Challenge("bearer", (("realm", realm), ("service", "x"))), ("repository:a:pull",))

    with pytest.raises(RegistryError, match=complaint):
        asyncio.run(fetch())
