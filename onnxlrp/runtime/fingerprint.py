"""A stable digest of option values: the cache key of a compiled explainer.

Two option objects that would compile to the same relevance graph get the same digest, in
any process: dataclasses by their fields, floats by their exact value, arrays by their
bytes, rule modifiers (functions, partials) by their code and the values they close over.
An object it cannot describe faithfully raises :class:`Unfingerprintable`; the caller then
does without the cache rather than risk a wrong hit.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from collections.abc import Mapping

import numpy as np


class Unfingerprintable(TypeError):
    pass


def digest(value: object) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value: object) -> None:
    def put(tag: str, payload: bytes = b"") -> None:
        h.update(tag.encode() + b"\0" + len(payload).to_bytes(8, "little") + payload)

    if value is None or isinstance(value, (bool, int, str, bytes)):
        put(type(value).__name__, repr(value).encode())
    elif isinstance(value, (float, np.floating)):
        put("float", float(value).hex().encode())  # exact, unlike a rounded repr
    elif isinstance(value, np.ndarray):
        put("ndarray", f"{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        put(type(value).__name__, str(len(value)).encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, Mapping):
        put("mapping", str(len(value)).encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        put("dataclass", f"{type(value).__module__}.{type(value).__qualname__}".encode())
        for f in dataclasses.fields(value):
            put("field", f.name.encode())
            _feed(h, getattr(value, f.name))
    elif isinstance(value, functools.partial):
        put("partial")
        _feed(h, value.func)
        _feed(h, value.args)
        _feed(h, dict(value.keywords))
    elif isinstance(value, types.FunctionType):
        put("function", f"{value.__module__}.{value.__qualname__}".encode())
        _feed_code(h, value.__code__)
        _feed(h, value.__defaults__)
        _feed(h, tuple(cell.cell_contents for cell in value.__closure__ or ()))
    elif isinstance(value, types.BuiltinFunctionType) or isinstance(value, np.ufunc):
        put("builtin", f"{getattr(value, '__module__', '')}.{value.__name__}".encode())
    else:
        raise Unfingerprintable(f"cannot fingerprint {type(value).__qualname__}")


def _feed_code(h, code: types.CodeType) -> None:
    h.update(code.co_code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:  # literals: their repr is stable across processes
            h.update(repr(const).encode())
    h.update(repr(code.co_names).encode())
