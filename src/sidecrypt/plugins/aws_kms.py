"""The ``kms`` key provider: data keys from AWS KMS (GenerateDataKey / Decrypt).

Config: ``keys.<name>: {provider: kms, key_id: ID|ARN|alias/NAME, region: REGION}`` plus
optional ``endpoint_url`` (a KMS-compatible endpoint; STS for ``role_arn`` is reached there
too), ``profile``, ``role_arn``/``role_session_name`` (STS AssumeRole, refreshed before the
temporary credentials expire), ``timeout``, ``max_attempts``, ``breaker_failures``,
``breaker_reset`` and ``outage_grace``. Credentials come from the standard AWS chain (env,
shared profile, container or instance role); the YAML never holds them.

The wrapped data key is the KMS CiphertextBlob; KMS rotates the key material itself, so the
envelope's key version is always 0 and old blobs keep decrypting. The encryption context goes
to KMS with both calls, so a blob moved to another context does not unwrap.

Asymmetric keys (KeySpec ``RSA_2048``/``RSA_3072``/``RSA_4096``, KeyUsage ``ENCRYPT_DECRYPT``;
the spec is learnt from DescribeKey) serve clients that cannot call KMS: :meth:`public_jwks`
publishes the public key from GetPublicKey (fetched once, then cached: KMS never rotates
asymmetric key material) as an ``RSA-OAEP-256`` JWK with kid ``"<config key name>:1"``. Data
keys are generated locally and wrapped with that public key exactly as
:mod:`sidecrypt.hybrid` lays it out (RSAES-OAEP, SHA-256 hash and MGF1, empty label), so
sidecar-made and client-made tokens are one format; their envelope key version is 1 (a hybrid
kid's version is at least 1), which is how a token routes back to the RSA path here. Unwrapping
is KMS ``Decrypt`` with ``KeyId`` and ``EncryptionAlgorithm=RSAES_OAEP_SHA_256`` and *no*
``EncryptionContext``: KMS accepts a context only for symmetric keys, and an OAEP wrap has no
room for one. The context is still bound: the field envelope's AAD covers its header, which
holds the context, so a token moved to another context fails to authenticate after the unwrap.
A key of any other spec or usage (signing, HMAC, ECC) fails ``start()``.

Failure rules: throttling and 5xx are retried with jittered backoff (botocore's own retries are
off, so every attempt is counted in :attr:`KmsKeyProvider.stats`); timeouts, refused
connections and refusals (access denied, key not found or disabled) fail at once with
``KeyProviderError`` (503 + Retry-After). A bad blob or context is a ``CryptoError`` and says
nothing about KMS health. ``breaker_failures`` failed calls in a row open a circuit breaker.
While KMS fails, :class:`~sidecrypt.keys.DataKeyService` keeps serving cached data keys up to
``outage_grace`` seconds past their limits (it reads :attr:`KmsKeyProvider.outage_grace`), and
:meth:`KmsKeyProvider.check_ready` turns unready when the breaker is open or 80% of that grace
has passed since the outage began.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, field_validator

from .. import hookimpl, hybrid
from ..errors import CryptoError, KeyProviderError
from ..keys import DataKey, KeyProvider, ProviderOptions
from .aws_kms_resilience import CallStats, CircuitBreaker, backoff_delay

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 50
ROLE_DURATION = 3600
READY_FRACTION = 0.8  # unready once this share of outage_grace has passed
SYMMETRIC = "SYMMETRIC_DEFAULT"
RSA_ALGORITHM = "RSAES_OAEP_SHA_256"
RSA_WRAPPED_BYTES = {"RSA_2048": 256, "RSA_3072": 384, "RSA_4096": 512}  # spec -> modulus bytes
ASYMMETRIC_VERSION = 1  # envelope key version of RSA-wrapped data keys (hybrid kids are >= 1)

_CRYPTO_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_THROTTLE_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
_SERVER_CODES = frozenset(
    {"KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException"}
)


class KmsKeyOptions(ProviderOptions):
    provider: Literal["kms"] = "kms"
    key_id: str = Field(min_length=1, max_length=2048, pattern=r"^\S+$")
    region: str = Field(min_length=1, pattern=r"^[a-z0-9-]+$")
    endpoint_url: str | None = Field(None, pattern=r"^https?://\S+$")
    profile: str | None = None
    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:iam::\S+$")
    role_session_name: str = Field("sidecrypt", pattern=r"^[\w+=,.@-]{2,64}$")
    timeout: float = Field(2.0, gt=0, le=60)
    max_attempts: int = Field(3, ge=1, le=10)
    breaker_failures: int = Field(5, ge=1)
    breaker_reset: float = Field(10.0, gt=0)
    outage_grace: float = Field(300.0, ge=0)

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, value: str) -> str:
        if value.startswith("alias/aws/"):
            raise ValueError("AWS managed keys (alias/aws/...) cannot be used for data keys")
        return value


class _Failure(Exception):
    """One failed attempt, classified; never leaves this module."""

    def __init__(self, outcome: str, detail: str, *, retry: bool) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry = retry


def _classify(exc: BaseException) -> _Failure:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _CRYPTO_CODES:
            return _Failure("invalid_ciphertext", code, retry=False)
        if code in _THROTTLE_CODES or status == 429:
            return _Failure("throttled", code, retry=True)
        if code in _SERVER_CODES or status >= 500:
            return _Failure("server_error", code, retry=True)
        return _Failure("rejected", code, retry=False)
    if isinstance(exc, TimeoutError | ReadTimeoutError | ConnectTimeoutError):
        return _Failure("timeout", "no answer in time", retry=False)
    if isinstance(exc, ConnectionClosedError):
        # The server dropped a (possibly pooled, stale) connection before answering: one more
        # attempt on a fresh connection is safe for these operations.
        return _Failure("connection_error", "connection closed", retry=True)
    if isinstance(exc, BotoConnectionError):
        return _Failure("connection_error", "cannot connect", retry=False)
    if isinstance(exc, BotoCoreError):
        return _Failure("error", type(exc).__name__, retry=False)
    return _Failure("error", type(exc).__name__, retry=False)


class KmsError(KeyProviderError):
    """KMS failed or refused; ``kms_code`` is the AWS error code of a refusal, if any."""

    def __init__(self, message: str, *, retry_after: int, kms_code: str | None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.kms_code = kms_code


class _FixedCredentialProvider:
    """Stands in for the session's credential chain, handing out assumed-role credentials."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    async def load_credentials(self) -> Any:
        return self.credentials


