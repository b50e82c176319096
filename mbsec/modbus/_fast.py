"""Cheaper construction of frozen, slotted dataclasses on the per-request hot path.

A frozen dataclass ``__init__`` assigns each field through ``object.__setattr__`` looked up
at call time (~100 ns per field on CPython 3.11). Calling the slot descriptors' ``__set__``
directly does the same thing in about half the time. Semantics are unchanged: the objects
stay frozen, compare, hash and match exactly like those built by the generated ``__init__``.
Only classes without defaults, ``__post_init__`` or ``InitVar`` qualify; anything else keeps
its dataclass ``__init__`` (checked here, so a later change to such a class cannot be
silently bypassed).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _plain_fields(cls: type) -> list[str] | None:
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if any(
        f.default is not dataclasses.MISSING
        or f.default_factory is not dataclasses.MISSING
        or not f.init
        for f in fields
    ):
        return None
    if "__slots__" not in cls.__dict__:
        return None
    return [f.name for f in fields]


def _compile(name: str, params: list[str], body: list[str], ns: dict[str, Any]) -> Any:
    src = f"def {name}({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body)
    exec(src, ns)
    return ns[name]


def fast_init(cls: type[T]) -> type[T]:
    """Class decorator (applied after ``@dataclass``): install the descriptor-based init."""
    names = _plain_fields(cls)
    if names is None:
        return cls
    ns: dict[str, Any] = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    body = [f"_set_{n}(self, {n})" for n in names] or ["pass"]
    init = _compile("__init__", ["self", *names], body, ns)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = f"Initialise {cls.__name__} (fields set through their slot descriptors)."
    # a class compiled by mypyc (setup.py) refuses the new __init__: it is built natively
    with contextlib.suppress(TypeError):
        setattr(cls, "__init__", init)  # noqa: B010  (mypy keeps the dataclass signature)
    return cls


def positional_factory(cls: type[T]) -> Callable[..., T]:
    """A function ``(field1, field2, ...) -> cls`` equivalent to ``cls(...)``, but faster.

    Used for classes this package does not own (``Access``), so they are not modified. A
    class mypyc compiled (``Access`` is, with the policy engine: setup.py) has no slots in its
    ``__dict__`` and comes back as it is: its own constructor is native already.
    """
    names = _plain_fields(cls)
    if names is None:
        return cls
    ns: dict[str, Any] = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    ns["_new"] = object.__new__
    ns["_cls"] = cls
    body = ["o = _new(_cls)", *(f"_set_{n}(o, {n})" for n in names), "return o"]
    return _compile("make", names, body, ns)  # type: ignore[no-any-return]
