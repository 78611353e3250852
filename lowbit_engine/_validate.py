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
) -> torch.Tensor:
    """Check one tensor: type, dtype, rank and sizes (None = any), device, contiguity."""
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
    if not t.is_contiguous():
        fail(op, arg, "a contiguous tensor", f"strides {t.stride()} (call .contiguous())")
    return t


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
