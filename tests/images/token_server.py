"""A Bearer token server for the test registry (registryd.py starts it as a subprocess).

It plays the part Docker Hub's auth.docker.io plays for a registry configured with token auth:
GET /token?service=SERVICE&scope=repository:NAME:pull,push answers {"token", "access_token",
"expires_in", "issued_at"}. A request with the right HTTP basic credentials gets a token granting
exactly the actions it asked for; an anonymous one gets a token granting nothing (as Docker Hub
grants anonymous clients only what is public, and nothing here is); wrong credentials get 401.

Tokens are JWTs signed RS256 with the key registryd.py made, the issuer's self-signed
certificate in the header's `x5c`: the registry checks that chain against its rootcertbundle
(the same certificate), then the signature, issuer, audience (the service), times and access.
No crypto library is needed: PKCS#1 v1.5 signing is a padding and one modular exponentiation.

    python token_server.py CONFIG.json

CONFIG holds issuer, service, username, password, x5c (base64 DER certificates), n and d (the
RSA modulus and private exponent, hex) and expires_in. Once listening on a free loopback port
it prints `token server listening on http://127.0.0.1:PORT` on stdout (the caller waits for that
line); it logs each token it issues on stderr, and exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

# DER of DigestInfo{sha256, NULL} without the digest: what EMSA-PKCS1-v1_5 puts before it.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.issuer: str = config["issuer"]
        self.service: str = config["service"]
        self.username: str = config["username"]
        self.password: str = config["password"]
        self.x5c: list[str] = config["x5c"]
        self.expires_in: int = config["expires_in"]
        self.n = int(config["n"], 16)
        self.d = int(config["d"], 16)

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (JWS "RS256"): deterministic, so equal to what
        `openssl dgst -sha256 -sign` makes with the same key."""
        size = (self.n.bit_length() + 7) // 8
        digest_info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        encoded = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
        return pow(int.from_bytes(encoded, "big"), self.d, self.n).to_bytes(size, "big")

    def token(self, subject: str, access: list[dict[str, Any]], now: int) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            # distribution 2.8 reads `aud` as one string (a list fails to decode).
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode())
                                 for part in (header, claims))
        return signing_input + "." + b64url(self.sign(signing_input.encode()))

    def authenticate(self, header: str | None) -> str | None:
        """The user named by a valid `Authorization: Basic` header, "" for none; None when the
        header is there but wrong (a client must not be let in anonymously by mistake)."""
        if header is None:
            return ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            username, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return username if sep and user_ok and password_ok else None


def parse_scope(scope: str) -> dict[str, Any] | None:
    """`TYPE:NAME:ACTIONS` as an access entry; the name is what lies between the first and the
    last colon (a repository name has none, but keep any the client sent)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (kind and sep and name and sep2):
        return None
    return {"type": kind, "name": name, "actions": [action for action in actions.split(",") if action]}


def error(status: int, details: str, **headers: str) -> web.Response:
    return web.json_response({"details": details}, status=status, headers=headers)


async def handle_token(request: web.Request) -> web.Response:
    issuer: Issuer = request.app["issuer"]
    if request.query.get("service") != issuer.service:
        return error(400, f"unknown service {request.query.get('service')!r}")
    user = issuer.authenticate(request.headers.get("Authorization"))
    if user is None:
        return error(401, "incorrect username or password", **{"WWW-Authenticate": 'Basic realm="token"'})
    # Clients repeat `scope` for several repositories; some join them with spaces instead.
    scopes = [scope for value in request.query.getall("scope", []) for scope in value.split()]
    access = []
    for scope in scopes:
        entry = parse_scope(scope)
        if entry is None:
            return error(400, f"malformed scope {scope!r}")
        access.append(entry)
    if not user:
        access = []
    now = int(time.time())
    token = issuer.token(user, access, now)
    print(f"token for {user or '(anonymous)'}: requested {scopes}, granted {access}", file=sys.stderr, flush=True)
    issued_at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    return web.json_response({"token": token, "access_token": token, "expires_in": issuer.expires_in,
                              "issued_at": issued_at})


async def serve(config: dict[str, Any]) -> None:
    app = web.Application()
    app["issuer"] = Issuer(config)
    app.router.add_get("/token", handle_token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        print(f"token server listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
