"""KMS asymmetric (RSA) keys: public JWK from GetPublicKey, local wraps, KMS-side unwrapping.

Two KMS-compatible servers, both reached over real HTTP by the real, unpatched aiobotocore
client inside :class:`KmsKeyProvider`:

- ``moto_server`` as a subprocess (tests/kms_server.py) for everything moto implements as AWS
  does: DescribeKey, GetPublicKey (DER SubjectPublicKeyInfo of the key moto generated) and the
  symmetric calls. The JWKS and local-wrap tests run there.
- moto 5.2.5's Decrypt only understands moto's own symmetric blob format and ignores
  ``EncryptionAlgorithm``, so it cannot unwrap an RSAES-OAEP blob at all. For those tests moto
  runs in-process (``ThreadedMotoServer`` on 127.0.0.1), and this module teaches *that server*
  the real AWS behaviour it lacks: Decrypt of an RSA key with ``EncryptionAlgorithm``
  ``RSAES_OAEP_SHA_256`` (or ``_SHA_1``) decrypts with the private key moto generated for the key
  (``Key.private_key.private_key``), a blob that does not decrypt is
  ``InvalidCiphertextException``, an algorithm the key does not support is
  ``InvalidKeyUsageException`` and an ``EncryptionContext`` is refused (KMS takes one only for
  symmetric keys). The server records each RSA Decrypt it answers, so the tests can check what
  the provider actually sent. Symmetric Decrypt goes to moto unchanged. Only the server side is
  extended: the client, the provider and the wire format are the ones used against AWS.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_server import KmsServer
from sidecrypt import envelope, hybrid
from sidecrypt.errors import CryptoError, KeyProviderError
from sidecrypt.keys import DataKeyService, canonical_context
from sidecrypt.plugins.aws_kms import KmsKeyProvider, kms_key_status

CTX = {"tenant": "acme", "route": "cards"}
ALIAS = "alias/cards"
LABEL = "$.card.number"
CARD = {"number": "4111 1111 1111 1111", "cvc": 123}
RSA_KEY = {"KeySpec": "RSA_2048", "KeyUsage": "ENCRYPT_DECRYPT"}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "RSAES_OAEP_SHA_1": hashes.SHA1,
    "RSAES_OAEP_SHA_256": hashes.SHA256,
}


def _oaep(hash_cls: type[hashes.HashAlgorithm]) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hash_cls()), algorithm=hash_cls(), label=None)


# -- the two servers ------------------------------------------------------------------------------


class RsaDecryptKms(KmsServer):
    """moto in this process, with Decrypt extended to RSA keys as AWS KMS implements it."""

    def __init__(self) -> None:
        super().__init__()
        self.rsa_decrypts: list[dict[str, Any]] = []
        self._server: Any = None
        self._patch = pytest.MonkeyPatch()

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.kms.exceptions import (
            InvalidCiphertextException,
            InvalidKeyUsageException,
            ValidationException,
        )
        from moto.kms.responses import KmsResponse
        from moto.server import ThreadedMotoServer

        moto_decrypt = KmsResponse.decrypt
        seen = self.rsa_decrypts

        def decrypt(resp: KmsResponse) -> str:
            key_id = resp._get_param("KeyId")
            algorithm = resp._get_param("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
            if key_id:
                resp._validate_key_id(key_id)
            key = resp.kms_backend.describe_key(key_id) if key_id else None
            if key is None or key.key_spec == "SYMMETRIC_DEFAULT":
                if algorithm != "SYMMETRIC_DEFAULT":
                    raise InvalidKeyUsageException()
                return moto_decrypt(resp)
            context = resp._get_param("EncryptionContext")
            seen.append({"KeyId": key_id, "EncryptionAlgorithm": algorithm, "context": context})
            if algorithm not in (key.encryption_algorithms or []):
                raise InvalidKeyUsageException()
            if context:
                raise ValidationException("EncryptionContext is not supported for this key")
            blob = resp._get_param("CiphertextBlob")
            try:
                plaintext = key.private_key.private_key.decrypt(blob, _oaep(_HASHES[algorithm]))
            except ValueError:
                raise InvalidCiphertextException() from None
            return json.dumps(
                {
                    "Plaintext": base64.b64encode(plaintext).decode(),
                    "KeyId": key.arn,
                    "EncryptionAlgorithm": algorithm,
                }
            )

        self._patch.setattr(KmsResponse, "decrypt", decrypt)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        self._patch.undo()

    def reset(self) -> None:
        super().reset()
        self.rsa_decrypts.clear()


pytestmark = pytest.mark.usefixtures("aws_env")  # moto and aws_env: tests/conftest.py


@pytest.fixture(scope="module")
def rsa_kms() -> Iterator[RsaDecryptKms]:
    with RsaDecryptKms() as server:
        yield server


def fresh(server: KmsServer, **spec: str) -> dict[str, Any]:
    """Empty the server and create one key behind ``alias/cards``."""
    return server.fresh_key(ALIAS, **spec)


Factory = Callable[..., Awaitable[KmsKeyProvider]]


@pytest.fixture
async def make_provider() -> AsyncIterator[Factory]:
    made: list[KmsKeyProvider] = []

    async def make(server: KmsServer, key_id: str = ALIAS, **extra: Any) -> KmsKeyProvider:
        opts = {"provider": "kms", "key_id": key_id, "region": "us-east-1"}
        provider = KmsKeyProvider.create(
            "cards", {**opts, "endpoint_url": server.url, **extra}, base_dir=Path.cwd()
        )
        made.append(provider)
        await provider.start()
        return provider

    yield make
    for provider in made:
        await provider.close()


def kms_public_key(server: KmsServer, key_id: str) -> rsa.RSAPublicKey:
    der = server.boto3_client("kms").get_public_key(KeyId=key_id)["PublicKey"]
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    return public


def client_token(jwk: dict[str, Any], value: Any, context: dict[str, str]) -> str:
    """What a client that cannot call KMS does: wrap a fresh data key for the JWK, seal."""
    _, kid, _ = hybrid.from_jwk(jwk)
    dk = hybrid.wrap_for_jwk(jwk, context)
    header = envelope.build_header(
        "kms", kid.rpartition(":")[0], dk.key_version, canonical_context(context), dk.wrapped
    )
    return envelope.seal(
        envelope.dumps_json(value), AESGCM(dk.plaintext), header=header, label=LABEL
    )


async def open_token(svc: DataKeyService, token: str) -> Any:
    """What the sidecar does on a request ``decrypt`` rule."""
    env = envelope.parse(token)
    aead = await svc.for_decrypt(env.key_name, env.wrapped, env.key_version, env.context)
    return envelope.decrypt_value(env, aead, LABEL)


# -- GetPublicKey and local wraps, against moto_server ------------------------------------------


async def test_public_jwk_is_the_kms_public_key(moto: KmsServer, make_provider: Factory) -> None:
    key = fresh(moto, **RSA_KEY)
    provider = await make_provider(moto)
    assert provider.describe()["key_spec"] == "RSA_2048"
    jwks = await provider.public_jwks()
    assert jwks == await provider.public_jwks()
    (jwk,) = jwks
    assert (jwk["kty"], jwk["kid"], jwk["alg"], jwk["use"]) == (
        "RSA",
        "cards:1",
        "RSA-OAEP-256",
        "enc",
    )
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    public, kid, version = hybrid.from_jwk(jwk)
    assert (kid, version) == ("cards:1", 1)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == kms_public_key(moto, key["KeyId"]).public_numbers()
    assert provider.stats.count("GetPublicKey", "ok") == 1  # cached after the first call


async def test_generate_wraps_locally_with_the_public_key(
    moto: KmsServer, make_provider: Factory
) -> None:
    fresh(moto, **RSA_KEY)
    provider = await make_provider(moto)
    svc = DataKeyService({"cards": provider})
    keys = [await provider.generate_data_key(CTX) for _ in range(3)]
    entry = await svc.for_encrypt("cards", canonical_context(CTX))
    assert entry.key_version == 1
    assert len({k.plaintext for k in keys}) == 3 and all(len(k.plaintext) == 32 for k in keys)
    assert all(k.key_version == 1 and len(k.wrapped) == 256 for k in keys)
    assert provider.stats.count("GenerateDataKey") == 0  # no KMS call per data key
    assert provider.stats.count("GetPublicKey") == 1
    await provider.public_jwks()
    assert provider.stats.count("GetPublicKey") == 1


async def test_symmetric_key_has_no_public_jwks(moto: KmsServer, make_provider: Factory) -> None:
    fresh(moto)
    provider = await make_provider(moto)
    assert await provider.public_jwks() == []
    dk = await provider.generate_data_key(CTX)
    assert (
        dk.key_version == 0 and await provider.decrypt_data_key(dk.wrapped, 0, CTX) == dk.plaintext
    )
    assert provider.stats.count("GenerateDataKey", "ok") == 1
    assert provider.stats.count("GetPublicKey") == 0


async def test_keys_that_cannot_wrap_fail_start(moto: KmsServer, make_provider: Factory) -> None:
    fresh(moto, KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    with pytest.raises(KeyProviderError, match="cannot wrap data keys"):
        await make_provider(moto)
    status = await kms_key_status(
        {"provider": "kms", "key_id": ALIAS, "region": "us-east-1", "endpoint_url": moto.url}
    )
    assert (status["key_spec"], status["key_usage"]) == ("RSA_2048", "SIGN_VERIFY")


async def test_key_spec_learnt_later_if_kms_was_down_at_start(
    moto: KmsServer, make_provider: Factory
) -> None:
    moto.stop()
    provider = await make_provider(moto, timeout=1)  # start-up does not need KMS
    with pytest.raises(KeyProviderError):
        await provider.public_jwks()
    fresh(moto, **RSA_KEY)
    (jwk,) = await provider.public_jwks()
    assert jwk["kid"] == "cards:1"
    assert (await provider.generate_data_key(CTX)).key_version == 1
    assert provider.stats.count("DescribeKey", "ok") == 1


# -- KMS-side unwrapping, against the extended in-process server --------------------------------


async def test_client_wrapped_token_opens_through_kms(
    rsa_kms: RsaDecryptKms, make_provider: Factory
) -> None:
    fresh(rsa_kms, KeySpec="RSA_3072", KeyUsage="ENCRYPT_DECRYPT")
    provider = await make_provider(rsa_kms)
    (jwk,) = await provider.public_jwks()  # what the client downloads from the JWKS
    token = client_token(jwk, CARD, CTX)
    svc = DataKeyService({"cards": provider})
    assert await open_token(svc, token) == CARD
    assert await open_token(svc, token) == CARD  # the unwrapped key is cached
    assert provider.stats.count("Decrypt", "ok") == 1
    assert rsa_kms.rsa_decrypts == [
        {"KeyId": ALIAS, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256", "context": None}
    ]
    # The context is not in the wrap, but the field AAD binds it: moved, the field fails.
    env = envelope.parse(token)
    moved_header = envelope.build_header(
        "kms", "cards", 1, canonical_context({**CTX, "tenant": "evil"}), env.wrapped
    )
    moved = env._replace(header=moved_header)
    aead = await svc.for_decrypt("cards", moved.wrapped, 1, moved.context)
    with pytest.raises(CryptoError):
        envelope.decrypt_value(moved, aead, LABEL)


async def test_sidecar_generated_keys_round_trip(
    rsa_kms: RsaDecryptKms, make_provider: Factory
) -> None:
    fresh(rsa_kms, **RSA_KEY)
    provider = await make_provider(rsa_kms)
    svc = DataKeyService({"cards": provider})
    ctx = canonical_context(CTX)
    entry = await svc.for_encrypt("cards", ctx)
    token = envelope.encrypt_value(
        CARD, key=entry, provider="kms", key_name="cards", context=ctx, label=LABEL
    )
    svc.clear()
    assert await open_token(svc, token) == CARD
    assert provider.stats.count("GenerateDataKey") == 0
    assert provider.stats.count("Decrypt", "ok") == 1
    assert [d["EncryptionAlgorithm"] for d in rsa_kms.rsa_decrypts] == ["RSAES_OAEP_SHA_256"]


async def test_wrong_algorithm_or_tampered_blob_is_crypto_error(
    rsa_kms: RsaDecryptKms, make_provider: Factory
) -> None:
    key = fresh(rsa_kms, **RSA_KEY)
    provider = await make_provider(rsa_kms, breaker_failures=1)
    public = kms_public_key(rsa_kms, key["KeyId"])
    data_key = b"\x07" * 32
    sha1_wrap = public.encrypt(data_key, _oaep(hashes.SHA1))  # a client using OAEP-SHA1
    with pytest.raises(CryptoError) as info:
        await provider.decrypt_data_key(sha1_wrap, 1, CTX)
    assert info.value.status == 502
    good = (await provider.generate_data_key(CTX)).wrapped
    tampered = bytearray(good)
    tampered[10] ^= 1
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(bytes(tampered), 1, CTX)
    with pytest.raises(CryptoError, match="32-byte"):
        await provider.decrypt_data_key(public.encrypt(b"short", _oaep(hashes.SHA256)), 1, CTX)
    assert provider.stats.count("Decrypt") == 3
    # Refused locally, without asking KMS: symmetric version, wrong length.
    with pytest.raises(CryptoError, match="version 1"):
        await provider.decrypt_data_key(good, 0, CTX)
    with pytest.raises(CryptoError, match="length"):
        await provider.decrypt_data_key(good + b"\x00", 1, CTX)
    assert provider.stats.count("Decrypt") == 3
    # Bad ciphertexts say nothing about KMS health.
    assert provider.stats.count("Decrypt", "invalid_ciphertext") == 2
    assert provider.breaker.state == "closed" and provider.stats.retries == 0
    await provider.check_ready()
    assert await provider.decrypt_data_key(good, 1, CTX)

    # The extended server refuses what AWS refuses, and the SHA-1 blob was sound: it opens
    # with the algorithm it was made for, so the refusal above was the algorithm's.
    kms = rsa_kms.boto3_client("kms")
    opened = kms.decrypt(
        KeyId=ALIAS, CiphertextBlob=sha1_wrap, EncryptionAlgorithm="RSAES_OAEP_SHA_1"
    )
    assert opened["Plaintext"] == data_key
    with pytest.raises(ClientError, match="ValidationException"):
        kms.decrypt(
            KeyId=ALIAS,
            CiphertextBlob=good,
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            EncryptionContext=CTX,
        )
    with pytest.raises(ClientError, match="InvalidKeyUsageException"):
        kms.decrypt(KeyId=ALIAS, CiphertextBlob=good)


async def test_symmetric_keys_unchanged_on_the_extended_server(
    rsa_kms: RsaDecryptKms, make_provider: Factory
) -> None:
    fresh(rsa_kms)
    provider = await make_provider(rsa_kms)
    dk = await provider.generate_data_key(CTX)
    assert await provider.decrypt_data_key(dk.wrapped, 0, CTX) == dk.plaintext
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(dk.wrapped, 0, {**CTX, "tenant": "evil"})
    assert rsa_kms.rsa_decrypts == []


# -- through a running sidecrypt: JWKS on the admin listener, request decrypt rule --------------


async def test_proxy_publishes_kms_jwk_and_opens_client_tokens(
    rsa_kms: RsaDecryptKms, upstream: Any, proxy_factory: Any, certs: Any
) -> None:
    import aiohttp

    fresh(rsa_kms, **RSA_KEY)
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "keys": {
                "cards": {
                    "provider": "kms",
                    "key_id": ALIAS,
                    "region": "us-east-1",
                    "endpoint_url": rsa_kms.url,
                }
            },
            "routes": [
                {
                    "match": {"methods": ["POST"], "path": "/payments"},
                    "key": "cards",
                    "context": {"tenant": "header:X-Tenant"},
                    "request": {"decrypt": [LABEL]},
                }
            ],
        }
    )
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.get(f"{proxy.admin_url}/.well-known/sidecrypt/keys") as resp:
            assert resp.status == 200
            (jwk,) = (await resp.json())["keys"]
        assert (jwk["kid"], jwk["sidecrypt_provider"]) == ("cards:1", "kms")
        token = client_token(jwk, "4111", {"tenant": "acme"})
        async with client.post(
            f"{proxy.url}/payments", json={"card": {"number": token}}, headers={"X-Tenant": "acme"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert json.loads(upstream.seen[-1].body) == {"card": {"number": "4111"}}
        before = len(upstream.seen)
        async with client.post(
            f"{proxy.url}/payments", json={"card": {"number": token}}, headers={"X-Tenant": "evil"}
        ) as resp:
            assert resp.status == 400
        assert len(upstream.seen) == before
    assert [d["EncryptionAlgorithm"] for d in rsa_kms.rsa_decrypts] == ["RSAES_OAEP_SHA_256"]
