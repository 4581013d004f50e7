"""JSON body transforms: encrypt or decrypt the fields a route selects.

One parse and one serialise per body. Slots are collected before anything changes; a slot is
handled once even if several selectors reach it (the first selector's ``bind_as`` wins). When
encrypting, a slot inside another selected slot is skipped: the outer value is encrypted whole
(and on decrypt the inner selector then finds nothing until the outer one is opened).

Encrypt always encrypts, even a value that already looks like a token: leaving client-supplied
tokens alone would let a client plant a token copied from another record and have the proxy
decrypt it later. A client that sends ciphertext uses a ``request.decrypt`` rule instead.
Before encrypting, the document is checked for duplicate keys (transform/duplicates.py) and
read by the route's guard (transform/guard.py): keys that fold or split to a selected place are
encrypted too, protected names elsewhere holding plaintext refuse the request. After
encrypting, :func:`assert_no_plaintext` re-walks every selector and the guard re-reads the whole
document before the body leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import keys
from ..crypto.esdk import is_esdk_message
from ..crypto.esdk.service import EsdkFields
from ..decisions import default_mask
from ..envelope import (
    Envelope,
    build_header,
    decrypt_value,
    dumps_json,
    is_envelope,
    loads_json,
    parse,
    seal,
)
from ..errors import AccessDenied, CryptoError, PluginError, RequestError, SidecryptError
from ..selectors import label as path_label
from ..transform.duplicates import check_duplicates
from ..transform.guard import GuardPlan, PlaintextGuardError
from .routes import CompiledField, CompiledRoute, DirectPlan, FieldList, adhoc_route

__all__ = ["FieldCrypto", "PlaintextGuardError", "assert_no_plaintext", "mask"]

Decide = Callable[[str], str]
mask = default_mask  # strings of 8+ characters keep their last 4; anything else is "****"
_label = lru_cache(maxsize=4096)(path_label)

# (container, key, label)
_Slot = tuple[Any, "str | int", str]


def _parse(body: bytes) -> Any:
    try:
        return loads_json(body)
    except ValueError:  # orjson.JSONDecodeError and json.JSONDecodeError are ValueErrors
        raise RequestError("the body is not valid JSON", code="malformed_json") from None


def _serialise(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # integers beyond 64 bits
        return dumps_json(doc)


def _find(doc: Any, spec: CompiledField) -> list[tuple[Any, str | int, tuple[str | int, ...], str]]:
    """(container, key, concrete path, label) for each slot; plain member chains skip the walk."""
    members = spec.members
    if members is not None:
        node = doc
        for name in members[:-1]:
            if not isinstance(node, dict):
                return []
            node = node.get(name)
        last = members[-1]
        if isinstance(node, dict) and last in node:
            return [(node, last, members, spec.fixed_label or "")]
        return []
    fixed = spec.fixed_label
    return [(c, k, p, fixed or _label(p)) for c, k, p in spec.selector.slots(doc)]


def _walk(doc: Any, parents: tuple[str, ...], last: str) -> Any:
    """The dict holding ``last`` at the end of a member chain, or None."""
    node = doc
    for name in parents:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node if isinstance(node, dict) and last in node else None


def _direct(specs: Sequence[CompiledField]) -> DirectPlan | None:
    """The plan compile_fields worked out (a plain sequence, as tests pass, has none)."""
    return specs.direct if isinstance(specs, FieldList) else None


def _guard(specs: Sequence[CompiledField]) -> GuardPlan:
    """The guard compile_fields built (a plain sequence, as tests pass, gets one now)."""
    return specs.guard if isinstance(specs, FieldList) else GuardPlan(specs)


def _collect(
    doc: Any,
    specs: Sequence[CompiledField],
    *,
    encrypting: bool,
    elsewhere: frozenset[int] = frozenset(),
) -> list[_Slot]:
    """The slots the selectors reach; ``elsewhere``: fields the guard found (folded keys)."""
    plan = _direct(specs)
    if plan is not None:
        out: list[_Slot] = []
        for index, (parents, last, lab, spec) in enumerate(plan):
            node = _walk(doc, parents, last)
            if node is not None:
                out.append((node, last, lab))
            elif encrypting and spec.required and index not in elsewhere:
                raise RequestError(
                    f"required field {spec.text} is missing from the body", code="missing_field"
                )
        return out
    seen: set[tuple[str | int, ...]] = set()
    found: list[tuple[Any, str | int, tuple[str | int, ...], str]] = []
    for index, spec in enumerate(specs):
        slots = _find(doc, spec)
        if encrypting and spec.required and not slots and index not in elsewhere:
            raise RequestError(
                f"required field {spec.text} is missing from the body", code="missing_field"
            )
        for slot in slots:
            if slot[2] not in seen:
                seen.add(slot[2])
                found.append(slot)
    if encrypting and len(found) > 1:
        # An outer slot is encrypted whole; slots inside it go with it.
        outer = seen.intersection([s[2][:i] for s in found for i in range(1, len(s[2]))])
        if outer:
            found = [s for s in found if not any(s[2][:i] in outer for i in range(1, len(s[2])))]
    return [(c, k, lab) for c, k, _, lab in found]


def _protected(value: Any) -> bool:
    """An ``sc1.`` token or an ESDK message (the two formats a field may be written in)."""
    return is_envelope(value) or is_esdk_message(value)


def _protected_at(container: Any, key: Any) -> bool:
    return _protected(container[key])


def assert_no_plaintext(body_obj: Any, specs: Sequence[CompiledField]) -> None:
    """Every slot a selector reaches must hold a token; raise naming the path otherwise."""
    plan = _direct(specs)
    if plan is not None:
        for parents, last, _, spec in plan:
            node = _walk(body_obj, parents, last)
            if node is not None and not _protected(node[last]):
                raise PlaintextGuardError(
                    f"plaintext guard: {path_label((*parents, last))} (selector {spec.text}) is "
                    "not encrypted; the body was not sent"
                )
        return
    for spec in specs:
        for container, key, path, _ in _find(body_obj, spec):
            if not _protected(container[key]):
                raise PlaintextGuardError(
                    f"plaintext guard: {path_label(path)} (selector {spec.text}) is not "
                    "encrypted; the body was not sent"
                )


def _default_mask(label: str, value: Any) -> str:
    return default_mask(value)


class FieldCrypto:
    """Applies a route's field rules to JSON bodies through the data key service."""

    def __init__(self, keys: keys.DataKeyService) -> None:
        self.keys = keys
        self.esdk = EsdkFields(keys)

    async def encrypt_body(
        self,
        body: bytes,
        route: CompiledRoute,
        specs: Sequence[CompiledField],
        context: keys.Context,
    ) -> tuple[bytes, list[str]]:
        """Encrypt the selected fields; returns the new body and the labels encrypted.

        Refuses (400) duplicate keys, keys of one object that fold alike, and protected names
        holding plaintext where no selector reaches; keys that fold or split to a selected
        place are encrypted under the selector's label.
        """
        doc = _parse(body)
        check_duplicates(body, doc)
        guard = _guard(specs)
        extra = guard.find_slots(doc)
        if extra:
            slots = _collect(doc, specs, encrypting=True, elsewhere=frozenset(s[3] for s in extra))
            have = {(id(c), k) for c, k, _ in slots}
            slots += [(c, k, lab) for c, k, lab, _ in extra if (id(c), k) not in have]
        else:
            slots = _collect(doc, specs, encrypting=True)
        if not slots:
            guard.check_outgoing(doc)  # the body leaves as sent: the last check still applies
            return body, []
        name = route.key
        if name is None:
            raise CryptoError(f"route {route.label} encrypts fields but names no key")
        service = self.keys
        plains = [dumps_json(container[key]) for container, key, _ in slots]
        if self.esdk.writes_esdk(name):
            for (container, key, lab), plaintext in zip(slots, plains, strict=True):
                container[key] = await self.esdk.seal(name, context, lab, plaintext)
            assert_no_plaintext(doc, specs)
            guard.check_outgoing(doc, sealed=_protected_at)
            return _serialise(doc), [lab for _, _, lab in slots]
        # One cache lookup for the body when the cached key has room for every field.
        dk = service.cached_for_encrypt_many(name, context, sum(map(len, plains)), len(plains))
        labels = []
        for (container, key, lab), plaintext in zip(slots, plains, strict=True):
            if dk is None:
                size = len(plaintext)
                one = service.cached_for_encrypt(name, context, size)
                if one is None:
                    one = await service.for_encrypt(name, context, size)
            else:
                one = dk
            header = one.header
            if header is None:
                header = one.header = build_header(
                    one.provider.type_name, name, one.key_version, context, one.wrapped
                )
            container[key] = seal(plaintext, one.aead, header=header, label=lab)
            labels.append(lab)
        assert_no_plaintext(doc, specs)
        guard.check_outgoing(doc)
        return _serialise(doc), labels

    async def decrypt_body(
        self,
        body: bytes,
        route: CompiledRoute,
        specs: Sequence[CompiledField],
        context: keys.Context,
        *,
        decide: Decide | None = None,
        refuse_duplicates: bool = False,
    ) -> tuple[bytes, list[str], list[tuple[str, str]]]:
        """Decrypt tokens at the selected slots.

        Returns the new body, the labels decrypted (revealed or masked), and the non-default
        outcomes as (label, outcome) with outcome ``masked``, ``ciphertext``, ``dropped`` or
        ``error`` (undecryptable, left as is under ``on_decrypt_error: ciphertext``).
        Values that are not tokens (rows stored before encryption was on) stay as they are,
        but the policy still applies to them: mask and ciphertext outcomes mask them.
        ``refuse_duplicates`` (request bodies): a repeated key is the client's 400.
        """
        doc = _parse(body)
        if refuse_duplicates:
            check_duplicates(body, doc)
        slots = _collect(doc, specs, encrypting=False)
        if not slots:
            return body, [], []
        labels: list[str] = []
        outcomes: list[tuple[str, str]] = []
        # A policy decider may carry its own masking rules (keep_last, mask char).
        masker: Callable[[str, Any], str] = getattr(decide, "mask", None) or _default_mask
        vetted: bytes | None = None  # the header whose key and context checks passed
        unwrapped = await self._unwrap_all(slots, route, context, decide)
        for container, key, lab in slots:
            value = container[key]
            outcome = decide(lab) if decide is not None else "reveal"
            if outcome not in ("reveal", "mask", "ciphertext", "drop", "deny"):
                raise PluginError(f"policy returned an unknown outcome for {lab}")
            if outcome == "deny":
                raise AccessDenied(f"access to field {lab} is denied")
            if outcome == "drop":
                if isinstance(container, dict):
                    del container[key]
                else:
                    container[key] = None
                outcomes.append((lab, "dropped"))
                continue
            esdk = not is_envelope(value) and is_esdk_message(value)
            if not esdk and not is_envelope(value):
                if outcome != "reveal":
                    container[key] = masker(lab, value)
                    outcomes.append((lab, "masked"))
                continue
            if outcome == "ciphertext":
                outcomes.append((lab, "ciphertext"))
                continue
            try:
                if esdk:
                    plain = await self._open_esdk(value, route, context, lab)
                else:
                    env = parse(value)
                    if env.header is not vetted:  # tokens of one data key share the header
                        self._vet(env, route, context, lab)
                        vetted = env.header
                    found = unwrapped.get(env.wrapped)
                    if isinstance(found, SidecryptError):
                        raise found
                    aead = found or self.keys.cached_for_decrypt(env.wrapped)
                    if aead is None:
                        aead = await self._unwrap(env)
                    plain = decrypt_value(env, aead, lab)
            except CryptoError:
                if route.on_decrypt_error != "ciphertext":
                    raise
                outcomes.append((lab, "error"))
                continue
            if outcome == "mask":
                container[key] = masker(lab, plain)
                outcomes.append((lab, "masked"))
            else:
                container[key] = plain
            labels.append(lab)
        return _serialise(doc), labels, outcomes

    async def _open_esdk(
        self, value: str, route: CompiledRoute, context: keys.Context, label: str
    ) -> Any:
        """Decrypt one ESDK message under the route's keys and context."""
        plain = await self.esdk.open(
            value,
            label=label,
            context=context if route.has_context else None,
            allowed=route.decrypt_keys,
        )
        try:
            return loads_json(plain)
        except ValueError:
            raise CryptoError(f"field {label} decrypted to invalid JSON") from None

    async def _unwrap_all(
        self,
        slots: Sequence[_Slot],
        route: CompiledRoute,
        context: keys.Context,
        decide: Decide | None,
    ) -> dict[bytes, AESGCM | SidecryptError]:
        """A cold list: every distinct data key not cached, unwrapped in one concurrent round
        (bounded, single-flight per key) instead of one provider call after another. Only
        tokens that will be decrypted (outcome reveal or mask) and that pass the route's key
        and context checks are unwrapped; the field loop reports everything else."""
        wanted: dict[bytes, tuple[str, str, int, keys.Context]] = {}
        cached = self.keys.cached_for_decrypt
        for container, key, lab in slots:
            value = container[key]
            if not is_envelope(value):
                continue
            try:
                env = parse(value)
            except CryptoError:
                continue
            if env.wrapped in wanted or cached(env.wrapped) is not None:
                continue
            if decide is not None and decide(lab) not in ("reveal", "mask"):
                continue
            try:
                self._vet(env, route, context, lab)
            except CryptoError:
                continue
            wanted[env.wrapped] = (env.key_name, env.provider, env.key_version, env.context)
        if len(wanted) < 2:
            return {}  # nothing to batch: the loop unwraps (or finds) it
        results = await self.keys.for_decrypt_many(wanted)
        for failure in results.values():
            if isinstance(failure, SidecryptError) and not isinstance(failure, CryptoError):
                raise failure  # provider unavailable: 503 for the whole response
        return results

    async def open_token(
        self, token: str, route: CompiledRoute, context: keys.Context, label: str
    ) -> Any:
        """Check a token against the route (key, provider, context) and decrypt it."""
        if is_esdk_message(token):
            return await self._open_esdk(token, route, context, label)
        env, aead = self._check(token, route, context, label)
        if aead is None:
            aead = await self._unwrap(env)
        return decrypt_value(env, aead, label)

    def _check(
        self, token: str, route: CompiledRoute, context: keys.Context, label: str
    ) -> tuple[Envelope, AESGCM | None]:
        """Parse and vet a token before any key use; the AEAD if its data key is cached."""
        env = parse(token)
        self._vet(env, route, context, label)
        return env, self.keys.cached_for_decrypt(env.wrapped)

    def _vet(self, env: Envelope, route: CompiledRoute, context: keys.Context, label: str) -> None:
        """The token's key, provider and context must be this route's (before any key use)."""
        if route.decrypt_keys is not None and env.key_name not in route.decrypt_keys:
            raise CryptoError(
                f"field {label} was encrypted under key {env.key_name!r}, not this route's"
            )
        try:
            self.keys.provider_for(env.key_name, env.provider)
        except CryptoError:
            raise CryptoError(
                f"field {label}: key {env.key_name!r} is not a {env.provider} key"
            ) from None
        if route.has_context and env.context != context:
            raise CryptoError(
                f"field {label}: encryption context mismatch", code="context_mismatch"
            )

    async def rewrap_body(
        self,
        body: bytes,
        specs: Sequence[CompiledField],
        *,
        to_key: str,
        expect_context: keys.Context | None = None,
    ) -> tuple[bytes, list[tuple[str, str, int]]]:
        """Re-encrypt every token at the selected slots under ``to_key`` (its newest version).

        Each token keeps its stored context and label, so it stays bound where it was. The
        plaintext exists only in this process's memory. Returns the new body and, per token,
        (label, old key name, old key version): what still used an old key before the run.
        ``expect_context``: a token bound to another context is refused, not moved (rewrap
        --route: the proxy would not read it back).
        """
        doc = _parse(body)
        target = self.keys.provider(to_key)
        to_esdk = self.esdk.writes_esdk(to_key)
        moved: list[tuple[str, str, int]] = []
        for container, key, lab in _collect(doc, specs, encrypting=False):
            token = container[key]
            if is_esdk_message(token):
                plain, context, old_key = await self.esdk.open_stored(token, label=lab)
                old_version = 0
                _expect(expect_context, keys.canonical_context(dict(context)), lab)
            elif is_envelope(token):
                env = parse(token)
                _expect(expect_context, env.context, lab)
                aead = self.keys.cached_for_decrypt(env.wrapped) or await self._unwrap(env)
                plain = dumps_json(decrypt_value(env, aead, lab))
                context, old_key, old_version = env.context, env.key_name, env.key_version
            else:
                continue
            if to_esdk:
                container[key] = await self.esdk.seal(to_key, context, lab, plain)
                moved.append((lab, old_key, old_version))
                continue
            cached = await self.keys.for_encrypt(to_key, context, len(plain))
            header = build_header(
                target.type_name, to_key, cached.key_version, context, cached.wrapped
            )
            container[key] = seal(plain, cached.aead, header=header, label=lab)
            moved.append((lab, old_key, old_version))
        return _serialise(doc), moved

    async def _unwrap(self, env: Envelope) -> AESGCM:
        return await self.keys.for_decrypt(
            env.key_name, env.wrapped, env.key_version, env.context, provider_type=env.provider
        )

    async def transform_document(
        self,
        doc: bytes,
        *,
        action: Literal["encrypt", "decrypt"],
        key: str,
        selectors: Sequence[str],
        context: Mapping[str, str] | None = None,
        any_key: bool = False,
    ) -> bytes:
        """Offline (CLI) encrypt or decrypt of one document; errors raise, nothing is skipped."""
        route = adhoc_route(key, selectors, context=context, any_key=any_key)
        ctx = keys.canonical_context(context or {})
        if action == "encrypt":
            out, _ = await self.encrypt_body(doc, route, route.request_encrypt, ctx)
        else:
            out, _, _ = await self.decrypt_body(doc, route, route.response_decrypt, ctx)
        return out


def _expect(expected: keys.Context | None, context: keys.Context, label: str) -> None:
    if expected is not None and context != expected:
        raise CryptoError(f"field {label}: encryption context mismatch", code="context_mismatch")
