"""Triton FP8 W8A8 GEMM of the ``fp8`` format: fused per-token activation quantizer + fp8 ``tl.dot`` GEMM.

Math contract: docs/formats.md, "fp8 e4m3, per row". Two kernels:

* ``_quantize_fp8_rowwise_kernel``: one program per row of ``x [M, K]`` (bf16, fp16 or fp32; K up to
  16384) loads the row once into registers, takes ``amax``, ``scale = amax / 448`` (fp32, 1 when that is
  0) and stores ``q = e4m3(clamp(x / scale, -448, 448))`` rounded to nearest even, plus ``scale``. It is
  bit-exact with :func:`lowbit_engine.formats.fp8.quantize`.
* the GEMM ``out[m, n] = (sum_k qa[m, k] * qw[n, k]) * sa[m] * sw[n] (+ lora_act[m, :] . lora_up[n, :])
  (+ bias[n])`` is kernels/gemm8.py's 8-bit GEMM (e4m3 tiles through ``tl.dot`` with fp32 accumulate, the
  two row scales applied once in the epilogue, acc * sa first, then * sw; the low-rank term in fp32, this
  format's contract). The kernel this module used to hold passed the e4m3 tensors as uint8 and bitcast
  them inside; it reached 175-257 TFLOP/s on the H100 where the same math with float8 tensors reached
  1050-1196 (../shared/DESIGN.md), so it is gone.

The e4m3 cast is written out on the fp32 bit pattern (round to nearest even on the integer bits, an
integer shift with a sticky remainder for the e4m3 subnormals) instead of ``.to(tl.float8e4nv)``: compiled
code would round correctly (``cvt.rn.satfinite.e4m3x2.f32``), but the Triton interpreter's cast is wrong
(it rounds ties away and mis-rounds some values by a binade), and the CPU tests must check the very code
that runs on the GPU. The division is ``tl.div_rn`` (IEEE division, never the approximate ``div.full``).

Tile choice: :func:`choose_config` (a table keyed by (M bucket, N, K), with an in-process cache). With
``LOWBIT_AUTOTUNE=1`` on a GPU, the first call of a shape times the candidate tiles with
``triton.testing.do_bench`` and stores the winner in ``~/.cache/lowbit_engine/triton_autotune.json`` keyed by
GPU name, kernel and shape, so the next process does not search again.

CPU: as ``gemm_w4a4``, the kernels run under the Triton interpreter only when ``TRITON_INTERPRET=1`` was
set before this module was imported; the tests load a private interpreted copy of the module. Only
builtins of ``triton.language`` are called inside the kernels (no ``tl.zeros``, ``tl.cdiv`` or ``tl.max``,
which are ``@triton.jit`` functions), for the reason given in ``gemm_w4a4._gemm_w4_kernel``; the one
exception is ``_max_combine``, the amax combine function, which lives in this module and so is interpreted
in an interpreted copy.

Example (on a CUDA GPU)::

    from lowbit_engine.formats import fp8
    from lowbit_engine.kernels.fp8_gemm import fp8_linear_triton
    w_q, w_s = fp8.quantize(torch.randn(3072, 3072, device="cuda"))
    y = fp8_linear_triton(torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16), w_q, w_s)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

E4M3_MAX = 448.0
MAX_QUANT_K = 16384  # the quantizer holds one row in registers
_F8_MAX = tl.constexpr(448.0)


@triton.jit
def _max_combine(a, b):
    """Combine function of the row amax (defined here, not ``tl.max``: that is a ``@triton.jit`` function of
    triton.language, which an interpreted kernel cannot call once Triton runs compiled in the process)."""
    return tl.maximum(a, b)


@triton.jit
def _quantize_fp8_rowwise_kernel(x_ptr, q_ptr, scale_ptr, K, BLOCK_K: tl.constexpr):
    """One row per program: amax, scale, then the e4m3 cast (RNE on the fp32 bits), one read of x."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 0, _max_combine)
    scale = amax / 448.0
    scale = tl.where(scale > 0.0, scale, 1.0)
    y = tl.div_rn(x, tl.full((BLOCK_K,), 0.0, tl.float32) + scale)
    y = tl.minimum(tl.maximum(y, -_F8_MAX), _F8_MAX)
    # --- fp32 -> e4m3 bits, round to nearest even (|y| <= 448, finite) ---
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits with RNE on the integer pattern, rebias 127 -> 7
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal_bits = (r >> 20) - 960
    # subnormal e4m3 (|y| < 2^-6): round(|y| * 2^9) = RNE of (mantissa with implicit bit) >> (14 - e)
    e = (a >> 23) - 127
    mant = (a & 0x7FFFFF) | 0x800000
    sh = tl.minimum(14 - e, 25)
    qi = mant >> sh
    rem = mant - (qi << sh)
    half = (rem * 0 + 1) << (sh - 1)
    qi = qi + ((rem > half) | ((rem == half) & ((qi & 1) == 1))).to(tl.int32)
    bits = tl.where(a >= 0x3C800000, normal_bits, qi) | sign
    tl.store(q_ptr + row * K + offs, bits.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + row, scale)


