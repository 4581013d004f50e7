"""Field values as ESDK messages, through the configured key providers.

Like the ``sc1`` path, one data key serves many fields within the data key limits (the ESDK's
caching CMM does the same); each message still gets a fresh 32-byte message id, so every
message has its own content key and commitment. A local key wraps in the raw AES keyring
layout, a KMS key is an ``aws-kms`` EDK (provider info = key ARN, ciphertext = KMS
CiphertextBlob, generated and decrypted with the message's full encryption context).
Unwrapped data keys are cached by (key, EDK, context) with the decrypt TTL. Every failure to
read a message is one :class:`EsdkError`; a provider outage stays a KeyProviderError (503).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial

from ... import keys
from ...errors import CryptoError, SidecryptError
from ...events import AuditEvent
from . import sign
from .detect import decode
from .errors import EsdkError, fail
from .header import Header
from .keyrings import key_options, unwrap_one, wrap_new
from .message import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_EDKS,
    Materials,
    encrypt_message,
    open_message,
    parse_message,
    reconcile_context,
)
from .options import EsdkOptions
from .suites import SUITE_NAMES

FIELD_NAME = "sidecrypt-field"  # the context pair that binds a message to its field path
_RESERVED = (sign.PUBLIC_KEY_NAME, FIELD_NAME)


class _Entry:
    __slots__ = ("bytes", "context_bytes", "expires", "materials", "uses")

    def __init__(self, materials: Materials, expires: float) -> None:
        self.materials = materials
        self.context_bytes = materials.context_bytes
        self.expires = expires
        self.uses = 0
        self.bytes = 0


def encode(message: bytes) -> str:
    return binascii.b2a_base64(message, newline=False).decode("ascii")


class EsdkFields:
    """Seal and open field values as base64 ESDK messages."""

    def __init__(
        self,
        service: keys.DataKeyService,
        *,
        max_edks: int = DEFAULT_MAX_EDKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = service
        self.max_edks = max_edks
        self.max_bytes = max_bytes
        self._clock = clock
        self._enc: dict[tuple[str, keys.Context], _Entry] = {}
        self._dec: OrderedDict[tuple[str, bytes], tuple[bytes, float]] = OrderedDict()

    def writes_esdk(self, name: str) -> bool:
        return key_options(self.keys.provider(name))[0] == "esdk"

    # -- encrypt ----------------------------------------------------------------------------

    async def seal(self, name: str, context: keys.Context, label: str, plaintext: bytes) -> str:
        """One serialised JSON value -> one base64 message under key ``name``."""
        _, opts = key_options(self.keys.provider(name))
        if any(k in _RESERVED for k, _ in context):
            raise CryptoError("the encryption context uses a name reserved by the ESDK format")
        ctx = tuple(sorted((*context, (FIELD_NAME, label)))) if opts.bind_field else context
        entry = self._cached(name, ctx, len(plaintext))
        stats = self.keys.stats  # the sc1 cache counters: /metrics shows both formats
        if entry is not None:
            stats["encrypt_hits"] += 1
        else:
            stats["encrypt_misses"] += 1
            entry = await self.keys._single_flight(
                ("esdk-enc", name, ctx), lambda: self._generate(name, opts, ctx)
            )
            entry.uses += 1
            entry.bytes += len(plaintext)
        seal_one = partial(
            encrypt_message,
            plaintext,
            entry.materials,
            frame_length=opts.frame_length,
            context_bytes=entry.context_bytes,
        )
        if entry.materials.signing_key is None:
            return encode(seal_one())
        # ECDSA P-384 signing costs ~0.25 ms and releases the GIL: a worker thread keeps the
        # event loop serving other requests meanwhile (measured; see docs/format.md).
        return encode(await asyncio.get_running_loop().run_in_executor(None, seal_one))

    def _cached(self, name: str, ctx: keys.Context, size: int) -> _Entry | None:
        entry = self._enc.get((name, ctx))
        if entry is None:
            return None
        limits = self.keys.limits
        if (
            entry.uses >= limits.max_uses
            or entry.bytes + size > limits.max_bytes
            or self._clock() >= entry.expires
        ):
            del self._enc[(name, ctx)]
            return None
        entry.uses += 1
        entry.bytes += size
        return entry

    async def _generate(self, name: str, opts: EsdkOptions, ctx: keys.Context) -> _Entry:
        provider = self.keys.provider(name)
        suite = SUITE_NAMES[opts.suite]
        context = dict(ctx)
        signing = None
        if suite.signed:
            signing, public = sign.new_signing_key(suite)
            context[sign.PUBLIC_KEY_NAME] = public
        data_key, edk = await wrap_new(self.keys, provider, opts, suite, context)
        materials = Materials(suite, data_key, context, edk.serialise(), 1, signing)
        entry = _Entry(materials, self._clock() + self.keys.limits.max_age)
        self._enc[(name, ctx)] = entry
        while len(self._enc) > self.keys.limits.decrypt_entries:  # contexts come from requests
            del self._enc[next(iter(self._enc))]
        self.keys.audit(
            AuditEvent(
                "generate_data_key",
                key=name,
                provider=provider.type_name,
                key_version=0,
                context=dict(ctx),
                cache="miss",
            )
        )
        return entry

    # -- decrypt ----------------------------------------------------------------------------

    async def open(
        self,
        token: str,
        *,
        label: str,
        context: keys.Context | None,
        allowed: frozenset[str] | None,
    ) -> bytes:
        """Decrypt a base64 message; ``context`` (the route's, when it has one) must be the
        message's context apart from the reserved pairs; ``allowed``: key names that may open."""
        data = decode(token)
        header = parse_message(data, max_edks=self.max_edks, max_bytes=self.max_bytes)
        stored = header.context
        bound = stored.get(FIELD_NAME)
        if bound is not None and bound != label:
            raise fail()
        reproduced: dict[str, str] | None = None
        if context is not None:
            reproduced = dict(context)
            if any(k not in reproduced and k not in _RESERVED for k in stored):
                raise fail()
        full, required = reconcile_context(header, reproduced)
        data_key, _ = await self._unwrap(header, full, allowed, required)
        return await self._open(data, header, data_key, required)

    async def _open(self, data: bytes, header: Header, data_key: bytes, required: bytes) -> bytes:
        """Unsigned messages inline (~20 µs); signed ones verify (~0.6 ms, GIL released) on a
        worker thread."""
        open_one = partial(
            open_message, data, header, data_key, required=required, max_plaintext=self.max_bytes
        )
        if not header.suite.signed:
            return open_one()
        return await asyncio.get_running_loop().run_in_executor(None, open_one)

    async def open_stored(self, token: str, *, label: str) -> tuple[bytes, keys.Context, str]:
        """Decrypt under any configured key with the message's own context (rewrap): the
        plaintext, that context without the reserved pairs, and the key that opened it."""
        data = decode(token)
        header = parse_message(data, max_edks=self.max_edks, max_bytes=self.max_bytes)
        bound = header.context.get(FIELD_NAME)
        if bound is not None and bound != label:
            raise fail()
        data_key, name = await self._unwrap(header, header.context, None, b"")
        plain = await self._open(data, header, data_key, b"")
        ctx = tuple(sorted((k, v) for k, v in header.context.items() if k not in _RESERVED))
        return plain, ctx, name

    async def _unwrap(
        self,
        header: Header,
        context: Mapping[str, str],
        allowed: frozenset[str] | None,
        required: bytes,
    ) -> tuple[bytes, str]:
        """The data key from the first EDK a permitted key unwraps; cached by key, EDK and
        the full context (stored section plus required-only pairs)."""
        names = sorted(allowed if allowed is not None else self.keys.providers)
        # The public header bytes that bind the data key (EDKs and context, which can be large)
        # plus the required-only pairs, as a 32-byte digest: entries stay small.
        digests = [
            hashlib.sha256(
                b"".join(
                    (
                        len(edk.ciphertext).to_bytes(2, "big"),
                        edk.ciphertext,
                        header.section,
                        required,
                    )
                )
            ).digest()
            for edk in header.edks
        ]
        now = self._clock()
        suite = header.suite
        for digest in digests:
            for name in names:
                hit = self._dec.get((name, digest))
                if hit is not None and now < hit[1]:
                    self._dec.move_to_end((name, digest))
                    self.keys.stats["decrypt_hits"] += 1
                    return hit[0], name
        for edk, digest in zip(header.edks, digests, strict=True):
            for name in names:
                provider = self.keys.providers.get(name)
                if provider is None:
                    continue
                try:
                    data_key = await unwrap_one(self.keys, provider, suite, edk, context)
                except SidecryptError as exc:
                    # Not this key's EDK, it does not authenticate, or the provider refused this
                    # blob (KMS answers a corrupt blob with a refusal): try the next. An outage
                    # (timeout, breaker open) stays a KeyProviderError.
                    if isinstance(exc, CryptoError) or getattr(exc, "kms_code", None):
                        continue
                    raise
                if data_key is None or len(data_key) != suite.key_bytes:
                    continue
                self._remember((name, digest), data_key)
                self.keys.stats["decrypt_misses"] += 1
                self.keys.audit(
                    AuditEvent(
                        "decrypt_data_key",
                        key=name,
                        provider=provider.type_name,
                        key_version=0,
                        context={k: v for k, v in context.items() if k != sign.PUBLIC_KEY_NAME},
                        cache="miss",
                    )
                )
                return data_key, name
        raise fail()

    def _remember(self, key: tuple[str, bytes], data_key: bytes) -> None:
        limits = self.keys.limits
        self._dec[key] = (data_key, self._clock() + limits.decrypt_ttl)
        while len(self._dec) > limits.decrypt_entries:
            self._dec.popitem(last=False)
            self.keys.stats["evictions"] += 1

    def clear(self) -> None:
        self._enc.clear()
        self._dec.clear()


__all__ = ["FIELD_NAME", "EsdkError", "EsdkFields", "encode", "key_options"]
