"""An HTTP client of one OCI distribution registry (the `/v2/` API), with its authentication.

The first request of a client is `GET /v2/`: its answer says whether the registry is open
(200) or asks for Basic or Bearer authentication (401 and `WWW-Authenticate`). Bearer tokens
come from the realm the registry names, for the scopes an operation needs
(`repository:NAME:pull,push`), with the registry's credentials when there are some, and are
reused while they last. Plain HTTP is used only for loopback registries, or when asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from sandboxd.images.auth import Challenge, Credentials, parse_challenge
from sandboxd.images.reference import api_host

MAX_ERROR_BODY_BYTES = 64 << 10
MAX_TOKEN_BYTES = 1 << 20
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
USER_AGENT = "sandboxd/0.1"
T = TypeVar("T")
R = TypeVar("R")


class RegistryError(RuntimeError):
    """A registry (or its token service) refused, failed or answered what is not the protocol."""


async def each_layer(layers: Sequence[T], transfer: Callable[[T], Awaitable[R]], parallel: int) -> list[R]:
    """transfer(layer) for every layer, `parallel` at once, results in order; the first
    failure cancels the others (a pull or push is all or nothing)."""
    slots = asyncio.Semaphore(parallel)

    async def one(layer: T) -> R:
        async with slots:
            return await transfer(layer)

    tasks = [asyncio.create_task(one(layer)) for layer in layers]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def is_loopback(registry: str) -> bool:
    if registry.startswith("["):
        host = registry.rpartition("]")[0].lstrip("[")
    else:
        host = registry if registry.count(":") > 1 else registry.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_session() -> aiohttp.ClientSession:
    # No proxy or netrc from the environment: credentials go only where auth.py says.
    return aiohttp.ClientSession(timeout=TIMEOUT, headers={"User-Agent": USER_AGENT}, trust_env=False)


async def read_capped(response: aiohttp.ClientResponse, limit_bytes: int, what: str) -> bytes:
    """The body, refused when it is larger than `limit_bytes` (a registry is untrusted)."""
    if response.content_length is not None and response.content_length > limit_bytes:
        raise RegistryError(f"the {what} is {response.content_length} bytes: more than the {limit_bytes} allowed")
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 << 10):
        data += chunk
        if len(data) > limit_bytes:
            raise RegistryError(f"the {what} is larger than the {limit_bytes} bytes allowed")
    return bytes(data)


@dataclass
class _Token:
    value: str
    expires_at: float


class RegistryClient:
    """Requests to one registry, authenticated as it asks."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, credentials: Credentials | None,
                 insecure: bool = False) -> None:
        self.registry = registry
        self.scheme = "http" if insecure or is_loopback(registry) else "https"
        self.base = URL(f"{self.scheme}://{api_host(registry)}")
        self._session = session
        self._credentials = credentials
        self._insecure = insecure
        self._challenge: Challenge | None = None
        self._pinged = False
        self._tokens: dict[tuple[str, ...], _Token] = {}

    def url(self, path: str) -> URL:
        return URL(urljoin(str(self.base), path), encoded=True)

    async def _get(self, url: URL, what: str, limit_bytes: int,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers, body) of a GET of `what` (the ping, a token) outside `request`."""
        try:
            async with self._session.get(url, headers=headers) as response:
                return response.status, response.headers, await read_capped(response, limit_bytes, what)
        except aiohttp.ClientError as error:
            raise RegistryError(f"cannot reach {url.host} over {url.scheme} for the {what}: {error}") from None

    async def ping(self) -> None:
        """Learn how the registry authenticates (once)."""
        if self._pinged:
            return
        status, headers, _ = await self._get(self.url("/v2/"), "answer to GET /v2/", MAX_ERROR_BODY_BYTES)
        if status == 401:
            self._challenge = parse_challenge(headers.get("WWW-Authenticate", ""))
            if self._challenge is None:
                raise RegistryError(f"{self.registry} asks for authentication it does not name "
                                    f"(WWW-Authenticate: {headers.get('WWW-Authenticate')!r})")
        elif status != 200:
            raise RegistryError(f"{self.registry} is not an OCI registry: GET /v2/ answered {status}")
        self._pinged = True

    async def _authorization(self, scopes: tuple[str, ...], challenge: Challenge | None = None) -> str | None:
        challenge = challenge or self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise RegistryError(f"{self.registry} needs a user name and password (see `sandboxd image --help`)")
            return self._credentials.basic_header()
        token = self._tokens.get(scopes)
        if token is None or token.expires_at < time.monotonic():
            token = self._tokens[scopes] = await self._fetch_token(challenge, scopes)
        return f"Bearer {token.value}"

    async def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> _Token:
        realm = challenge.param("realm")
        if not realm:
            raise RegistryError(f"{self.registry} asks for a Bearer token without naming its realm")
        realm_url = URL(realm)
        if realm_url.scheme not in ("https", "http") or not realm_url.host:
            raise RegistryError(f"{self.registry} names a token realm that is not an HTTP URL: {realm!r}")
        if realm_url.scheme == "http" and not (self._insecure or is_loopback(realm_url.host)):
            raise RegistryError(f"{self.registry} names a token realm over plain HTTP ({realm}): refused, "
                                "credentials would travel in clear")
        query: list[tuple[str, str]] = []
        if challenge.param("service"):
            query.append(("service", challenge.param("service") or ""))
        query += [("scope", scope) for scope in scopes]
        headers = {"Authorization": self._credentials.basic_header()} if self._credentials else {}
        status, _, body = await self._get(realm_url.extend_query(query), "token answer", MAX_TOKEN_BYTES,
                                          headers)
        if status == 401:
            raise RegistryError(f"the token service of {self.registry} refused "
                                f"{'the credentials' if self._credentials else 'anonymous access'}")
        if status != 200:
            raise RegistryError(f"the token service of {self.registry} answered {status}")
        try:
            answer = json.loads(body)
            value = answer.get("token") or answer.get("access_token")
            lifetime_s = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"the token service of {self.registry} answered what is not a token") from None
        if not isinstance(value, str) or not value or any(char in value for char in "\r\n"):
            raise RegistryError(f"the token service of {self.registry} answered what is not a token")
        return _Token(value, time.monotonic() + max(lifetime_s - 10, 1))

    async def request(self, method: str, url: URL | str, *, scopes: tuple[str, ...],
                      headers: Mapping[str, str] | None = None, data: Any = None,
                      expect: tuple[int, ...] = (200,)) -> aiohttp.ClientResponse:
        """One request, authenticated for `scopes`; a response of another status than `expect`
        raises RegistryError with the registry's own error message. The caller releases the
        response (`async with`). A body that is a stream is sent once: a 401 on it fails."""
        await self.ping()
        target = self.url(url) if isinstance(url, str) else url
        for attempt in range(2):
            sent = dict(headers or {})
            authorization = await self._authorization(scopes)
            if authorization:
                sent["Authorization"] = authorization
            try:
                response = await self._session.request(method, target, headers=sent, data=data)
            except aiohttp.ClientError as error:
                raise RegistryError(f"{method} {target.path}: {error}") from None
            if response.status == 401 and attempt == 0 and isinstance(data, (bytes, type(None))):
                # A token for fewer scopes than the operation needs: ask again for what it names.
                challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
                response.release()
                if challenge is not None and challenge.scheme == "bearer":
                    self._challenge = challenge
                    self._tokens.pop(scopes, None)
                    continue
                raise RegistryError(f"{method} {target.path}: {self.registry} refused the credentials")
            if response.status not in expect:
                error = await self.error(response, method, target)
                response.release()
                raise error
            return response
        raise RegistryError(f"{method} {target.path}: {self.registry} refused the token it issued")

    async def error(self, response: aiohttp.ClientResponse, method: str, target: URL) -> RegistryError:
        """RegistryError with what the registry said (its JSON errors, when it sent some)."""
        try:
            body = await read_capped(response, MAX_ERROR_BODY_BYTES, "error answer")
            errors = json.loads(body).get("errors") or []
            said = "; ".join(f"{item.get('code')}: {item.get('message')}" for item in errors if isinstance(item, dict))
        except (RegistryError, ValueError, AttributeError, aiohttp.ClientError):
            said = ""
        return RegistryError(f"{method} {target.path}: {self.registry} answered {response.status} "
                             f"{response.reason or ''}".rstrip() + (f" ({said})" if said else ""))