# --------------------------------------------------------------------------------------------------
# tile configurations, table and autotune cache


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int = 128
    block_r: int = 32
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Defaults per M bucket (first bound >= M applies). The large-M tile is the one measured in DESIGN.md
# (128x256x128, 8 warps, 3 stages: 1050-1196 TFLOP/s on FLUX shapes). Small M is weight-bandwidth bound:
# short tiles waste no MMA rows and more column tiles fill the SMs. These small-M entries are not measured.
M_BUCKETS = (16, 64, 256, 2**62)
DEFAULT_BY_BUCKET: dict[int, TileConfig] = {
    16: TileConfig(16, 64, 256, num_warps=4, num_stages=4),
    64: TileConfig(64, 128, 128, num_warps=4, num_stages=4),
    256: TileConfig(128, 128, 128, num_warps=8, num_stages=3),
    2**62: TileConfig(128, 256, 128, num_warps=8, num_stages=3),
}
# Shape-specific entries, keyed by (M bucket, N, K); filled from measurements (none recorded yet).
SHAPE_TABLE: dict[tuple[int, int, int], TileConfig] = {}
CANDIDATES: tuple[TileConfig, ...] = (
    TileConfig(16, 64, 256, num_warps=4, num_stages=4),
    TileConfig(32, 64, 128, num_warps=4, num_stages=4),
    TileConfig(64, 64, 128, num_warps=4, num_stages=4),
    TileConfig(64, 128, 128, num_warps=4, num_stages=4),
    TileConfig(128, 128, 128, num_warps=8, num_stages=3),
    TileConfig(128, 256, 128, num_warps=8, num_stages=3),
    TileConfig(128, 128, 128, num_warps=4, num_stages=4),
    TileConfig(256, 128, 128, num_warps=8, num_stages=3),
)
INTERPRETER_CONFIG = TileConfig(32, 32, 32, block_r=16, group_m=2, num_warps=1, num_stages=1)

_CACHE: dict[tuple[str, int, int, int], TileConfig] = {}


def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return not isinstance(_quantize_fp8_rowwise_kernel, triton.runtime.jit.JITFunction)


_gemm8 = None  # kernels/gemm8.py, imported on first use (it imports this module); tests set an interpreted copy


def _gemm8_module():
    global _gemm8
    if _gemm8 is None:
        from lowbit_engine.kernels import gemm8

        _gemm8 = gemm8
    return _gemm8


def m_bucket(M: int) -> int:
    for bound in M_BUCKETS:
        if M <= bound:
            return bound
    return M_BUCKETS[-1]


def cache_path() -> Path:
    """The autotune results file (``LOWBIT_CACHE_DIR`` overrides ``~/.cache/lowbit_engine``)."""
    root = os.environ.get("LOWBIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit_engine")
    return Path(root) / "triton_autotune.json"


def _disk_key(kernel: str, gpu: str, bucket: int, N: int, K: int) -> str:
    return f"{gpu}|{kernel}|{bucket}|{N}|{K}"


