"""Per-key options for the ``esdk`` field format (``keys.<name>.esdk`` in the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SuiteName = Literal[
    "AES_256_GCM_HKDF_SHA512_COMMIT_KEY", "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384"
]


class EsdkOptions(BaseModel):
    """How a key writes ESDK messages.

    ``namespace``/``name``: the raw AES keyring's key namespace and name (local keys; an
    official SDK's raw AES keyring must use the same two). ``bind_field``: the field path goes
    into the encryption context as ``sidecrypt-field``, so a message moved to another field no
    longer opens there (an SDK reader sees it as one more context pair)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    suite: SuiteName = "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"
    namespace: str = Field("sidecrypt", min_length=1, max_length=255)
    name: str | None = Field(None, min_length=1, max_length=255)
    frame_length: int = Field(4096, ge=128, le=1 << 20)
    bind_field: bool = True
