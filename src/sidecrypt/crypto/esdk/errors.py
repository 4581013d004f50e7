"""The one error a message that cannot be read raises: it names no check, so a caller probing
with crafted messages learns nothing about which part failed."""

from __future__ import annotations

from ...errors import CryptoError


class EsdkError(CryptoError):
    """An ESDK message is malformed, over a limit, unauthenticated or under no usable key."""

    code = "esdk_message_invalid"

    def __init__(self, message: str = "the AWS Encryption SDK message cannot be decrypted") -> None:
        super().__init__(message)


def fail() -> EsdkError:
    return EsdkError()
