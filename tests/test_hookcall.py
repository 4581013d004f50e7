"""DirectHook calls implementations as pluggy would: order, first result, late plugins, wrappers."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pluggy
import pytest

from sidecrypt import hookimpl
from sidecrypt.hookcall import DirectHook
from sidecrypt.plugin_manager import make_plugin_manager


class Recorder:
    def __init__(self, name: str, calls: list[str], answer: Any = None) -> None:
        self.name, self.calls, self.answer = name, calls, answer

    @hookimpl
    def sidecrypt_audit(self, event: Any) -> None:
        self.calls.append(f"{self.name}:{event}")

    @hookimpl
    def sidecrypt_identify(self, request: Any) -> Any:
        self.calls.append(self.name)
        return self.answer


class Last(Recorder):
    @hookimpl(trylast=True)
    def sidecrypt_audit(self, event: Any) -> None:
        self.calls.append(f"{self.name}:{event}")


class NoArgs:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @hookimpl(tryfirst=True)
    def sidecrypt_audit(self) -> None:
        self.calls.append("noargs")


def test_order_matches_pluggy() -> None:
    calls: list[str] = []
    pm = make_plugin_manager(builtins=False, entry_points=False)
    for plugin in (Last("z", calls), Recorder("a", calls), NoArgs(calls), Recorder("b", calls)):
        pm.register(plugin)
    pm.hook.sidecrypt_audit(event="e1")
    expected = list(calls)
    calls.clear()
    DirectHook(pm.hook.sidecrypt_audit).call1("event", "e1")
    assert calls == expected == ["noargs", "b:e1", "a:e1", "z:e1"]
    calls.clear()
    DirectHook(pm.hook.sidecrypt_audit)({"event": "e1"})
    assert calls == expected


def test_firstresult_stops_at_first_answer() -> None:
    calls: list[str] = []
    pm = make_plugin_manager(builtins=False, entry_points=False)
    pm.register(Recorder("a", calls, answer="A"))
    pm.register(Recorder("b", calls, answer=None))
    hook = DirectHook(pm.hook.sidecrypt_identify)
    assert hook.call1("request", object()) == "A"
    assert calls == ["b", "a"]
    calls.clear()
    pm.register(Recorder("c", calls, answer="C"))  # registered after first use: seen
    assert hook({"request": object()}) == "C"
    assert calls == ["c"]


def test_no_answer_is_none_and_errors_propagate() -> None:
    pm = make_plugin_manager(builtins=False, entry_points=False)
    hook = DirectHook(pm.hook.sidecrypt_identify)
    assert hook.call1("request", object()) is None

    class Boom:
        @hookimpl
        def sidecrypt_identify(self, request: Any) -> Any:
            raise RuntimeError("boom")

    pm.register(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        hook.call1("request", object())


def test_wrappers_go_through_pluggy() -> None:
    calls: list[str] = []
    pm = make_plugin_manager(builtins=False, entry_points=False)
    pm.register(Recorder("a", calls))

    class Wrap:
        @hookimpl(wrapper=True)
        def sidecrypt_audit(self, event: Any) -> Generator[None, Any, Any]:
            calls.append("before")
            result = yield
            calls.append("after")
            return result

    hook = DirectHook(pm.hook.sidecrypt_audit)
    hook.call1("event", "e")
    assert calls == ["a:e"]
    pm.register(Wrap())
    calls.clear()
    hook.call1("event", "e")
    assert calls == ["before", "a:e", "after"]
    assert hook.plan() is None
    assert isinstance(pm.hook.sidecrypt_audit, pluggy.HookCaller)
