"""The local key provider and keyring file, through the real file system and real AES-GCM."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pluggy
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import ValidationError

from sidecrypt import PROJECT, config, hookspecs, hybrid, keyring
from sidecrypt.errors import ConfigError, CryptoError, KeyProviderError
from sidecrypt.keyring import create_key, list_keys, rotate_key
from sidecrypt.keys import CacheLimits, DataKeyService, canonical_context
from sidecrypt.plugins import local_keys
from sidecrypt.plugins.local_keys import LocalKeyOptions, LocalKeyProvider, public_jwk

CTX = {"tenant": "acme", "purpose": "users"}
MASTER = b"correct horse battery staple 0123456789"


def materials(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    return [v["material"] for k in data["keys"].values() for v in k["versions"]]


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_key(path, "app")
    return path


async def started(path: Path, name: str = "app", **opts: Any) -> LocalKeyProvider:
    block = {"provider": "local", "keyring": path.name, "reload_interval": 0, **opts}
    provider = LocalKeyProvider.create(name, block, base_dir=path.parent)
    await provider.start()
    return provider


# -- provider round trips ------------------------------------------------------------------


async def test_round_trip(ring: Path) -> None:
    provider = await started(ring)
    key = await provider.generate_data_key(CTX)
    assert len(key.plaintext) == 32 and len(key.wrapped) == 60 and key.key_version == 1
    assert await provider.decrypt_data_key(key.wrapped, 1, dict(reversed(CTX.items()))) == (
        key.plaintext
    )
    other = await provider.generate_data_key(CTX)
    assert other.plaintext != key.plaintext and other.wrapped[:12] != key.wrapped[:12]


async def test_tamper_context_version_and_key_are_rejected(ring: Path) -> None:
    create_key(ring, "other")
    provider = await started(ring)
    key = await provider.generate_data_key(CTX)
    for i in range(len(key.wrapped)):
        bad = bytearray(key.wrapped)
        bad[i] ^= 0x01
        with pytest.raises(CryptoError):
            await provider.decrypt_data_key(bytes(bad), 1, CTX)
    for ctx in ({"tenant": "evil", "purpose": "users"}, {"tenant": "acme"}, {**CTX, "x": "y"}, {}):
        with pytest.raises(CryptoError, match="does not authenticate"):
            await provider.decrypt_data_key(key.wrapped, 1, ctx)
    with pytest.raises(CryptoError, match="no version 2"):
        await provider.decrypt_data_key(key.wrapped, 2, CTX)
    with pytest.raises(CryptoError, match="length"):
        await provider.decrypt_data_key(key.wrapped[:-1], 1, CTX)
    other = await started(ring, "other")
    with pytest.raises(CryptoError):
        await other.decrypt_data_key(key.wrapped, 1, CTX)


async def test_key_defaults_to_config_name_and_can_be_renamed(ring: Path) -> None:
    provider = await started(ring, "billing", key="app")
    assert provider.key_name == "app"
    with pytest.raises(ConfigError, match="no key named 'billing'"):
        await started(ring, "billing")


async def test_through_data_key_service(ring: Path) -> None:
    provider = await started(ring)
    service = DataKeyService({"app": provider}, CacheLimits(max_uses=2))
    ctx = canonical_context(CTX)
    enc = await service.for_encrypt("app", ctx)
    nonce = os.urandom(12)
    ct = enc.aead.encrypt(nonce, b"secret", None)
    dec = await service.for_decrypt("app", enc.wrapped, enc.key_version, ctx)
    assert dec.decrypt(nonce, ct, None) == b"secret"


# -- rotation and reload -------------------------------------------------------------------


async def test_rotation_old_versions_decrypt_new_data_uses_newest(ring: Path) -> None:
    provider = await started(ring)
    v1 = await provider.generate_data_key(CTX)
    info = rotate_key(ring, "app")
    assert info["version"] == 2 and info["previous"] == 1
    v2 = await provider.generate_data_key(CTX)  # picked up from the file, no restart
    assert (v1.key_version, v2.key_version) == (1, 2)
    assert await provider.decrypt_data_key(v1.wrapped, 1, CTX) == v1.plaintext
    assert await provider.decrypt_data_key(v2.wrapped, 2, CTX) == v2.plaintext
    with pytest.raises(CryptoError):  # a version number is bound into the wrap
        await provider.decrypt_data_key(v2.wrapped, 1, CTX)
    info = await provider.rotate()
    assert info["version"] == 3
    assert (await provider.generate_data_key(CTX)).key_version == 3
    assert provider.describe()["primary"] == 3
    assert [v["version"] for v in list_keys(ring)[0]["versions"]] == [1, 2, 3]


async def test_reload_is_checked_at_most_once_per_interval(ring: Path) -> None:
    provider = await started(ring, reload_interval=3600)
    rotate_key(ring, "app")
    # Within the interval the file is not looked at: still version 1.
    assert (await provider.generate_data_key(CTX)).key_version == 1
    # Data wrapped by another instance under the new version forces a reload on decrypt.
    other = await started(ring)
    v2 = await other.generate_data_key(CTX)
    assert await provider.decrypt_data_key(v2.wrapped, 2, CTX) == v2.plaintext
    assert (await provider.generate_data_key(CTX)).key_version == 2


# -- file safety ---------------------------------------------------------------------------


async def test_group_or_world_accessible_keyring_is_refused(ring: Path) -> None:
    for mode in (0o644, 0o640, 0o604, 0o620):
        ring.chmod(mode)
        with pytest.raises(ConfigError) as err:
            await started(ring)
        assert str(ring) in str(err.value) and f"{mode:04o}" in str(err.value)
        assert "chmod 600" in str(err.value)
        with pytest.raises(ConfigError):
            list_keys(ring)
    ring.chmod(0o600)
    await started(ring)


async def test_permissions_loosened_while_running_fail_closed(ring: Path) -> None:
    provider = await started(ring)
    key = await provider.generate_data_key(CTX)
    ring.chmod(0o644)
    with pytest.raises(KeyProviderError, match="0644"):
        await provider.generate_data_key(CTX)
    with pytest.raises(KeyProviderError):
        await provider.decrypt_data_key(key.wrapped, 1, CTX)
    with pytest.raises(KeyProviderError):
        await provider.check_ready()
    ring.chmod(0o600)
    await provider.check_ready()
    assert await provider.decrypt_data_key(key.wrapped, 1, CTX) == key.plaintext


async def test_check_ready_raises_when_keyring_is_gone(ring: Path) -> None:
    provider = await started(ring)
    await provider.check_ready()
    ring.unlink()
    with pytest.raises(KeyProviderError, match="cannot read keyring"):
        await provider.check_ready()


def test_writes_are_atomic_and_private(ring: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    before = ring.read_bytes()
    inode = ring.stat().st_ino

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rotate_key(ring, "app")
    monkeypatch.undo()
    assert ring.read_bytes() == before  # untouched
    assert sorted(p.name for p in ring.parent.iterdir() if "tmp" in p.name) == []
    rotate_key(ring, "app")
    assert ring.stat().st_ino != inode  # replaced, not rewritten in place
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600


def test_create_refuses_overwrite_and_bad_input(ring: Path) -> None:
    before = ring.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        create_key(ring, "app")
    assert ring.read_bytes() == before
    with pytest.raises(ConfigError, match="invalid key name"):
        create_key(ring, "a:b")
    with pytest.raises(ConfigError, match="unknown key kind"):
        create_key(ring, "new", kind="des")
    with pytest.raises(ConfigError, match="no key named"):
        rotate_key(ring, "missing")


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"format": "sidecrypt-keyring", "version": 2, "keys": {}}',
        b'{"format": "sidecrypt-keyring", "version": 1, "keys": {"a": {"kind": "aes256", '
        b'"versions": [{"version": 1, "created": "x", "state": "enabled", "material": "!!"}]}}}',
    ],
)
@pytest.mark.parametrize("short", [False, True])
async def test_malformed_keyring_is_a_clear_error(
    tmp_path: Path, content: bytes, short: bool
) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content.replace(b"!!", base64.b64encode(b"k" * 16)) if short else content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="keyring"):
        await started(path, "a")


# -- master key ----------------------------------------------------------------------------


async def test_master_key_protected_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keyring.json"
    create_key(path, "app", master=MASTER)
    rotate_key(path, "app", master=MASTER)
    data = json.loads(path.read_text())
    assert data["protection"]["kdf"] == "hkdf-sha256"
    for blob in materials(path):
        assert len(base64.b64decode(blob)) == 12 + 32 + 16  # wrapped, not raw
    monkeypatch.setenv("SC_MASTER", MASTER.decode())
    provider = await started(path, master_key={"env": "SC_MASTER"})
    key = await provider.generate_data_key(CTX)
    assert key.key_version == 2
    assert provider.describe()["protected"] is True
    # master key from a file, relative to the config dir
    (tmp_path / "master.txt").write_bytes(MASTER + b"\n")
    by_file = await started(path, master_key={"file": "master.txt"})
    assert await by_file.decrypt_data_key(key.wrapped, 2, CTX) == key.plaintext
    # listing metadata needs no master key
    assert list_keys(path)[0]["primary"] == 2


async def test_wrong_or_missing_master_key_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keyring.json"
    create_key(path, "app", master=MASTER)
    monkeypatch.setenv("SC_MASTER", "this is the wrong master key")
    with pytest.raises(ConfigError, match="master key does not open"):
        await started(path, master_key={"env": "SC_MASTER"})
    with pytest.raises(ConfigError, match="master key does not open"):
        rotate_key(path, "app", master=b"x" * 32)
    with pytest.raises(ConfigError, match="master key does not open"):
        list_keys(path, master=b"x" * 32)
    with pytest.raises(ConfigError, match="protected by a master key"):
        await started(path)
    with pytest.raises(ConfigError, match="protected by a master key"):
        rotate_key(path, "app")
    monkeypatch.delenv("SC_MASTER")
    with pytest.raises(ConfigError, match="SC_MASTER is not set"):
        await started(path, master_key={"env": "SC_MASTER"})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        create_key(tmp_path / "new.json", "app", master=b"short")
    plain = tmp_path / "plain.json"
    create_key(plain, "app")
    with pytest.raises(ConfigError, match="not protected"):
        create_key(plain, "other", master=MASTER)


async def test_swapped_material_between_entries_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_key(path, "app", master=MASTER)
    create_key(path, "other", master=MASTER)
    data = json.loads(path.read_text())
    a, b = data["keys"]["app"]["versions"][0], data["keys"]["other"]["versions"][0]
    a["material"], b["material"] = b["material"], a["material"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="does not authenticate"):
        keyring.load(path, MASTER)


# -- no key bytes anywhere -----------------------------------------------------------------


async def test_key_material_never_listed_or_in_reprs(ring: Path) -> None:
    create_key(ring, "second")
    rotate_key(ring, "app")
    canaries = materials(ring)
    raw = [base64.b64decode(m) for m in canaries]
    provider = await started(ring)
    key = await provider.generate_data_key(CTX)
    loaded = keyring.load(ring)
    texts = [
        json.dumps(list_keys(ring)),
        repr(list_keys(ring)),
        repr(provider),
        repr(provider.describe()),
        json.dumps(provider.describe()),
        repr(loaded),
        repr(loaded.keys),
        repr(provider._versions),
        repr(key),
    ]
    for text in texts:
        for canary in canaries:
            assert canary not in text
        for blob in raw:
            assert blob.hex() not in text and repr(blob) not in text
        assert key.plaintext.hex() not in text and repr(key.plaintext) not in text
    listing = list_keys(ring)
    assert [k["name"] for k in listing] == ["app", "second"]
    assert listing[0]["versions"][1].keys() == {"version", "created", "state"}


# -- config and registration ---------------------------------------------------------------


def test_options_resolve_paths_and_reject_inline_secrets(tmp_path: Path) -> None:
    ctx = {"base_dir": tmp_path}
    opts = LocalKeyOptions.model_validate(
        {"provider": "local", "keyring": "k.json", "master_key": {"file": "m"}}, context=ctx
    )
    assert opts.keyring == tmp_path / "k.json"
    assert opts.master_key is not None and opts.master_key.file == tmp_path / "m"
    bads: list[dict[str, Any]] = [{"master_key": "hunter2"}, {"colour": "red"}, {"master_key": {}}]
    for bad in bads:
        with pytest.raises(ValidationError):
            LocalKeyOptions.model_validate(
                {"provider": "local", "keyring": "k.json", **bad}, context=ctx
            )
    settings = config.parse(
        {
            "upstream": {"url": "http://127.0.0.1:1"},
            "keys": {"app": {"provider": "local", "keyring": "k.json", "master_key": "hunter2"}},
        },
        file="sc.yaml",
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        config.validate_provider_options(settings, {"local": LocalKeyOptions}.get)
    assert "sc.yaml: keys.app.master_key" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_registered_through_the_hook() -> None:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(local_keys)
    types = [cls for batch in pm.hook.sidecrypt_key_provider_types() for cls in batch]
    assert types == [LocalKeyProvider]
    assert LocalKeyProvider.type_name == "local"
    impl = pm.hook.sidecrypt_key_provider_types.get_hookimpls()[0]
    assert impl.trylast


# -- asymmetric keys and the hybrid format ---------------------------------------------------


@pytest.fixture(scope="module")
def asym_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("asym") / "keyring.json"
    create_key(path, "rsa", kind="rsa3072")
    create_key(path, "ec", kind="p256")
    create_key(path, "app")
    return path


@pytest.fixture
def asym(asym_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    path.write_bytes(asym_template.read_bytes())
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(("name", "kty", "size"), [("rsa", "RSA", 384), ("ec", "EC", 125)])
async def test_client_wraps_with_public_jwk_provider_unwraps(
    asym: Path, name: str, kty: str, size: int
) -> None:
    provider = await started(asym, name)
    jwk = provider.public_key()
    assert jwk is not None and jwk == public_jwk(provider) == public_jwk(asym, name)
    assert jwk["kty"] == kty and jwk["kid"] == f"{name}:1" and jwk["use"] == "enc"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()  # public half only
    client_jwk = json.loads(json.dumps(jwk))  # what a client downloads
    key = hybrid.wrap_for_jwk(client_jwk, CTX)
    assert len(key.wrapped) == size and key.key_version == 1
    assert await provider.decrypt_data_key(key.wrapped, key.key_version, CTX) == key.plaintext
    # the sidecar can encrypt with the same key too
    own = await provider.generate_data_key(CTX)
    assert len(own.wrapped) == size
    assert await provider.decrypt_data_key(own.wrapped, 1, CTX) == own.plaintext
    positions = range(size) if kty == "EC" else (0, 1, 100, size - 1)
    for i in positions:
        bad = bytearray(key.wrapped)
        bad[i] ^= 0x80
        with pytest.raises(CryptoError):
            await provider.decrypt_data_key(bytes(bad), 1, CTX)
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(key.wrapped[:-1], 1, CTX)


async def test_ecdh_wrap_is_bound_to_context_and_kid(asym: Path) -> None:
    provider = await started(asym, "ec")
    jwk = public_jwk(provider)
    key = hybrid.wrap_for_jwk(jwk, CTX)
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(key.wrapped, 1, {"tenant": "other"})
    with pytest.raises(CryptoError):  # same public key, claimed as another version
        await provider.decrypt_data_key(
            hybrid.wrap_for_jwk({**jwk, "kid": "ec:2"}, CTX).wrapped, 1, CTX
        )


async def test_rsa_wrap_is_standard_oaep_sha256(asym: Path) -> None:
    """RSA-OAEP-256 with an empty label, as JOSE, WebCrypto and KMS produce it."""
    provider = await started(asym, "rsa")
    key = await provider.generate_data_key(CTX)
    ring = keyring.load(asym)
    material = ring.keys["rsa"].versions[1].material
    assert material is not None
    private = serialization.load_der_private_key(material, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert private.decrypt(key.wrapped, oaep) == key.plaintext
    client = private.public_key().encrypt(b"k" * 32, oaep)  # e.g. wrapped by WebCrypto
    assert await provider.decrypt_data_key(client, 1, CTX) == b"k" * 32


async def test_asymmetric_rotation_and_jwks(asym: Path) -> None:
    provider = await started(asym, "ec")
    old = hybrid.wrap_for_jwk(public_jwk(provider), CTX)
    rotate_key(asym, "ec")
    new = await provider.generate_data_key(CTX)
    assert new.key_version == 2
    assert [j["kid"] for j in provider.public_jwks()] == ["ec:2", "ec:1"]
    assert public_jwk(asym, "ec")["kid"] == "ec:2"
    assert public_jwk(asym, "ec", version=1) == provider.public_jwks()[1]
    assert await provider.decrypt_data_key(old.wrapped, 1, CTX) == old.plaintext
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(old.wrapped, 2, CTX)


async def test_symmetric_key_has_no_public_half(asym: Path) -> None:
    provider = await started(asym, "app")
    assert provider.public_key() is None and provider.public_jwks() == []
    with pytest.raises(ConfigError, match="not an asymmetric key"):
        public_jwk(provider)
    with pytest.raises(ConfigError, match="no key named"):
        public_jwk(asym, "missing")


async def test_master_protected_asymmetric_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keyring.json"
    create_key(path, "ec", kind="p256", master=MASTER)
    canary = materials(path)[0]
    with pytest.raises(ConfigError, match="protected by a master key"):
        public_jwk(path, "ec")
    jwk = public_jwk(path, "ec", master=MASTER)
    monkeypatch.setenv("SC_MASTER", MASTER.decode())
    provider = await started(path, "ec", master_key={"env": "SC_MASTER"})
    key = hybrid.wrap_for_jwk(jwk, CTX)
    assert await provider.decrypt_data_key(key.wrapped, 1, CTX) == key.plaintext
    for text in (
        json.dumps(list_keys(path)),
        repr(provider),
        json.dumps(provider.describe()),
        json.dumps(jwk),
    ):
        assert canary not in text


@pytest.mark.parametrize(
    "change",
    [
        {"kid": None},
        {"kid": "ec"},
        {"kid": "ec:0"},
        {"kty": "oct"},
        {"crv": "P-384"},
        {"alg": "ECDH-ES+A256KW"},
        {"x": "!!"},
        {"x": "AAAA"},
        {"y": None},
    ],
)
async def test_bad_jwks_are_refused(asym: Path, change: dict[str, Any]) -> None:
    jwk: dict[str, Any] = {**public_jwk(asym, "ec"), **change}
    jwk = {k: v for k, v in jwk.items() if v is not None}
    with pytest.raises(CryptoError) as err:
        hybrid.wrap_for_jwk(jwk, CTX)
    assert err.value.code == "invalid_jwk"


def test_point_off_the_curve_and_small_rsa_are_refused(asym: Path) -> None:
    jwk = public_jwk(asym, "ec")
    y = bytearray(base64.urlsafe_b64decode(jwk["y"] + "="))
    y[-1] ^= 1
    off = {**jwk, "y": base64.urlsafe_b64encode(bytes(y)).rstrip(b"=").decode()}
    with pytest.raises(CryptoError, match="invalid public JWK"):
        hybrid.wrap_for_jwk(off, CTX)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(CryptoError, match="too small"):
        hybrid.wrap_for_jwk(hybrid.to_jwk(small, "rsa:1"), CTX)
