"""Built-in JWKS plugin: ``GET /.well-known/sidecrypt/keys`` on the admin listener.

Publishes the public half of every configured asymmetric key (providers with a
``public_jwks()`` method: the ``local`` provider's ``rsa3072`` and ``p256`` keys), so a client
that cannot call a key service can wrap a data key itself and send a field the sidecar opens
on a request ``decrypt`` rule. How a client builds that field: docs/hybrid.md.

Each JWK's ``kid`` is ``"<config key name>:<version>"``: exactly the key name and version the
field envelope must carry, because the proxy finds the provider by the envelope's key name
(``keys.<name>`` in the config), not by the key's name inside its keyring. ``sidecrypt_provider``
names the provider type the envelope carries. A P-256 wrap also binds the kid (in its AAD), and
the provider checks it against its keyring kid, so a P-256 key whose config name differs from
its keyring name is left out (with a warning): clients could not produce a wrap it opens.

KMS RSA keys (``ENCRYPT_DECRYPT``) are published from GetPublicKey with kid ``<name>:1``; the
provider unwraps client-made data keys through KMS ``Decrypt`` (RSAES_OAEP_SHA_256).
Only enabled versions of keys whose provider is ready are listed; the answer may be cached for
``MAX_AGE`` seconds, well inside the time an old version stays enabled after a rotation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from .. import appkeys, hookimpl
from ..config import Settings
from ..errors import SidecryptError
from ..hybrid import ALG_ECDH

log = logging.getLogger(__name__)

PATH = "/.well-known/sidecrypt/keys"
MAX_AGE = 60
CHECK_TIMEOUT = 2.0
PROVIDER_MEMBER = "sidecrypt_provider"
_KID_BOUND = frozenset({ALG_ECDH})  # wraps whose AAD binds the kid


async def publishable(name: str, provider: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(JWKs under config name ``name``, reasons for versions left out) of one provider."""
    public_jwks = getattr(provider, "public_jwks", None)
    if not callable(public_jwks):
        return [], []
    try:
        listed = public_jwks()  # sync (local keyring) or async (KMS GetPublicKey)
        if inspect.isawaitable(listed):
            listed = await listed
    except SidecryptError as exc:
        return [], [f"key {name!r}: public key unavailable: {exc.message}"]
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for jwk in listed:
        kid = jwk.get("kid")
        own, _, version = kid.rpartition(":") if isinstance(kid, str) else ("", "", "")
        if not own or not version.isdigit():
            skipped.append(f"key {name!r}: the provider gave a JWK without a '<key>:<version>' kid")
            continue
        if own != name and jwk.get("alg") in _KID_BOUND:
            skipped.append(
                f"key {name!r} version {version}: {jwk.get('alg')} binds the kid, and the "
                f"keyring names this key {own!r}; name the config key {own!r} to publish it"
            )
            continue
        out.append({**jwk, "kid": f"{name}:{version}", PROVIDER_MEMBER: provider.type_name})
    return out, skipped


class Jwks:
    """One proxy app's JWKS endpoint; reads that app's providers at request time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._warned: set[str] = set()

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("JWKS: %s", message)

    async def _ready(self, name: str, provider: Any) -> bool:
        """A key whose provider cannot serve (unreadable keyring, ...) is not published."""
        try:
            await asyncio.wait_for(provider.check_ready(), CHECK_TIMEOUT)
        except (SidecryptError, TimeoutError, OSError) as exc:
            detail = exc.message if isinstance(exc, SidecryptError) else type(exc).__name__
            log.warning("JWKS: key %s left out, provider not ready: %s", name, detail)
            return False
        return True

    async def document(self) -> dict[str, list[dict[str, Any]]]:
        """``{"keys": [...]}``: config order, newest version first within a key."""
        keys: list[dict[str, Any]] = []
        providers: Mapping[str, Any] = self.app[appkeys.KEYS].providers
        for name, provider in providers.items():
            if not callable(getattr(provider, "public_jwks", None)):
                continue
            if not await self._ready(name, provider):
                continue
            jwks, skipped = await publishable(name, provider)
            for reason in skipped:
                self._warn(reason)
            keys.extend(jwks)
        return {"keys": keys}

    async def handle(self, request: web.Request) -> web.Response:
        return web.json_response(
            await self.document(),
            headers={"Cache-Control": f"public, max-age={MAX_AGE}"},
        )

    async def startup(self, app: web.Application) -> AsyncIterator[None]:
        """After the providers start: say once which asymmetric keys cannot be published."""
        for name, provider in app[appkeys.KEYS].providers.items():
            for reason in (await publishable(name, provider))[1]:
                self._warn(reason)
        yield


JWKS: web.AppKey[Jwks] = web.AppKey("sidecrypt.jwks", Jwks)


@hookimpl(trylast=True)
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    admin = app.get(appkeys.ADMIN)
    if admin is None or appkeys.KEYS not in app:
        return
    jwks = Jwks(app)
    app[JWKS] = jwks
    app.cleanup_ctx.append(jwks.startup)  # runs after the proxy's lifespan started providers
    admin.router.add_get(PATH, jwks.handle)
