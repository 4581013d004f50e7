"""sidecrypt: an encryption sidecar for JSON APIs (TLS termination, envelope field encryption)."""

import pluggy

__version__ = "0.1.0"

PROJECT = "sidecrypt"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for plugin implementations: ``@hookimpl def sidecrypt_...``."""

__all__ = ["PROJECT", "__version__", "hookimpl"]