class KmsKeyProvider:
    """One KMS key (id, ARN or alias) used to generate and unwrap data keys."""

    type_name: ClassVar[str] = "kms"
    options_model: ClassVar[type[ProviderOptions]] = KmsKeyOptions

    def __init__(self, name: str, options: KmsKeyOptions) -> None:
        self.name = name
        self.options = options
        self.key_id = options.key_id
        self.stats = CallStats()
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_reset)
        self.outage_since: float | None = None
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._facts: dict[str, Any] = {}
        self._spec: str | None = None  # KeySpec, once DescribeKey answered
        self._public: rsa.RSAPublicKey | None = None
        self._learning = asyncio.Lock()
        self.kid = f"{name}:{ASYMMETRIC_VERSION}"
        self._config = AioConfig(
            region_name=options.region,
            connect_timeout=options.timeout,
            read_timeout=options.timeout,
            max_pool_connections=MAX_CONNECTIONS,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )

    def __repr__(self) -> str:
        return f"KmsKeyProvider({self.name!r}, key_id={self.key_id!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> KmsKeyProvider:
        if not isinstance(options, KmsKeyOptions):
            options = KmsKeyOptions.model_validate(options)
        return cls(name, options)

    @property
    def outage_grace(self) -> float:
        """How long past their limits cached data keys may serve while KMS fails."""
        return self.options.outage_grace

    # -- lifecycle --------------------------------------------------------------------------

    def _session(self) -> AioSession:
        base = AioSession(profile=self.options.profile)
        if self.options.role_arn is None:
            return base
        creds = AioDeferredRefreshableCredentials(
            refresh_using=lambda: self._assume_role(base), method="assume-role"
        )
        assumed = AioSession()
        assumed.register_component("credential_provider", _FixedCredentialProvider(creds))
        return assumed

    async def _assume_role(self, base: AioSession) -> dict[str, Any]:
        """Fresh temporary credentials; botocore calls this before the old ones expire."""
        async with base.create_client(
            "sts", endpoint_url=self.options.endpoint_url, config=self._config
        ) as sts:
            try:
                resp = await sts.assume_role(
                    RoleArn=self.options.role_arn,
                    RoleSessionName=self.options.role_session_name,
                    DurationSeconds=ROLE_DURATION,
                )
            except Exception:
                self.stats.record("AssumeRole", "error")
                raise
        self.stats.record("AssumeRole", "ok")
        creds = resp["Credentials"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": creds["Expiration"].isoformat(),
        }

    async def start(self) -> None:
        """Create the client and look the key up once; KMS being down does not stop start-up.

        A key KMS describes as unusable for data keys (signing, HMAC, ECC) does.
        """
        await self._open()
        if self._spec is not None:
            try:
                self._check_usable()
            except KeyProviderError:
                await self.close()
                raise

    async def _open(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                self._session().create_client(
                    "kms", endpoint_url=self.options.endpoint_url, config=self._config
                )
            )
        except BotoCoreError as exc:  # unknown profile, bad region, ...
            raise KeyProviderError(
                f"key {self.name!r}: cannot create the KMS client: {exc}"
            ) from None
        self._stack = stack
        try:
            meta = (await self._call("DescribeKey", KeyId=self.key_id))["KeyMetadata"]
        except KmsError as exc:
            if exc.kms_code == "NotFoundException":
                await self.close()
                raise KeyProviderError(
                    f"key {self.name!r}: KMS key {self.key_id} not found"
                ) from None
            log.warning("KMS key %s not checked at start: %s", self.name, exc.message)
            return
        self._learn(meta)

    def _learn(self, meta: Mapping[str, Any]) -> None:
        self._facts = {
            "arn": meta.get("Arn"),
            "key_state": meta.get("KeyState"),
            "key_spec": meta.get("KeySpec"),
            "key_usage": meta.get("KeyUsage"),
        }
        self._spec = str(meta.get("KeySpec") or SYMMETRIC)

    def _check_usable(self) -> None:
        usage = self._facts.get("key_usage") or "ENCRYPT_DECRYPT"
        if usage != "ENCRYPT_DECRYPT" or (
            self._spec != SYMMETRIC and self._spec not in RSA_WRAPPED_BYTES
        ):
            raise KeyProviderError(
                f"key {self.name!r}: KMS key {self.key_id} ({self._spec}, {usage}) cannot wrap "
                "data keys; use a symmetric key or an RSA key with KeyUsage ENCRYPT_DECRYPT"
            )

    async def _key_spec(self) -> str:
        """The KeySpec; asks KMS (DescribeKey) only if start-up could not."""
        if self._spec is None:
            async with self._learning:
                if self._spec is None:
                    self._learn((await self._call("DescribeKey", KeyId=self.key_id))["KeyMetadata"])
        self._check_usable()
        assert self._spec is not None
        return self._spec

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- calls ------------------------------------------------------------------------------

    async def _call(self, op: str, **params: Any) -> dict[str, Any]:
        """One KMS operation with breaker, per-attempt deadline and retries on 429/5xx."""
        client = self._client
        if client is None:
            raise KeyProviderError(f"key {self.name!r}: KMS provider is not started")
        if not self.breaker.allow():
            self.stats.short_circuited[op] += 1
            wait = max(1, math.ceil(self.breaker.retry_after()))
            raise KeyProviderError(
                f"key {self.name!r}: KMS is failing; circuit open for {wait}s more",
                retry_after=wait,
            )
        method = getattr(client, _snake(op))
        failure: _Failure | None = None
        try:
            for attempt in range(self.options.max_attempts):
                if attempt:
                    self.stats.retries += 1
                    await asyncio.sleep(backoff_delay(attempt - 1))
                try:
                    async with asyncio.timeout(self.options.timeout):
                        resp: dict[str, Any] = await method(**params)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failure = _classify(exc)
                    self.stats.record(op, failure.outcome)
                    if failure.outcome == "invalid_ciphertext":
                        self._healthy()
                        raise CryptoError(
                            f"key {self.name!r}: KMS refused the wrapped data key "
                            "(tampered, another key, or another encryption context)"
                        ) from None
                    if not failure.retry:
                        break
                else:
                    self.stats.record(op, "ok")
                    self._healthy()
                    return resp
            assert failure is not None
            self._failed(op, failure)
        finally:
            self.breaker.release()  # a cancelled trial call leaves no verdict

    def _healthy(self) -> None:
        self.breaker.success()
        self.outage_since = None

    def _failed(self, op: str, failure: _Failure) -> NoReturn:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        if self.breaker.failure():
            self.stats.breaker_opened += 1
            log.warning("KMS key %s: circuit breaker open after %s", self.name, failure.detail)
        retry_after = 1 if failure.outcome == "throttled" else 2
        if self.breaker.state == "open":
            retry_after = max(1, math.ceil(self.breaker.retry_after()))
        raise KmsError(
            f"key {self.name!r}: KMS {op} failed ({failure.outcome}: {failure.detail})",
            retry_after=retry_after,
            kms_code=failure.detail if failure.outcome == "rejected" else None,
        )

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        if await self._key_spec() != SYMMETRIC:
            public = await self._public_key()
            plaintext = os.urandom(32)
            wrapped = hybrid.wrap(public, self.kid, plaintext, context)
            return DataKey(plaintext, wrapped, ASYMMETRIC_VERSION)
        params: dict[str, Any] = {"KeyId": self.key_id, "KeySpec": "AES_256"}
        if context:
            params["EncryptionContext"] = dict(context)
        resp = await self._call("GenerateDataKey", **params)
        return DataKey(bytes(resp["Plaintext"]), bytes(resp["CiphertextBlob"]), 0)

    async def esdk_key_arn(self) -> str:
        """The key ARN an ESDK ``aws-kms`` EDK names (DescribeKey once); symmetric keys only."""
        if await self._key_spec() != SYMMETRIC:
            raise CryptoError(f"key {self.name!r}: only symmetric KMS keys can write ESDK messages")
        arn = self._facts.get("arn")
        if not arn:
            self._learn((await self._call("DescribeKey", KeyId=self.key_id))["KeyMetadata"])
            arn = self._facts.get("arn")
        if not isinstance(arn, str) or not arn.startswith("arn:"):
            raise KeyProviderError(f"key {self.name!r}: KMS did not return the key ARN")
        return arn

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        spec = await self._key_spec()
        if spec != SYMMETRIC:
            return await self._decrypt_rsa(spec, wrapped, key_version)
        if key_version != 0:
            raise CryptoError(f"key {self.name!r}: KMS data keys carry version 0")
        params: dict[str, Any] = {"CiphertextBlob": wrapped, "KeyId": self.key_id}
        if context:
            params["EncryptionContext"] = dict(context)
        resp = await self._call("Decrypt", **params)
        return bytes(resp["Plaintext"])

    # -- asymmetric (RSA) keys ------------------------------------------------------------

    async def _decrypt_rsa(self, spec: str, wrapped: bytes, key_version: int) -> bytes:
        """KMS unwraps; no EncryptionContext (refused for asymmetric keys; field AAD binds it)."""
        if key_version != ASYMMETRIC_VERSION:
            raise CryptoError(
                f"key {self.name!r}: data keys wrapped for this RSA key carry version "
                f"{ASYMMETRIC_VERSION}"
            )
        if len(wrapped) != RSA_WRAPPED_BYTES[spec]:
            raise CryptoError(f"key {self.name!r}: wrapped data key has the wrong length")
        resp = await self._call(
            "Decrypt", KeyId=self.key_id, CiphertextBlob=wrapped, EncryptionAlgorithm=RSA_ALGORITHM
        )
        plaintext = bytes(resp["Plaintext"])
        if len(plaintext) != 32:  # a client wrapped something else than a data key
            raise CryptoError(f"key {self.name!r}: the wrapped value is not a 32-byte data key")
        return plaintext

    async def _public_key(self) -> rsa.RSAPublicKey:
        """The key's public half from GetPublicKey, fetched once and then cached."""
        if self._public is None:
            async with self._learning:
                if self._public is None:
                    resp = await self._call("GetPublicKey", KeyId=self.key_id)
                    self._public = self._load_public(resp)
        return self._public

    def _load_public(self, resp: Mapping[str, Any]) -> rsa.RSAPublicKey:
        bad = KeyProviderError(
            f"key {self.name!r}: KMS GetPublicKey did not return an {self._spec} "
            f"encryption key that supports {RSA_ALGORITHM}"
        )
        if RSA_ALGORITHM not in (resp.get("EncryptionAlgorithms") or []):
            raise bad
        try:
            public = serialization.load_der_public_key(bytes(resp["PublicKey"]))
        except (KeyError, ValueError, TypeError, UnsupportedAlgorithm):
            raise bad from None
        size = RSA_WRAPPED_BYTES.get(self._spec or "")
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size != 8 * (size or 0):
            raise bad
        return public

    async def public_jwks(self) -> list[dict[str, str]]:
        """The public JWK of an RSA key (``[]`` for a symmetric key), for a JWKS document."""
        if await self._key_spec() == SYMMETRIC:
            return []
        return [hybrid.to_jwk(await self._public_key(), self.kid)]

    # -- state ------------------------------------------------------------------------------

    def outage_seconds(self) -> float:
        return 0.0 if self.outage_since is None else time.monotonic() - self.outage_since

    async def check_ready(self) -> None:
        """No KMS call: readiness follows the outcome of real traffic (breaker, outage age)."""
        if self._client is None:
            raise KeyProviderError(f"key {self.name!r}: KMS provider is not started")
        if self.breaker.state == "open":
            wait = max(1, math.ceil(self.breaker.retry_after()))
            raise KeyProviderError(
                f"key {self.name!r}: KMS circuit breaker is open", retry_after=wait
            )
        elapsed = self.outage_seconds()
        if self.outage_since is not None and elapsed >= READY_FRACTION * self.outage_grace:
            raise KeyProviderError(
                f"key {self.name!r}: KMS failing for {elapsed:.0f}s; cached keys may serve "
                f"for {max(0.0, self.outage_grace - elapsed):.0f}s more"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.type_name,
            "key_id": self.key_id,
            "region": self.options.region,
            "endpoint_url": self.options.endpoint_url,
            "profile": self.options.profile,
            "role_arn": self.options.role_arn,
            **{k: v for k, v in self._facts.items() if v is not None},
            "breaker": self.breaker.state,
            "outage_seconds": round(self.outage_seconds(), 1),
            "calls": self.stats.snapshot()["calls"],
        }

    async def describe_key(self) -> dict[str, Any]:
        """Key state and rotation status from KMS (DescribeKey + GetKeyRotationStatus)."""
        meta = (await self._call("DescribeKey", KeyId=self.key_id))["KeyMetadata"]
        rotation: bool | None = None
        if meta.get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT":
            with contextlib.suppress(KeyProviderError):
                status = await self._call("GetKeyRotationStatus", KeyId=meta["KeyId"])
                rotation = bool(status.get("KeyRotationEnabled"))
        created = meta.get("CreationDate")
        return {
            "name": self.name,
            "provider": self.type_name,
            "key_id": meta.get("KeyId"),
            "arn": meta.get("Arn"),
            "state": meta.get("KeyState"),
            "enabled": meta.get("Enabled"),
            "key_spec": meta.get("KeySpec"),
            "key_usage": meta.get("KeyUsage"),
            "manager": meta.get("KeyManager"),
            "origin": meta.get("Origin"),
            "created": created.isoformat() if created is not None else None,
            "rotation_enabled": rotation,
        }


def _snake(op: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in op).lstrip("_")


async def kms_key_status(
    options: KmsKeyOptions | Mapping[str, Any], name: str = "kms"
) -> dict[str, Any]:
    """For ``sidecrypt keys list``: a short-lived provider, DescribeKey and rotation status."""
    provider = KmsKeyProvider.create(name, options, base_dir=Path.cwd())
    await provider._open()  # list the key even if it cannot wrap data keys
    try:
        return await provider.describe_key()
    finally:
        await provider.close()


@hookimpl(trylast=True)
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:
    return [KmsKeyProvider]