def _read_disk() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, cfg: TileConfig) -> None:
    path = cache_path()
    data = _read_disk()
    data[key] = asdict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file


def autotune_enabled() -> bool:
    return os.environ.get("LOWBIT_AUTOTUNE", "0") == "1" and torch.cuda.is_available() and not interpreted()


def choose_config(M: int, N: int, K: int, *, kernel: str = "fp8_gemm",
                  bench: Callable[[TileConfig], float] | None = None,
                  candidates: tuple[TileConfig, ...] = CANDIDATES,
                  defaults: dict[int, TileConfig] | None = None,
                  table: dict[tuple[int, int, int], TileConfig] | None = None) -> TileConfig:
    """The tile configuration for an ``[M, K] x [N, K]^T`` problem.

    Order: in-process cache; the interpreter config (under ``TRITON_INTERPRET``); with ``LOWBIT_AUTOTUNE=1``
    on a GPU and a ``bench`` callable (ms for a config), the on-disk result for (GPU, kernel, M bucket, N, K)
    or a fresh search over ``candidates`` written there; else ``table[(bucket, N, K)]`` or the bucket's
    default. Shared by the fp4 kernels (``kernel`` names the cache entry).
    """
    bucket = m_bucket(M)
    key = (kernel, bucket, N, K)
    if key in _CACHE:
        return _CACHE[key]
    if interpreted():
        return INTERPRETER_CONFIG
    defaults = DEFAULT_BY_BUCKET if defaults is None else defaults
    table = SHAPE_TABLE if table is None else table
    cfg = table.get((bucket, N, K), defaults[bucket])
    if bench is not None and autotune_enabled():
        gpu = torch.cuda.get_device_name()
        dkey = _disk_key(kernel, gpu, bucket, N, K)
        stored = _read_disk().get(dkey)
        if stored is not None:
            cfg = TileConfig(**stored)
        else:
            timings = []
            for cand in candidates:
                try:
                    timings.append((bench(cand), cand))
                except Exception:  # noqa: BLE001  (a tile that does not fit shared memory is skipped)
                    continue
            if timings:
                cfg = min(timings, key=lambda t: t[0])[1]
                _write_disk(dkey, cfg)
    _CACHE[key] = cfg
    return cfg


# --------------------------------------------------------------------------------------------------
# launch


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _need_device(t: Tensor, what: str) -> None:
    if not interpreted() and not t.is_cuda:
        raise RuntimeError(f"the Triton {what} needs CUDA tensors; on the CPU it runs only under the Triton "
                           "interpreter (TRITON_INTERPRET=1 set before the kernel module is imported)")


def _check_2d(name: str, t: Tensor, dtypes: tuple, rows: int | None = None, cols: int | None = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 2-d tensor of dtype in {dtypes}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name}: expected shape ({rows}, {cols}), got {tuple(t.shape)}")


