"""One error hierarchy, so callers can catch ``SidecryptError`` and map it to a response.

Messages never carry field values or key bytes: they name paths, keys and steps only.
Each class knows the HTTP status and the stable error code it maps to.
"""

from __future__ import annotations


class SidecryptError(Exception):
    """Root of every error sidecrypt raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class ConfigError(SidecryptError):
    """A setting is wrong; the message starts with ``FILE: dotted.path:``."""

    code = "config_error"

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None) -> None:
        prefix = "".join(f"{part}: " for part in (file, path) if part)
        super().__init__(prefix + message)
        self.file = file
        self.path = path


class PluginError(SidecryptError):
    """A plugin is broken: unknown hook, bad return value, missing provider type."""

    code = "plugin_error"


class RequestError(SidecryptError):
    """The client's request cannot be processed as sent (4xx)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        if status is not None:
            self.status = status


class AccessDenied(RequestError):
    """Policy refused the caller."""

    status = 403
    code = "forbidden"


class KeyProviderError(SidecryptError):
    """A key provider failed or is unreachable: fail closed with 503 and Retry-After."""

    status = 503
    code = "key_provider_unavailable"
    retry_after: int = 5

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class CryptoError(SidecryptError):
    """A ciphertext is malformed, tampered with or bound to another context."""

    status = 502
    code = "decrypt_failed"


class UpstreamError(SidecryptError):
    """The upstream app could not be reached or failed mid-response."""

    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class AuditError(SidecryptError):
    """The audit trail cannot record: with ``on_failure: block`` the proxy refuses work."""

    status = 503
    code = "audit_unavailable"
