"""The ``local`` key provider: key-encryption keys from a keyring file (see sidecrypt.keyring).

Config: ``keys.<name>: {provider: local, keyring: PATH, key: NAME, master_key: {env: VAR}}``.
``keyring`` is relative to the config file's directory; ``key`` defaults to the config name.

Wrapped data key for an ``aes256`` key: nonce(12) || ciphertext(32) || tag(16), AES-256-GCM
under the key version named by the envelope, with AAD = :func:`wrap_aad` ("A256GCM", kid,
context). A keyring rewritten by ``sidecrypt keys rotate`` is picked up without a restart: the
file is checked at most once per ``reload_interval`` seconds (mtime, inode, size and mode).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import Field, ValidationInfo, field_validator

from .. import hookimpl, keyring
from ..config import SecretRef
from ..errors import ConfigError, CryptoError, KeyProviderError, SidecryptError
from ..keyring import KeyEntry, lp
from ..keys import DataKey, KeyProvider, ProviderOptions

_WRAP_TAG = "sidecrypt wrap v1"


def wrap_aad(alg: str, kid: str, context: Mapping[str, str]) -> bytes:
    """AAD of a wrapped data key: length-prefixed (u16 BE) tag, alg, kid, then sorted pairs."""
    return lp(_WRAP_TAG, alg, kid) + b"".join(lp(k, v) for k, v in sorted(context.items()))


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

    __slots__ = ("aead", "kid", "state", "version")

    def __init__(self, key: str, version: int, state: str, material: bytes) -> None:
        self.kid = f"{key}:{version}"
        self.version = version
        self.state = state
        self.aead = AESGCM(material)

    def __repr__(self) -> str:
        return f"_Version({self.kid!r}, {self.state})"


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
        if entry.kind != "aes256":
            raise ConfigError(f"key {entry.name!r} has unsupported kind {entry.kind!r}")
        if len(ver.material) != 32:
            raise ConfigError(
                f"key {entry.name!r} version {number}: AES-256 material must be 32 bytes",
                file=str(self.path),
            )
        return _Version(entry.name, number, ver.state, ver.material)

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
        await asyncio.to_thread(self._load)
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
        nonce = os.urandom(12)
        wrapped = nonce + ver.aead.encrypt(nonce, plaintext, wrap_aad("A256GCM", ver.kid, context))
        return DataKey(plaintext, wrapped, ver.version)

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
        if len(wrapped) != 60:
            raise CryptoError(f"key {self.name!r}: wrapped data key has the wrong length")
        try:
            return ver.aead.decrypt(
                wrapped[:12], wrapped[12:], wrap_aad("A256GCM", ver.kid, context)
            )
        except InvalidTag:
            raise CryptoError(
                f"key {self.name!r} version {key_version}: wrapped data key does not "
                "authenticate (tampered, or another key or context)"
            ) from None

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


@hookimpl(trylast=True)
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:
    return [LocalKeyProvider]
