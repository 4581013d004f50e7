"""The local keyring file: named, versioned key-encryption keys, optionally master-wrapped.

Layout (JSON, mode 0600, written atomically)::

    {"format": "sidecrypt-keyring", "version": 1,
     "protection": null | {"kdf": "hkdf-sha256", "salt": B64, "check": B64},
     "keys": {"app": {"kind": "aes256", "versions": [
         {"version": 1, "created": "2026-01-01T00:00:00Z", "state": "enabled", "material": B64}]}}}

``material`` is the raw 32-byte AES key (``aes256``) or a PKCS#8 DER private key (``rsa3072``,
``p256``). When the keyring is protected, each ``material`` is instead nonce(12) || ciphertext ||
tag(16) of AES-256-GCM under HKDF-SHA256(master, salt, "sidecrypt keyring v1"), with AAD binding
key name, version and kind so blobs cannot be swapped between entries; ``check`` is the same
construction over an empty plaintext, so a wrong master key is reported even for an empty keyring.
The master secret should be high entropy (``openssl rand -base64 32``): HKDF does not stretch
passwords. Every load refuses a file that group or others can read or write.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

Kind = Literal["aes256", "rsa3072", "p256"]
KINDS: tuple[str, ...] = ("aes256", "rsa3072", "p256")
FORMAT = "sidecrypt-keyring"
MIN_MASTER_BYTES = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_CHECK_AAD = b"sidecrypt keyring check v1"


def lp(*parts: str | bytes) -> bytes:
    """Length-prefixed concatenation (u16 big-endian length + bytes): unambiguous AAD."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += struct.pack(">H", len(raw)) + raw
    return bytes(out)


