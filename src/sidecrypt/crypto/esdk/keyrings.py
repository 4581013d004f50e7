"""Which keyring layout a configured key writes and reads, through its provider.

A local key (the provider exposes AES-256 material) is a raw AES keyring; a KMS key (the provider
knows its key ARN) is an ``aws-kms`` keyring: the EDK's provider info is the ARN and its
ciphertext the KMS CiphertextBlob, generated and decrypted with the message's full encryption
context as the SDK's KMS keyring does. Provider calls go through the data key service, which
counts and audits failures and turns unexpected ones into KeyProviderError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ... import keys
from ...errors import CryptoError
from .header import EncryptedDataKey
from .options import EsdkOptions
from .raw_aes import RawAesKeyring
from .suites import Suite

KMS_PROVIDER_ID = b"aws-kms"


@runtime_checkable
class RawAesSource(Protocol):
    """A provider holding AES-256 material (the local keyring)."""

    key_name: str

    async def esdk_wrapping_keys(self, *, all_versions: bool) -> list[AESGCM]: ...


@runtime_checkable
class KmsSource(Protocol):
    """A provider backed by a symmetric KMS key."""

    async def esdk_key_arn(self) -> str: ...


def key_options(provider: keys.KeyProvider) -> tuple[str, EsdkOptions]:
    """(format, ESDK options) of a configured key."""
    opts = getattr(provider, "options", None)
    if isinstance(opts, keys.ProviderOptions):
        return opts.format, opts.esdk
    return "sc1", EsdkOptions()


async def _raw_ring(
    service: keys.DataKeyService, provider: RawAesSource, opts: EsdkOptions, *, all_versions: bool
) -> RawAesKeyring:
    op = "decrypt_data_key" if all_versions else "generate_data_key"
    call = provider.esdk_wrapping_keys(all_versions=all_versions)
    wrapping: list[AESGCM] = await service._call(provider, op, call)  # type: ignore[arg-type]
    return RawAesKeyring(opts.namespace, opts.name or provider.key_name, wrapping)


async def wrap_new(
    service: keys.DataKeyService,
    provider: keys.KeyProvider,
    opts: EsdkOptions,
    suite: Suite,
    context: Mapping[str, str],
) -> tuple[bytes, EncryptedDataKey]:
    """A fresh data key and its EDK for ``context`` (the message's full context)."""
    if isinstance(provider, RawAesSource):
        ring = await _raw_ring(service, provider, opts, all_versions=False)
        data_key = os.urandom(suite.key_bytes)
        return data_key, ring.wrap(data_key, context)
    if isinstance(provider, KmsSource):
        arn = await service._call(provider, "generate_data_key", provider.esdk_key_arn())
        made = await service._call(
            provider, "generate_data_key", provider.generate_data_key(context)
        )
        if len(made.plaintext) != suite.key_bytes or not 0 < len(made.wrapped) <= 0xFFFF:
            raise CryptoError(f"key {provider.name!r}: provider returned a malformed data key")
        return made.plaintext, EncryptedDataKey(KMS_PROVIDER_ID, arn.encode(), made.wrapped)
    raise CryptoError(
        f"key {provider.name!r}: a {provider.type_name} key cannot write ESDK messages",
        code="esdk_unsupported",
    )


async def unwrap_one(
    service: keys.DataKeyService,
    provider: keys.KeyProvider,
    suite: Suite,
    edk: EncryptedDataKey,
    context: Mapping[str, str],
) -> bytes | None:
    """The data key if this EDK is this key's and unwraps; None if it is not this key's."""
    _, opts = key_options(provider)
    if isinstance(provider, RawAesSource):
        if edk.provider_id != opts.namespace.encode():
            return None
        ring = await _raw_ring(service, provider, opts, all_versions=True)
        return ring.unwrap(suite, (edk,), context)
    if isinstance(provider, KmsSource) and edk.provider_id == KMS_PROVIDER_ID:
        arn = await service._call(provider, "decrypt_data_key", provider.esdk_key_arn())
        if edk.provider_info != arn.encode():
            return None
        result: Any = await service._call(
            provider, "decrypt_data_key", provider.decrypt_data_key(edk.ciphertext, 0, context)
        )
        return bytes(result)
    return None
