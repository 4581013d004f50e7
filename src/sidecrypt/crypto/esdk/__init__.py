"""The AWS Encryption SDK message format on ``cryptography``'s primitives.

Fields written in this format are read by the official SDKs (Python, Java, .NET, JS, C) with only
the key: a raw AES keyring with the same material and names, or a KMS keyring on the same key.
Message format version 2 is written (committing suites); versions 1 and 2 are read, for every
suite the SDK's default commitment policy (REQUIRE_ENCRYPT_ALLOW_DECRYPT) decrypts. Layout:
docs/format.md. Every failure to read a message is one :class:`EsdkError`.
"""

from .detect import is_esdk_message
from .errors import EsdkError
from .message import DecryptResult, decrypt_message, encrypt_message
from .suites import DEFAULT_SUITE, SIGNED_SUITE, Suite, suite_by_id

__all__ = [
    "DEFAULT_SUITE",
    "SIGNED_SUITE",
    "DecryptResult",
    "EsdkError",
    "Suite",
    "decrypt_message",
    "encrypt_message",
    "is_esdk_message",
    "suite_by_id",
]
