"""Callbacks: a finished submission PUT to a URL its submitter named (Judge0's callback_url),
only where the service's admin allows.

The allowlist names hosts exactly (any address they resolve to), or "*": any host whose
addresses are all public (not loopback, private, link-local, multicast, reserved or
unspecified). That is checked on the addresses the connection then uses (a resolver of our
own), so a name cannot be re-pointed at an internal address between the check and the
connect. Redirects are not followed. With no allowlist, no callback is allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterable

import aiohttp
from aiohttp.resolver import ThreadedResolver
from yarl import URL

CALLBACK_TRIES = 3
CALLBACK_TIMEOUT_S = 5.0
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_NAME_RE = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
ANY_PUBLIC_HOST = "*"


def normalize_callback_host(entry: str) -> str:
    """An allowlist entry as compared with URLs' hosts: an address in its canonical form, a
    name in lower case without a final dot, or "*"; ValueError if it is neither."""
    text = entry.strip().lower().removeprefix("[").removesuffix("]")
    if text == ANY_PUBLIC_HOST:
        return text
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        pass
    name = text.removesuffix(".")
    if not HOST_NAME_RE.match(name):
        raise ValueError(f"{entry!r} is not a host name or an address (nor {ANY_PUBLIC_HOST!r})")
    return name


def is_public_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class CallbackAllowlist:
    """Where callback_url may point: hosts named exactly (any address they resolve to), and
    with "*" any other host whose addresses are all public."""

    hosts: frozenset[str] = frozenset()
    any_public: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> CallbackAllowlist:
        normalized = {normalize_callback_host(entry) for entry in entries if entry.strip()}
        return cls(hosts=frozenset(normalized - {ANY_PUBLIC_HOST}), any_public=ANY_PUBLIC_HOST in normalized)

    @property
    def enabled(self) -> bool:
        return bool(self.hosts) or self.any_public

    def named(self, host: str) -> bool:
        try:
            return normalize_callback_host(host) in self.hosts
        except ValueError:
            return False

    def refusal(self, url_text: str) -> str | None:
        """Why a callback to this URL is refused, or None. A host allowed only by "*" must
        resolve to public addresses, which is checked when the callback is sent."""
        if not self.enabled:
            return "setting callback is not allowed (this service has no callback allowlist)"
        try:
            url = URL(url_text)
        except ValueError:
            return "is not a valid URL"
        if url.scheme not in ("http", "https"):
            return "must be an http or https URL"
        host = url.raw_host  # as the connection resolves it (IDNA, ASCII)
        if not host:
            return "must name a host"
        try:
            host = normalize_callback_host(host)
        except ValueError:
            return f"does not name a valid host ({host!r})"
        if host in self.hosts:
            return None
        if self.any_public:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                return None  # a name: its addresses are checked on sending
            return None if is_public_address(host) else f"{host} is not a public address, nor in the callback allowlist"
        return f"host {host} is not in this service's callback allowlist"


def permitted_addresses(allowlist: CallbackAllowlist, host: str,
                        resolved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the addresses `host` resolved to, those a callback may connect to: all of them for
    a host the allowlist names, only public ones otherwise (OSError if none is)."""
    if allowlist.named(host):
        return resolved
    public = [address for address in resolved if is_public_address(address["host"])]
    if not public:
        raise OSError(f"{host} resolves to no public address")
    return public


class _AllowlistResolver(ThreadedResolver):
    """Resolves a callback's host to the addresses it may connect to: all of them for a host
    the allowlist names, only public ones otherwise. The connection uses exactly these, so a
    name cannot be re-pointed between the check and the connect."""

    def __init__(self, allowlist: CallbackAllowlist) -> None:
        super().__init__()
        self._allowlist = allowlist

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        return permitted_addresses(self._allowlist, host, await super().resolve(host, port, family))


class CallbackSender:
    """PUTs finished submissions to their callback_url: CALLBACK_TRIES tries, each within
    CALLBACK_TIMEOUT_S, retried only when no answer came (an answer, any status, ends it, as
    in Judge0). Never raises."""

    def __init__(self, allowlist: CallbackAllowlist, log: Any) -> None:
        self.allowlist = allowlist
        self._log = log
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_AllowlistResolver(self.allowlist), use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S))
        return self._session

    async def send(self, url: str, payload: dict[str, Any], submission_id: str) -> None:
        refusal = self.allowlist.refusal(url)
        if refusal is not None:
            self._log.warning("callback.refused", submission_id=submission_id, reason=refusal)
            return
        body = json.dumps(payload)
        for attempt in range(1, CALLBACK_TRIES + 1):
            try:
                async with self._client().put(url, data=body, allow_redirects=False,
                                              headers={"Content-Type": "application/json"}) as response:
                    self._log.info("callback.sent", submission_id=submission_id, status=response.status,
                                   attempt=attempt)
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                self._log.warning("callback.failed", submission_id=submission_id, attempt=attempt,
                                  error=f"{type(error).__name__}: {error}")
        self._log.error("callback.abandoned", submission_id=submission_id, tries=CALLBACK_TRIES)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
