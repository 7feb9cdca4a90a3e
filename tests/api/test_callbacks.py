"""Where callbacks may go: the allowlist's hosts, "*" for public addresses only, and the
resolver that holds a connection to the addresses it checked."""

from __future__ import annotations

import asyncio

import pytest

from sandboxd.api.callbacks import CallbackAllowlist, _AllowlistResolver, is_public_address, normalize_callback_host


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


def test_a_host_allowed_only_by_star_must_resolve_to_public_addresses():
    # An address resolves to itself without a name service (the VM lane has no `localhost`).
    async def resolve(allowlist: CallbackAllowlist) -> list:
        return await _AllowlistResolver(allowlist).resolve("127.0.0.1", 80)

    with pytest.raises(OSError, match="no public address"):
        asyncio.run(resolve(CallbackAllowlist.parse(["*"])))
    addresses = asyncio.run(resolve(CallbackAllowlist.parse(["127.0.0.1"])))
    assert [address["host"] for address in addresses] == ["127.0.0.1"]
