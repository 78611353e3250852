"""Input checks for the ``lowbit::`` ops.

They look only at tensor metadata (dtype, shape, device, strides), so they run on real tensors and on the
fake tensors that ``torch.compile`` traces with. Each failure raises :class:`OpInputError` naming the op,
the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import OpInputError

FLOAT16S = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def fail(op: str, arg: str, expected: str, got: object) -> None:
    raise OpInputError(f"lowbit::{op}: argument '{arg}' expected {expected}, got {got}")


def tensor(
    op: str,
    arg: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device | None = None,
    row_view: bool = False,
) -> torch.Tensor:
    """Check one tensor: type, dtype, rank and sizes (None = any), device, contiguity.

    ``row_view`` (2-d only): also accept a row-strided view, e.g. a column slice ``w[:, a:b]`` of a wider
    matrix: unit column stride and a row stride of at least the number of columns (:func:`row_stride`)."""
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "a torch.Tensor", type(t).__name__)
    if t.dtype not in dtypes:
        fail(op, arg, f"dtype in ({_names(dtypes)})", str(t.dtype).replace("torch.", ""))
    if t.dim() != len(shape):
        fail(op, arg, f"a {len(shape)}-d tensor", f"shape {tuple(t.shape)}")
    for axis, (want, have) in enumerate(zip(shape, t.shape)):
        if want is not None and want != have:
            want_shape = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            fail(op, arg, f"shape {want_shape} (dim {axis} = {want})", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        fail(op, arg, f"a tensor on {device} (like the first input)", f"a tensor on {t.device}")
    if row_view and t.dim() == 2:
        if not _row_strided(t):
            fail(op, arg, "a contiguous tensor or a row-strided view (column stride 1, row stride >= columns)",
                 f"strides {t.stride()} for shape {tuple(t.shape)} (call .contiguous())")
    elif not t.is_contiguous():
        fail(op, arg, "a contiguous tensor", f"strides {t.stride()} (call .contiguous())")
    return t


def _row_strided(t: torch.Tensor) -> bool:
    rows, cols = t.shape
    return t.is_contiguous() or ((t.stride(1) == 1 or cols <= 1) and (rows <= 1 or t.stride(0) >= cols))


def row_stride(t: torch.Tensor) -> int:
    """The element distance between rows of a 2-d tensor that passed ``tensor(..., row_view=True)``: its
    row stride, or its width where the stride does not matter (one row, or a contiguous tensor)."""
    return t.shape[1] if t.shape[0] <= 1 or t.is_contiguous() else t.stride(0)


def optional(op: str, arg: str, t: torch.Tensor | None, **kw) -> torch.Tensor | None:
    return None if t is None else tensor(op, arg, t, **kw)


def multiple(op: str, arg: str, value: int, of: int, what: str | None = None) -> None:
    """``value`` (a size of ``arg``, described by ``what``) must be a multiple of ``of``."""
    if value % of != 0:
        fail(op, arg, f"{what or 'a size'} to be a multiple of {of}", value)


def one_of(op: str, arg: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        fail(op, arg, f"one of {list(allowed)}", repr(value))


def pair(op: str, a: str, ta: object, b: str, tb: object) -> None:
    """Two optional arguments that only make sense together (lora_act with lora_up)."""
    if (ta is None) != (tb is None):
        fail(op, f"{a}/{b}", "both or neither", f"{a}={'set' if ta is not None else None}, "
             f"{b}={'set' if tb is not None else None}")


def aligned(op: str, arg: str, t: torch.Tensor | None, nbytes: int = 16) -> None:
    """Real tensors only (reads data_ptr): vectorized kernels load ``nbytes`` at a time."""
    if t is not None and t.data_ptr() % nbytes != 0:
        fail(op, arg, f"a {nbytes}-byte aligned data pointer (a view at an odd offset? use .clone())",
             f"address {t.data_ptr():#x}")


# ---- the Python types of an op's arguments, checked before torch's schema check ------------------

# Schema type -> the Python types a caller may pass (int arguments include dtypes: torch takes a
# ScalarType where the schema says int, e.g. out_dtype).
_SCHEMA_PY: dict[str, tuple[type, ...]] = {
    "Tensor": (torch.Tensor,), "str": (str,), "int": (int, torch.dtype), "float": (float, int), "bool": (bool,),
}
_ARG_TYPES: dict[str, tuple[tuple[str, str, bool], ...]] = {}


def _arg_types(op: str) -> tuple[tuple[str, str, bool], ...]:
    """``(name, base type, optional)`` of each argument of ``lowbit::op``, read once from its schema."""
    have = _ARG_TYPES.get(op)
    if have is None:
        out = []
        for a in getattr(torch.ops.lowbit, op).default._schema.arguments:
            t = str(a.type)
            optional = t.startswith("Optional[")
            out.append((a.name, t[len("Optional["):-1] if optional else t, optional))
        have = _ARG_TYPES[op] = tuple(out)
    return have


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    if isinstance(value, str):
        return f"the str {value!r}"
    return "None" if value is None else f"a {type(value).__name__}"


def schema_types(op: str, args: Sequence[object]) -> None:
    """Check each argument's Python type against ``lowbit::op``'s schema, naming the first that is wrong.

    torch's own schema check would raise a RuntimeError that names neither the project's op wrapper nor
    what was expected in its words; this raises :class:`OpInputError` first.

    Example:
        >>> import lowbit_engine.ops
        >>> schema_types("quantize_act", ([1, 2], None, None, "int4"))
        Traceback (most recent call last):
        ...
        lowbit_engine.errors.OpInputError: lowbit::quantize_act: argument 'x' expected a torch.Tensor, got a list of 2 item(s)
    """
    spec = _arg_types(op)
    if len(args) != len(spec):
        fail(op, "*", f"{len(spec)} arguments ({', '.join(n for n, _, _ in spec)})", f"{len(args)}")
    for (name, base, optional), value in zip(spec, args):
        if value is None and optional:
            continue
        allowed = _SCHEMA_PY.get(base)
        if allowed is None:  # a schema type this table does not know: torch checks it
            continue
        if not isinstance(value, allowed) or (base in ("int", "float") and isinstance(value, bool)):
            what = {"Tensor": "a torch.Tensor", "str": "a str", "int": "an int or torch.dtype",
                    "float": "a float", "bool": "a bool"}[base]
            fail(op, name, what + (" or None" if optional else ""), _describe(value))


def call(op: str, *args: object) -> object:
    """``torch.ops.lowbit.<op>(*args)`` after :func:`schema_types`: the entry every public op wrapper uses.

    While ``torch.compile`` traces, the check is left to the op's fake kernel (which runs the full
    metadata checks); dynamo has already bound the arguments by then.
    """
    if not torch.compiler.is_compiling():
        schema_types(op, args)
    return getattr(torch.ops.lowbit, op)(*args)


def positive_finite(op: str, arg: str, t: torch.Tensor | None) -> None:
    """Every value of ``t`` finite and > 0 (a divisor such as ``smooth``: 0 would give Inf scales).

    Reads the data, so it runs on CPU tensors only (the op's caller is there anyway; on a GPU the check
    would synchronize every call: the modules check their smoothing factors when built or loaded, with
    ``check_buffers``).
    """
    if t is None or t.device.type != "cpu" or t.numel() == 0:
        return
    ok = torch.isfinite(t) & (t > 0)
    if not bool(ok.all()):
        k = int((~ok).nonzero()[0, 0])
        fail(op, arg, "finite values > 0 (it divides x)", f"{float(t[k])} at index {k}")