def _b64d(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def new_material(kind: str) -> bytes:
    """Fresh key material: 32 random bytes, or a PKCS#8 DER private key."""
    if kind == "aes256":
        return os.urandom(32)
    if kind == "rsa3072":
        priv: Any = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif kind == "p256":
        priv = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ConfigError(f"unknown key kind {kind!r} (use one of {', '.join(KINDS)})")
    return bytes(
        priv.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass(slots=True)
class KeyVersion:
    """One version of a key. ``material`` is the plaintext and never shows in a repr."""

    version: int
    created: str
    state: str
    stored: str = field(repr=False)
    material: bytes | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "created": self.created, "state": self.state}


@dataclass(slots=True)
class KeyEntry:
    name: str
    kind: str
    versions: dict[int, KeyVersion] = field(default_factory=dict)

    @property
    def primary(self) -> KeyVersion:
        """The newest enabled version: new data keys are wrapped under it."""
        enabled = [v for v in self.versions.values() if v.state == "enabled"]
        if not enabled:
            raise ConfigError(f"key {self.name!r} has no enabled version")
        return max(enabled, key=lambda v: v.version)

    def info(self) -> dict[str, Any]:
        versions = [self.versions[n].info() for n in sorted(self.versions)]
        enabled = [v["version"] for v in versions if v["state"] == "enabled"]
        return {
            "name": self.name,
            "kind": self.kind,
            "primary": max(enabled, default=None),
            "created": versions[0]["created"] if versions else None,
            "versions": versions,
        }


class Keyring:
    """A parsed keyring. Material is decrypted at load when a master key (if needed) is given."""

    def __init__(self, path: Path, salt: bytes | None = None, check: bytes | None = None) -> None:
        self.path = path
        self.salt = salt
        self.check = check
        self.keys: dict[str, KeyEntry] = {}
        self._aead: AESGCM | None = None

    def __repr__(self) -> str:
        return f"Keyring({str(self.path)!r}, keys={sorted(self.keys)}, protected={self.protected})"

    @property
    def protected(self) -> bool:
        return self.salt is not None

    def _fail(self, message: str) -> ConfigError:
        return ConfigError(message, file=str(self.path))

    def unlock(self, master: bytes | None) -> None:
        """Check the master key against the keyring (and for a new keyring, adopt it)."""
        if master is None:
            if self.protected:
                raise self._fail("the keyring is protected by a master key; none was given")
            return
        if len(master) < MIN_MASTER_BYTES:
            raise self._fail(f"the master key must be at least {MIN_MASTER_BYTES} bytes")
        if not self.protected:
            if self.keys:
                raise self._fail("a master key was given but the keyring is not protected")
            self.salt = os.urandom(16)
            self._aead = self._derive(master)
            nonce = os.urandom(12)
            self.check = nonce + self._aead.encrypt(nonce, b"", _CHECK_AAD)
            return
        aead = self._derive(master)
        assert self.check is not None
        try:
            aead.decrypt(self.check[:12], self.check[12:], _CHECK_AAD)
        except (InvalidTag, ValueError):
            raise self._fail("the master key does not open this keyring (wrong key?)") from None
        self._aead = aead

    def _derive(self, master: bytes) -> AESGCM:
        assert self.salt is not None
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=self.salt, info=b"sidecrypt keyring v1"
        )
        return AESGCM(hkdf.derive(master))

    def _aad(self, name: str, kind: str, version: int) -> bytes:
        return lp("sidecrypt keyring material v1", name, kind, str(version))

    def open_material(self, entry: KeyEntry, ver: KeyVersion) -> bytes:
        try:
            raw = _b64d(ver.stored)
        except ValueError as exc:
            raise self._fail(f"key {entry.name!r} version {ver.version}: {exc}") from None
        if self._aead is None:
            return raw
        try:
            return self._aead.decrypt(
                raw[:12], raw[12:], self._aad(entry.name, entry.kind, ver.version)
            )
        except (InvalidTag, ValueError):
            raise self._fail(
                f"key {entry.name!r} version {ver.version}: material does not "
                "authenticate under the master key"
            ) from None

    def add_version(self, name: str, kind: str) -> KeyVersion:
        if self.protected and self._aead is None:
            raise self._fail("the keyring is protected by a master key; none was given")
        entry = self.keys.setdefault(name, KeyEntry(name, kind))
        number = max(entry.versions, default=0) + 1
        material = new_material(kind)
        if self._aead is not None:
            nonce = os.urandom(12)
            stored = _b64e(
                nonce + self._aead.encrypt(nonce, material, self._aad(name, kind, number))
            )
        else:
            stored = _b64e(material)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ver = KeyVersion(number, created, "enabled", stored, material)
        entry.versions[number] = ver
        return ver

    def to_json(self) -> dict[str, Any]:
        protection = None
        if self.salt is not None and self.check is not None:
            protection = {
                "kdf": "hkdf-sha256",
                "salt": _b64e(self.salt),
                "check": _b64e(self.check),
            }
        keys = {
            e.name: {
                "kind": e.kind,
                "versions": [
                    {
                        "version": v.version,
                        "created": v.created,
                        "state": v.state,
                        "material": v.stored,
                    }
                    for v in (e.versions[n] for n in sorted(e.versions))
                ],
            }
            for e in self.keys.values()
        }
        return {"format": FORMAT, "version": 1, "protection": protection, "keys": keys}


