"""Restrict a context's TLS key-exchange groups to Mozilla intermediate's X25519, P-256, P-384.

OpenSSL offers X448 and P-521 too, which the profile (and scanners checking it) reject. Python
3.15 gained ``SSLContext.set_groups``; before it the standard library has no call for a list
(``set_ecdh_curve`` sets one EC curve and cannot name X25519, and an ``openssl.cnf`` ``Groups``
line is process-wide and must be in place before ``ssl`` is first imported). So on older
Pythons this calls ``SSL_CTX_set1_groups_list`` through ctypes on the context's own
``SSL_CTX``, found in the libssl that ``_ssl`` itself links, after checking that the pointer
is that context's (its options and security level read back through OpenSSL match Python's).
Once per process a handshake in memory proves the restriction works: a client that offers only
P-521 is refused, one that offers P-256 gets through. Anything unexpected raises
``TLSGroupsError`` and sidecrypt does not start: it would otherwise serve a profile other than
the one it documents, silently.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SidecryptError

GROUPS = ("X25519", "P-256", "P-384")
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is this SSL_CTX_ctrl (ssl.h)


class TLSGroupsError(SidecryptError):
    """The key-exchange groups could not be restricted: refuse to start."""

    code = "tls_groups"


def restrict_groups(ctx: ssl.SSLContext) -> None:
    """Offer and accept only ``GROUPS`` on ``ctx``; raise ``TLSGroupsError`` if that fails."""
    _set_groups(ctx)
    _proven()


def _set_groups(ctx: ssl.SSLContext) -> None:
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:  # Python 3.15+
        try:
            setter(":".join(GROUPS))
        except ssl.SSLError as exc:
            raise TLSGroupsError(f"cannot set the TLS groups ({exc.reason})") from None
        return
    lib = _libssl()
    ptr = _ssl_ctx_pointer(ctx, lib)
    if lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ":".join(GROUPS).encode()) != 1:
        raise TLSGroupsError("OpenSSL refused the TLS group list " + ":".join(GROUPS))


@functools.cache
def _libssl() -> Any:
    """The libssl that Python's ``_ssl`` uses (dlsym on its handle searches its dependencies)."""
    import _ssl

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        ctrl = lib.SSL_CTX_ctrl
        get_options = lib.SSL_CTX_get_options
        get_level = lib.SSL_CTX_get_security_level
    except (OSError, AttributeError, TypeError) as exc:
        raise TLSGroupsError(f"cannot reach OpenSSL's SSL_CTX_ctrl ({exc})") from None
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    get_level.argtypes = [ctypes.c_void_p]
    get_level.restype = ctypes.c_int
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: Any) -> int:
    """``PySSLContext.ctx``, the first field after the object header, checked before use.

    That layout holds for CPython 3.x up to 3.14 (3.15 has ``set_groups``); anything else is
    refused before a pointer is read.
    """
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] < (3, 15):
        raise TLSGroupsError("cannot restrict the TLS groups on this Python (needs set_groups)")
    if type(ctx).__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        raise TLSGroupsError("unexpected ssl.SSLContext layout")
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TLSGroupsError("ssl.SSLContext has no SSL_CTX")
    before = ctx.options
    try:
        for flip in (False, True):  # read back twice, once with an option toggled
            if flip:
                ctx.options ^= ssl.OP_NO_TICKET
            if (
                lib.SSL_CTX_get_options(ptr) != int(ctx.options)
                or lib.SSL_CTX_get_security_level(ptr) != ctx.security_level
            ):
                raise TLSGroupsError("ssl.SSLContext's SSL_CTX does not read back: not patched")
    finally:
        ctx.options = before
    return int(ptr)


@functools.cache
def _proven() -> None:
    """Handshake in memory once: P-521-only client refused, P-256 client served."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="sidecrypt-groups-") as tmp:
        cert, key = _self_signed(Path(tmp))
        server.load_cert_chain(cert, key)
    _set_groups(server)
    if _handshakes(server, "secp521r1"):
        raise TLSGroupsError("the TLS group restriction did not take effect")
    if not _handshakes(server, "prime256v1"):
        raise TLSGroupsError("a P-256 handshake failed after restricting the TLS groups")


def _handshakes(server: ssl.SSLContext, curve: str) -> bool:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_ecdh_curve(curve)  # a client offers only this group
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="probe.invalid")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):  # a TLS 1.3 handshake takes 2-3 flights
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError:
                    return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["c"] and done["s"]:
            return True
    return False


def _self_signed(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidecrypt groups probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)
