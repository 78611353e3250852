"""Element-type codes shared with the native module (mirror of csrc/include/lowbit/dtype.h)."""

from __future__ import annotations

import enum

import torch


class DType(enum.IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    I8 = 3
    U8 = 4
    F8E4M3 = 5


class ActQuant(enum.IntEnum):
    """How the activation quantizer encodes its output (docs/formats.md)."""

    INT4_G64 = 0
    INT8_TOKEN = 1
    FP8_TOKEN = 2


_CODES = {
    torch.float32: DType.F32,
    torch.float16: DType.F16,
    torch.bfloat16: DType.BF16,
    torch.int8: DType.I8,
    torch.uint8: DType.U8,
    torch.float8_e4m3fn: DType.F8E4M3,
}


def code(dtype: torch.dtype) -> int:
    """The native code of a torch dtype; KeyError for one the native side does not know."""
    return int(_CODES[dtype])