def check_file(path: Path) -> os.stat_result:
    """Stat the keyring and refuse it if it is not a private regular file."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read keyring: {exc.strerror}", file=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("keyring is not a regular file", file=str(path))
    if st.st_mode & 0o077:
        raise ConfigError(
            f"keyring mode is {stat.S_IMODE(st.st_mode):04o}: group/others may access it; "
            f"refusing to use it (run: chmod 600 {path})",
            file=str(path),
        )
    return st


def parse(path: Path, data: Any) -> Keyring:
    """Validate the JSON structure; errors name the file and the entry, never a value."""

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"malformed keyring: {msg}", file=str(path))

    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
        raise fail("not a sidecrypt keyring (format/version)")
    prot = data.get("protection")
    try:
        if prot is None:
            ring = Keyring(path)
        elif isinstance(prot, dict) and prot.get("kdf") == "hkdf-sha256":
            ring = Keyring(path, _b64d(prot.get("salt")), _b64d(prot.get("check")))
        else:
            raise fail("unknown protection")
    except ValueError as exc:
        raise fail(f"protection: {exc}") from None
    keys = data.get("keys")
    if not isinstance(keys, dict):
        raise fail("keys must be a mapping")
    for name, body in keys.items():
        if not _NAME.match(name) or not isinstance(body, dict) or body.get("kind") not in KINDS:
            raise fail(f"key {name!r}: bad name or kind")
        entry = KeyEntry(name, body["kind"])
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions:
            raise fail(f"key {name!r}: versions must be a non-empty list")
        for item in versions:
            ok = (
                isinstance(item, dict)
                and type(item.get("version")) is int
                and item["version"] >= 1
                and item["version"] not in entry.versions
                and isinstance(item.get("created"), str)
                and item.get("state") in ("enabled", "disabled")
                and isinstance(item.get("material"), str)
            )
            if not ok:
                raise fail(f"key {name!r}: bad version entry")
            entry.versions[item["version"]] = KeyVersion(
                item["version"], item["created"], item["state"], item["material"]
            )
        ring.keys[name] = entry
    return ring


def load(path: str | Path, master: bytes | None = None, *, material: bool = True) -> Keyring:
    """Read and validate a keyring; with ``material`` also unwrap every key's material."""
    path = Path(path)
    check_file(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read keyring: {exc.strerror}", file=str(path)) from None
    except ValueError:
        raise ConfigError("malformed keyring: not JSON", file=str(path)) from None
    ring = parse(path, data)
    if material or master is not None:
        ring.unlock(master)
    if material:
        for entry in ring.keys.values():
            for ver in entry.versions.values():
                ver.material = ring.open_material(entry, ver)
    return ring


def save(ring: Keyring) -> None:
    """Write atomically: a 0600 temp file in the same directory, fsync, then os.replace."""
    path = ring.path
    payload = json.dumps(ring.to_json(), indent=2).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of concurrent ``keys`` commands."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"invalid key name {name!r}: use letters, digits, '_', '.', '-'")


def create_key(
    path: str | Path, name: str, *, master: bytes | None = None, kind: str = "aes256"
) -> dict[str, Any]:
    """Add a new key (version 1), creating the keyring file if needed. Never overwrites."""
    path = Path(path)
    _check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"unknown key kind {kind!r} (use one of {', '.join(KINDS)})")
    with _locked(path):
        if path.exists():
            ring = load(path, master, material=False)
            if name in ring.keys:
                raise ConfigError(f"key {name!r} already exists (use rotate)", file=str(path))
        else:
            ring = Keyring(path)
            ring.unlock(master)
        ver = ring.add_version(name, kind)
        save(ring)
    return {
        "name": name,
        "kind": kind,
        "version": ver.version,
        "created": ver.created,
        "keyring": str(path),
        "protected": ring.protected,
    }


def rotate_key(path: str | Path, name: str, *, master: bytes | None = None) -> dict[str, Any]:
    """Add version n+1 of a key; it becomes the primary. Older versions keep decrypting."""
    path = Path(path)
    with _locked(path):
        ring = load(path, master, material=False)
        entry = ring.keys.get(name)
        if entry is None:
            raise ConfigError(f"no key named {name!r}", file=str(path))
        previous = entry.primary.version
        ver = ring.add_version(name, entry.kind)
        save(ring)
    return {
        "name": name,
        "kind": entry.kind,
        "version": ver.version,
        "previous": previous,
        "created": ver.created,
        "keyring": str(path),
    }


def list_keys(path: str | Path, *, master: bytes | None = None) -> list[dict[str, Any]]:
    """Names, kinds, versions, creation times and states; never key material.

    Metadata is not encrypted, so listing a protected keyring needs no master key; a master key
    that is given is checked.
    """
    ring = load(path, master, material=False)
    return [ring.keys[n].info() | {"protected": ring.protected} for n in sorted(ring.keys)]
