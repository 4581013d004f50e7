"""Hot-path hook calls without pluggy's generic machinery, same semantics.

The proxy calls a few hooks several times per request (``sidecrypt_audit`` per event,
``sidecrypt_authorize`` per field, ``sidecrypt_identify``). pluggy's ``HookCaller.__call__`` costs
~1 µs per call in argument checks and wrapper bookkeeping that plain implementations do not
need. :class:`DirectHook` calls the implementations itself, in pluggy's order (last registered
first, tryfirst/trylast as pluggy sorted them), passing the arguments each one declares. It
re-reads the registered implementations on every call (a plugin may be registered at any time)
and falls back to the real hook call when any implementation is a wrapper or takes optional
keyword arguments. pluggy's tracing and call monitoring do not see direct calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

_Plan = tuple[tuple[Callable[..., Any], tuple[str, ...]], ...]


class DirectHook:
    """``hook(kwargs)``: like ``pm.hook.NAME(**kwargs)``."""

    __slots__ = ("_caller", "_firstresult", "_plan", "_seen")

    def __init__(self, caller: pluggy.HookCaller) -> None:
        self._caller = caller
        spec = caller.spec
        self._firstresult = bool(spec is not None and spec.opts.get("firstresult", False))
        self._seen: list[Any] | None = None
        self._plan: _Plan | None = None

    def plan(self) -> _Plan | None:
        """(function, argument names) in call order, or None when only pluggy can call them."""
        impls = self._caller.get_hookimpls()
        # HookImpl has no __eq__: an identity compare, cheap for a few impls.
        return self._plan if impls == self._seen else self._replan(impls)

    def _replan(self, impls: list[Any]) -> _Plan | None:
        self._seen = impls
        plan = []
        for impl in reversed(impls):
            if impl.hookwrapper or impl.wrapper or impl.kwargnames:
                self._plan = None
                return None
            plan.append((impl.function, tuple(impl.argnames)))
        self._plan = tuple(plan)
        return self._plan

    def __call__(self, kwargs: Mapping[str, Any]) -> Any:
        impls = self._caller.get_hookimpls()  # plan(), inlined: called per field and per event
        plan = self._plan if impls == self._seen else self._replan(impls)
        if plan is None:
            return self._caller(**kwargs)
        if self._firstresult:
            for function, names in plan:
                result = function(*[kwargs[n] for n in names])
                if result is not None:
                    return result
            return None
        results = []
        for function, names in plan:
            result = function(*[kwargs[n] for n in names])
            if result is not None:
                results.append(result)
        return results

    def call1(self, name: str, value: Any) -> Any:
        """The same for a hook of one argument, without building a mapping."""
        impls = self._caller.get_hookimpls()
        plan = self._plan if impls == self._seen else self._replan(impls)
        if plan is None:
            return self._caller(**{name: value})
        results = []
        for function, names in plan:
            result = function(value) if names else function()
            if result is not None:
                if self._firstresult:
                    return result
                results.append(result)
        return None if self._firstresult else results
