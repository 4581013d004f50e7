"""The ``local`` key provider: key-encryption keys from a keyring file (see sidecrypt.keyring).

Config: ``keys.<name>: {provider: local, keyring: PATH, key: NAME, master_key: {env: VAR}}``.
``keyring`` is relative to the config file's directory; ``key`` defaults to the config name.

Wrapped data key for an ``aes256`` key: nonce(12) || ciphertext(32) || tag(16), AES-256-GCM
under the key version named by the envelope, with AAD = :func:`sidecrypt.hybrid.wrap_aad`
("A256GCM", kid, context). ``rsa3072`` and ``p256`` keys use the public-key layouts documented in
:mod:`sidecrypt.hybrid`: clients wrap with the public JWK, the provider unwraps (and can also wrap
itself). A keyring rewritten by ``sidecrypt keys rotate`` is picked up without a restart: the
file is checked at most once per ``reload_interval`` seconds (mtime, inode, size and mode).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import Field, ValidationInfo, field_validator

from .. import hookimpl, hybrid, keyring
from ..config import SecretRef
from ..errors import ConfigError, CryptoError, KeyProviderError, SidecryptError
from ..hybrid import ALG_AES, wrap_aad
from ..keyring import KeyEntry
from ..keys import DataKey, KeyProvider, ProviderOptions

__all__ = ["LocalKeyOptions", "LocalKeyProvider", "public_jwk", "wrap_aad"]


def _base_dir(info: ValidationInfo) -> Path | None:
    base = (info.context or {}).get("base_dir")
    return Path(base) if base is not None else None


class LocalKeyOptions(ProviderOptions):
    provider: Literal["local"] = "local"
    keyring: Path
    key: str | None = None
    master_key: SecretRef | None = None
    reload_interval: float = Field(1.0, ge=0)

    @field_validator("keyring")
    @classmethod
    def _relative_keyring(cls, value: Path, info: ValidationInfo) -> Path:
        base = _base_dir(info)
        return value if value.is_absolute() or base is None else base / value

    @field_validator("master_key", mode="before")
    @classmethod
    def _not_inline(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("secrets must be {env: NAME} or {file: PATH}, never inline")
        return value

    @field_validator("master_key")
    @classmethod
    def _relative_secret(cls, value: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        base = _base_dir(info)
        if value is not None and value.file is not None and not value.file.is_absolute() and base:
            return value.model_copy(update={"file": base / value.file})
        return value


class _Version:
    """Usable key material for one version; nothing secret in the repr."""

    __slots__ = ("aead", "kid", "kind", "private", "state", "version")

    def __init__(self, key: str, kind: str, version: int, state: str, material: bytes) -> None:
        self.kid = f"{key}:{version}"
        self.kind = kind
        self.version = version
        self.state = state
        self.aead: AESGCM | None = None
        self.private: hybrid.PrivateKey | None = None
        if kind == "aes256":
            if len(material) != 32:
                raise ValueError("AES-256 material must be 32 bytes")
            self.aead = AESGCM(material)
            return
        private = serialization.load_der_private_key(material, password=None)
        rsa_ok = isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
        ec_ok = isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            private.curve, ec.SECP256R1
        )
        if (kind == "rsa3072" and rsa_ok) or (kind == "p256" and ec_ok):
            self.private = private  # type: ignore[assignment]  # narrowed by the checks above
        if self.private is None:
            raise ValueError(f"material is not a {kind} private key")

    def __repr__(self) -> str:
        return f"_Version({self.kid!r}, {self.kind}, {self.state})"

    def public_jwk(self) -> dict[str, str] | None:
        if self.private is None:
            return None
        return hybrid.to_jwk(self.private.public_key(), self.kid)

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        if self.aead is not None:
            nonce = os.urandom(12)
            return nonce + self.aead.encrypt(nonce, data_key, wrap_aad(ALG_AES, self.kid, context))
        assert self.private is not None
        return hybrid.wrap(self.private.public_key(), self.kid, data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if self.aead is None:
            assert self.private is not None
            return hybrid.unwrap(self.private, self.kid, wrapped, context)
        if len(wrapped) != 60:
            raise CryptoError(f"key {self.kid}: wrapped data key has the wrong length")
        try:
            return self.aead.decrypt(
                wrapped[:12], wrapped[12:], wrap_aad(ALG_AES, self.kid, context)
            )
        except InvalidTag:
            raise CryptoError(
                f"key {self.kid}: wrapped data key does not authenticate "
                "(tampered, or another key or context)"
            ) from None


class LocalKeyProvider:
    """One named key of a local keyring file."""

    type_name: ClassVar[str] = "local"
    options_model: ClassVar[type[ProviderOptions]] = LocalKeyOptions

    def __init__(self, name: str, options: LocalKeyOptions) -> None:
        self.name = name
        self.options = options
        self.path = options.keyring
        self.key_name = options.key or name
        self._master: bytes | None = None
        self._entry: KeyEntry | None = None
        self._versions: dict[int, _Version] = {}
        self._primary: _Version | None = None
        self._protected = False
        self._sig: tuple[int, ...] | None = None
        self._next_check = 0.0
        self._error: SidecryptError | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LocalKeyProvider({self.name!r}, key={self.key_name!r}, keyring={str(self.path)!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> LocalKeyProvider:
        if not isinstance(options, LocalKeyOptions):
            options = LocalKeyOptions.model_validate(options, context={"base_dir": base_dir})
        elif not options.keyring.is_absolute():
            options = options.model_copy(update={"keyring": base_dir / options.keyring})
        return cls(name, options)

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        """Read the keyring (blocking; run in a thread) and swap in the new versions at once."""
        st = keyring.check_file(self.path)
        ring = keyring.load(self.path, self._master)
        entry = ring.keys.get(self.key_name)
        if entry is None:
            raise ConfigError(f"no key named {self.key_name!r} in the keyring", file=str(self.path))
        versions = {n: self._make_version(entry, n) for n in entry.versions}
        primary = versions[entry.primary.version]
        self._entry, self._versions, self._primary = entry, versions, primary
        self._protected = ring.protected
        self._sig = _signature(st)
        self._error = None

    def _make_version(self, entry: KeyEntry, number: int) -> _Version:
        ver = entry.versions[number]
        assert ver.material is not None
        try:
            return _Version(entry.name, entry.kind, number, ver.state, ver.material)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"key {entry.name!r} version {number}: {exc}", file=str(self.path)
            ) from None

    async def _refresh(self, *, force: bool = False) -> None:
        """Reload if the file changed; at most once per interval unless forced. Fails closed."""
        now = time.monotonic()
        if not force and now < self._next_check:
            if self._error is not None:
                raise self._error
            return
        self._next_check = now + self.options.reload_interval
        async with self._lock:
            try:
                st = keyring.check_file(self.path)
                if _signature(st) != self._sig:
                    await asyncio.to_thread(self._load)
                self._error = None
            except SidecryptError as exc:
                self._error = KeyProviderError(f"key {self.name!r}: {exc.message}")
                raise self._error from None

    # -- KeyProvider ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.options.master_key is not None:
            self._master = self.options.master_key.resolve()
        try:
            await asyncio.to_thread(self._load)
        except ConfigError as exc:  # name the setting too, not only the keyring's own path
            raise ConfigError(exc.message, path=f"keys.{self.name}.keyring") from None
        self._next_check = time.monotonic() + self.options.reload_interval

    async def close(self) -> None:
        self._versions, self._primary, self._entry, self._master = {}, None, None, None
        self._sig = None

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        await self._refresh()
        ver = self._primary
        if ver is None:
            raise KeyProviderError(f"key {self.name!r}: provider not started")
        plaintext = os.urandom(32)
        return DataKey(plaintext, ver.wrap(plaintext, context), ver.version)

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        await self._refresh()
        ver = self._versions.get(key_version)
        if ver is None:
            await self._refresh(force=True)  # a rotation may have just happened
            ver = self._versions.get(key_version)
        if ver is None:
            raise CryptoError(f"key {self.name!r} has no version {key_version}")
        if ver.state != "enabled":
            raise CryptoError(f"key {self.name!r} version {key_version} is disabled")
        return ver.unwrap(wrapped, context)

    async def esdk_wrapping_keys(self, *, all_versions: bool) -> list[AESGCM]:
        """AES-256 material for the ESDK raw AES keyring: the primary version first, then
        (to unwrap) the other enabled ones."""
        await self._refresh()
        primary = self._primary
        if primary is None:
            raise KeyProviderError(f"key {self.name!r}: provider not started")
        if primary.aead is None:
            raise CryptoError(f"key {self.name!r}: only aes256 keys can write ESDK messages")
        out = [primary.aead]
        if all_versions:
            for number in sorted(self._versions, reverse=True):
                ver = self._versions[number]
                if ver is not primary and ver.aead is not None and ver.state == "enabled":
                    out.append(ver.aead)
        return out

    def public_key(self) -> dict[str, str] | None:
        """The primary version's public JWK (None for a symmetric key)."""
        return self._primary.public_jwk() if self._primary is not None else None

    def public_jwks(self) -> list[dict[str, str]]:
        """Public JWKs of every enabled version, newest first (for a JWKS document)."""
        out = []
        for number in sorted(self._versions, reverse=True):
            ver = self._versions[number]
            jwk = ver.public_jwk() if ver.state == "enabled" else None
            if jwk is not None:
                out.append(jwk)
        return out

    async def check_ready(self) -> None:
        await self._refresh(force=True)
        if not os.access(self.path, os.R_OK):
            raise KeyProviderError(f"key {self.name!r}: keyring {self.path} is not readable")

    async def rotate(self) -> dict[str, Any]:
        """Add a new key version to the keyring file and use it from now on."""
        try:
            info = await asyncio.to_thread(
                keyring.rotate_key, self.path, self.key_name, master=self._master
            )
        finally:
            await self._refresh(force=True)
        return info

    def describe(self) -> dict[str, Any]:
        entry = self._entry
        out: dict[str, Any] = {
            "name": self.name,
            "provider": self.type_name,
            "keyring": str(self.path),
            "key": self.key_name,
            "protected": self._protected,
        }
        if entry is not None:
            info = entry.info()
            out.update(kind=info["kind"], primary=info["primary"], versions=info["versions"])
        return out


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mtime_ns, st.st_ino, st.st_size, st.st_mode)


def public_jwk(
    source: LocalKeyProvider | str | Path,
    name: str | None = None,
    *,
    master: bytes | None = None,
    version: int | None = None,
) -> dict[str, str]:
    """The public JWK of an asymmetric key: from a started provider, or from a keyring file.

    Reading the file needs the master key when the keyring is protected (the private key is
    stored wrapped). ``version`` defaults to the primary version.
    """
    if isinstance(source, LocalKeyProvider):
        versions = source._versions
        number = version or (source._primary.version if source._primary else 0)
        label = source.name
    else:
        ring = keyring.load(source, master)
        if name is None or name not in ring.keys:
            raise ConfigError(f"no key named {name!r}", file=str(source))
        entry = ring.keys[name]
        number = version or entry.primary.version
        if number not in entry.versions:
            raise ConfigError(f"key {name!r} has no version {number}", file=str(source))
        ver = entry.versions[number]
        assert ver.material is not None
        versions = {number: _Version(name, entry.kind, number, ver.state, ver.material)}
        label = name
    jwk = versions[number].public_jwk() if number in versions else None
    if jwk is None:
        raise ConfigError(f"key {label!r} version {number} is not an asymmetric key")
    return jwk


@hookimpl(trylast=True)
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:
    return [LocalKeyProvider]
