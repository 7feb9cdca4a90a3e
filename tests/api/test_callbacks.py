"""Where callbacks may go: the allowlist's hosts, "*" for public addresses only, and the
resolver that holds a connection to the addresses it checked."""

from __future__ import annotations

import asyncio

import pytest

from sandboxd.api.callbacks import (CallbackAllowlist, _AllowlistResolver, is_public_address, normalize_callback_host,
                                    permitted_addresses)


def test_the_allowlist_names_hosts_and_star_admits_only_public_addresses():
    named = CallbackAllowlist.parse(["Hooks.Example.com.", "127.0.0.1", "[::1]"])
    assert named.hosts == {"hooks.example.com", "127.0.0.1", "::1"} and not named.any_public
    assert named.refusal("https://HOOKS.example.com:8443/x?y=1") is None
    assert named.refusal("http://[::1]:80/") is None and named.refusal("http://127.0.0.1/") is None
    assert "not in this service's callback allowlist" in named.refusal("http://127.0.0.2/")
    assert "not in this service's callback allowlist" in named.refusal("http://other.example.com/")
    star = CallbackAllowlist.parse(["*", "10.1.2.3"])
    assert star.any_public and star.refusal("https://anything.example.org/") is None
    assert star.refusal("http://93.184.216.34/") is None and star.refusal("http://10.1.2.3/") is None
    for internal in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "[::1]", "[fe80::1]", "0.0.0.0",
                     "224.0.0.1", "[::ffff:127.0.0.1]", "240.0.0.1"):
        assert "not a public address" in star.refusal(f"http://{internal}/"), internal
    assert not is_public_address("100.64.0.1") and is_public_address("2606:4700::1111")
    for bad in ("http://exa mple.com/", "a b", ""):
        assert CallbackAllowlist.parse(["*"]).refusal(bad) is not None
    for entry in ("http://host/", "under score?", "a..b"):
        with pytest.raises(ValueError):
            normalize_callback_host(entry)


def resolved(*hosts: str) -> list[dict]:
    """Addresses as aiohttp's resolvers give them."""
    return [{"hostname": "hooks.example.org", "host": host, "port": 443, "family": 0, "proto": 0, "flags": 0}
            for host in hosts]


def test_a_host_allowed_only_by_star_may_connect_only_to_its_public_addresses():
    # The name service itself is not asked here: the VM lane has no network, and there
    # getaddrinfo (AI_ADDRCONFIG) resolves nothing at all.
    star = CallbackAllowlist.parse(["*"])
    mixed = resolved("10.0.0.7", "93.184.216.34", "::1", "2606:4700::1111")
    assert [address["host"] for address in permitted_addresses(star, "hooks.example.org", mixed)] == [
        "93.184.216.34", "2606:4700::1111"]
    with pytest.raises(OSError, match="no public address"):
        permitted_addresses(star, "hooks.example.org", resolved("127.0.0.1", "169.254.169.254"))
    named = CallbackAllowlist.parse(["hooks.example.org"])
    assert permitted_addresses(named, "Hooks.Example.org", mixed) == mixed


def test_the_resolver_of_callbacks_applies_the_allowlist():
    async def resolve() -> list:
        return await _AllowlistResolver(CallbackAllowlist.parse(["*"])).resolve("localhost", 80)

    with pytest.raises(OSError):  # loopback only, or no name service at all: never connected to
        asyncio.run(resolve())
