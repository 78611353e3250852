"""Backend registry and the record of which backend ran each op.

Each op has backends tried in priority order: ``cuda`` (hand-written CUDA in ``_C``), ``triton``
(``lowbit_engine.kernels``), ``cpu`` (the C++ CPU reference in ``_C``) and ``torch`` (the pure-torch
reference in :mod:`lowbit_engine.reference`, which runs on any device). A backend applies when its
predicate accepts the call (device, dtypes, sizes). When a CUDA tensor ends on the torch reference, a
:class:`ReferenceFallbackWarning` says so once per (op, reason), and the record shows ``torch``.

Example:
    >>> from lowbit_engine import ops
    >>> with ops.record_backends() as used:
    ...     pass  # call ops here
    >>> used
    {}
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import ReferenceFallbackWarning

PRIORITY = ("cuda", "triton", "cpu", "torch")


@dataclass
class Backend:
    name: str
    applies: Callable[..., bool]  # same arguments as the op; returns whether this backend can run it
    run: Callable[..., object]


@dataclass
class _Record:
    last: dict[str, str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    scopes: list[dict[str, set[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_BACKENDS: dict[str, dict[str, Backend]] = {}
_RECORD = _Record()
_FORCED: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()


def register(op: str, name: str, applies: Callable[..., bool], run: Callable[..., object]) -> None:
    """Add (or replace) backend ``name`` of ``op``. Triton and CUDA kernel modules call this."""
    if name not in PRIORITY:
        raise ValueError(f"unknown backend {name!r}; expected one of {PRIORITY}")
    _BACKENDS.setdefault(op, {})[name] = Backend(name, applies, run)


def backends(op: str) -> list[str]:
    """Names of the backends registered for ``op``, in priority order."""
    have = _BACKENDS.get(op, {})
    return [n for n in PRIORITY if n in have]


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that will run this call: the forced one, or the first in priority order that applies."""
    have = _BACKENDS.get(op, {})
    forced = _FORCED.get(op) or _FORCED.get("*")
    if forced is not None:
        if forced not in have:
            raise ValueError(f"lowbit::{op}: backend {forced!r} was forced but is not registered "
                             f"(registered: {backends(op)})")
        return have[forced]
    for name in PRIORITY:
        b = have.get(name)
        if b is not None and b.applies(*args, **kwargs):
            return b
    raise RuntimeError(f"lowbit::{op}: no backend applies (registered: {backends(op)})")


def run(op: str, args: tuple, why_reference: Callable[[], str]) -> object:
    """Select a backend for ``op(*args)``, run it, and record which one ran.

    When the torch reference runs without having been forced, ``why_reference()`` says why (the op
    module knows what kernels it has) and :func:`note` warns once for that reason.
    """
    backend = select(op, *args)
    forced = op in _FORCED or "*" in _FORCED
    reason = why_reference() if backend.name == "torch" and not forced else None
    out = backend.run(*args)
    note(op, backend.name, reason)
    return out


def note(op: str, backend: str, fallback_reason: str | None = None) -> None:
    """Record that ``backend`` ran ``op``; warn once when it was a fallback to the reference."""
    with _RECORD.lock:
        _RECORD.last[op] = backend
        _RECORD.calls[(op, backend)] += 1
        for scope in _RECORD.scopes:
            scope.setdefault(op, set()).add(backend)
    if fallback_reason is not None and (op, fallback_reason) not in _WARNED:
        _WARNED.add((op, fallback_reason))
        warnings.warn(f"lowbit::{op}: {fallback_reason}; running the torch reference (slow)",
                      ReferenceFallbackWarning, stacklevel=3)


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of ``op`` (None before the first call)."""
    return _RECORD.last.get(op)


def call_counts() -> dict[tuple[str, str], int]:
    """How many calls each (op, backend) pair has run since import."""
    return dict(_RECORD.calls)


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, set[str]]]:
    """Collect ``{op: {backends that ran it}}`` for the calls made inside the ``with`` block."""
    scope: dict[str, set[str]] = {}
    with _RECORD.lock:
        _RECORD.scopes.append(scope)
    try:
        yield scope
    finally:
        with _RECORD.lock:
            _RECORD.scopes.remove(scope)


@contextlib.contextmanager
def use_backend(name: str, op: str = "*") -> Iterator[None]:
    """Force backend ``name`` for ``op`` (or every op) inside the block: for tests and benchmarks."""
    if name not in PRIORITY:
        raise ValueError(f"unknown backend {name!r}; expected one of {PRIORITY}")
    previous = _FORCED.get(op)
    _FORCED[op] = name
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(op, None)
        else:
            _FORCED[op] = previous