def quantize_fp8_rowwise_triton(x: Tensor, *, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 quantization of ``x [M, K]`` (bf16/fp16/fp32, K <= 16384), bit-exact with
    :func:`lowbit_engine.formats.fp8.quantize`: returns ``(q float8_e4m3fn [M, K], scale fp32 [M])``."""
    _check_2d("quantize_fp8_rowwise_triton: x", x, (torch.bfloat16, torch.float16, torch.float32))
    M, K = x.shape
    if not 1 <= K <= MAX_QUANT_K:
        raise ValueError(f"quantize_fp8_rowwise_triton: K must be in [1, {MAX_QUANT_K}], got {K}")
    _need_device(x, "fp8 quantizer")
    if out is None:
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty(M, dtype=torch.float32, device=x.device)
    else:
        q, scale = out
    if M == 0:
        return q, scale
    block_k = max(16, triton.next_power_of_2(K))
    num_warps = 1 if interpreted() else min(16, max(1, block_k // 1024))
    with _device_guard(x):
        _quantize_fp8_rowwise_kernel[(M,)](x, q.view(torch.uint8), scale, K, BLOCK_K=block_k, num_warps=num_warps)
    return q, scale


def _check_epilogue(fn: str, M: int, N: int, lora_act, lora_up, bias, out_dtype) -> int:
    if (lora_act is None) != (lora_up is None):
        raise ValueError(f"{fn}: lora_act and lora_up go together (both or neither)")
    R = 0
    if lora_act is not None:
        _check_2d(f"{fn}: lora_act", lora_act, (torch.float32,), M, None)
        R = lora_act.shape[1]
        _check_2d(f"{fn}: lora_up", lora_up, (torch.bfloat16, torch.float16, torch.float32), N, R)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or not bias.is_contiguous()
                             or bias.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        raise ValueError(f"{fn}: bias must be a contiguous bf16/fp16/fp32 [{N}], got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{fn}: out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    return R


def _out_tensor(out: Tensor | None, M: int, N: int, out_dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(M, N, dtype=out_dtype, device=device)
    if out.shape != (M, N) or out.dtype != out_dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {out_dtype} tensor of shape ({M}, {N}) on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def fp8_gemm_triton(
    a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, lora_act: Tensor | None = None,
    lora_up: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    *, out: Tensor | None = None, config: TileConfig | None = None,
) -> Tensor:
    """``(qa @ qw^T) * sa[:, None] * sw[None, :] + lora_act @ lora_up^T + bias`` in ``out_dtype``.

    Args:
        a_q, a_scale: e4m3 ``[M, K]`` and fp32 ``[M]``; w_q, w_scale: e4m3 ``[N, K]`` and fp32 ``[N]``
            (K a multiple of 16).
        lora_act, lora_up: optional fp32 ``[M, R]`` and bf16/fp16/fp32 ``[N, R]``; bias: optional ``[N]``.
    """
    fn = "fp8_gemm_triton"
    _check_2d(f"{fn}: a_q", a_q, (torch.float8_e4m3fn,))
    _check_2d(f"{fn}: w_q", w_q, (torch.float8_e4m3fn,), None, a_q.shape[1])
    return _gemm8_module().gemm8_triton(a_q, a_scale, w_q, w_scale, lora_act, lora_up, bias, out_dtype,
                                        lora_16bit=False, out=out, config=config, kernel_name="fp8_gemm")


def fp8_linear_triton(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, lora_down: Tensor | None = None,
    lora_up: Tensor | None = None, out_dtype: torch.dtype | None = None, *, out: Tensor | None = None,
    config: TileConfig | None = None,
) -> Tensor:
    """The whole ``fp8`` layer: quantize ``x [M, K]`` per token (Triton), then the fp8 GEMM with the
    optional low-rank branch ``(x @ lora_down^T) @ lora_up^T`` (the down-projection is a torch fp32
    matmul for now, not fused into the quantizer) and the bias. Output in ``out_dtype`` (default x's)."""
    if lora_down is not None:
        if lora_up is None or lora_down.dim() != 2 or lora_down.shape[1] != x.shape[-1]:
            raise ValueError("fp8_linear_triton: lora_down must be [R, K] and come with lora_up [N, R]")
    elif lora_up is not None:
        raise ValueError("fp8_linear_triton: lora_up without lora_down")
    a_q, a_scale = quantize_fp8_rowwise_triton(x)
    lora_act = None
    if lora_down is not None and lora_down.shape[0] > 0:
        lora_act = (x.float() @ lora_down.float().t()).contiguous()
    else:
        lora_up = None
    return fp8_gemm_triton(a_q, a_scale, w_q, w_scale, lora_act, lora_up, bias,
                           x.dtype if out_dtype is None else out_dtype, out=out, config=config)


# --------------------------------------------------------------------------------------------------
# dispatch helpers


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_tensor_cores(t: Tensor) -> bool:
    """CUDA (not ROCm), compiled kernels, and fp8 e4m3 MMA (sm_89 or newer)."""
    if not t.is_cuda or torch.version.hip is not None or interpreted():
        return False
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= (8, 9)
