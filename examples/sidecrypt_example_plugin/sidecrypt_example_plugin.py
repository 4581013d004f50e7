"""An example third-party sidecrypt plugin.

- an ``env`` key provider: a key-encryption key from an environment variable (base64, 32 bytes);
  fine for a demo, use ``local`` or ``kms`` in production;
- an identity source: the ``X-Api-Key`` header mapped to a principal;
- a config check that prints a note.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt import hookimpl
from sidecrypt.config import Settings
from sidecrypt.errors import CryptoError, KeyProviderError
from sidecrypt.identity import Principal
from sidecrypt.keys import DataKey, KeyProvider, ProviderOptions, canonical_context
from sidecrypt.proxy.incoming import RequestView


class EnvKeyOptions(ProviderOptions):
    variable: str


def _aad(name: str, context: Mapping[str, str]) -> bytes:
    parts = [name, *(f"{k}={v}" for k, v in canonical_context(context))]
    return b"\x00".join(p.encode() for p in parts)


class EnvKeyProvider:
    type_name: ClassVar[str] = "env"
    options_model: ClassVar[type[ProviderOptions]] = EnvKeyOptions

    def __init__(self, name: str, options: EnvKeyOptions) -> None:
        self.name = name
        self.options = options
        self._kek: AESGCM | None = None

    def __repr__(self) -> str:
        return f"EnvKeyProvider(name={self.name!r}, variable={self.options.variable!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> EnvKeyProvider:
        return cls(name, options)

    async def start(self) -> None:
        raw = base64.b64decode(os.environ.get(self.options.variable, ""))
        if len(raw) != 32:
            raise KeyProviderError(f"{self.options.variable} must hold 32 bytes, base64")
        self._kek = AESGCM(raw)

    async def close(self) -> None:
        self._kek = None

    def _require(self) -> AESGCM:
        if self._kek is None:
            raise KeyProviderError(f"key {self.name!r} is not started")
        return self._kek

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        plaintext = AESGCM.generate_key(256)
        nonce = os.urandom(12)
        wrapped = nonce + self._require().encrypt(nonce, plaintext, _aad(self.name, context))
        return DataKey(plaintext, wrapped, key_version=1)

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        try:
            return self._require().decrypt(wrapped[:12], wrapped[12:], _aad(self.name, context))
        except InvalidTag:
            raise CryptoError(
                f"key {self.name!r}: wrapped data key does not authenticate"
            ) from None

    async def check_ready(self) -> None:
        self._require()

    def describe(self) -> dict[str, Any]:
        return {"provider": self.type_name, "variable": self.options.variable}


@hookimpl
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:
    return [EnvKeyProvider]


@hookimpl
def sidecrypt_identify(request: RequestView) -> Principal | None:
    api_key = request.headers.get("X-Api-Key")
    return Principal(id=f"apikey:{api_key[:4]}", source="apikey") if api_key else None


@hookimpl
def sidecrypt_check_config(settings: Settings) -> list[str]:
    count = sum(1 for block in settings.keys.values() if block.get("provider") == "env")
    return [f"example plugin: {count} env key(s)"] if count else []
