"""Pure-torch references of the kernel ops: the math every backend (C++ CPU, CUDA, Triton) must match.

Each function follows docs/formats.md step for step and runs on any device. Integer parts are exact;
with ``accum_dtype=torch.float32`` the GEMMs apply the scales with the same fp32 operations in the same
order as the contract (so, without a low-rank term, they agree with the C++ reference bit for bit);
with ``accum_dtype=torch.float64`` they give the float64 reference of the same quantized math that
tests measure every backend against.

Why divisions here use tensor divisors: on CUDA, ``tensor / python_number`` is computed as a multiply by
the reciprocal, which is not the correctly rounded fp32 division the contract requires.

Example:
    >>> import torch
    >>> from lowbit_engine import reference as ref
    >>> from lowbit_engine.formats import int4
    >>> x = torch.randn(3, 128, dtype=torch.bfloat16)
    >>> qw, sw = int4.quantize(torch.randn(16, 128), scale_dtype=torch.bfloat16)
    >>> qa, sa, _ = ref.quantize_act(x, mode="int4")
    >>> ref.gemm_w4a4(qa, sa, int4.pack(qw), sw).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import math

import torch

from .formats import f8l, i8q, int4, vq

GROUP = int4.GROUP_SIZE
ACT_MODES = ("int4", "int8", "fp8")
_FLOAT16S = (torch.bfloat16, torch.float16)
# The kernels write bf16, fp16 or fp32; float64 is accepted here to read the float64 reference unrounded.
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _require(ok: bool, op: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"reference.{op}: {msg}")


def _div(x: torch.Tensor, by: float) -> torch.Tensor:
    """``x / by`` as a correctly rounded division on every device (see the module docstring)."""
    return x / torch.full_like(x, by)


def _act_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax``, NaN where amax is NaN or infinite (docs/formats.md, "Non-finite values"): the NaN
    scale then gives q = 0 and a NaN GEMM output for that row, on every backend alike."""
    return torch.where(torch.isfinite(amax), _div(amax, qmax), torch.full_like(amax, float("nan")))


# ---- activation quantizer ---------------------------------------------------------------------


def _quantize_int4_g64(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 group 64 of fp32 ``xs [M, K]``: fp32 scales ``amax / 7`` and packed ``uint8 [M, K/2]``."""
    M, K = xs.shape
    g = xs.reshape(M, K // GROUP, GROUP)
    scale = _act_scale(g.abs().amax(dim=-1), 7.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    q = torch.where(scale[..., None] > 0, torch.round(g / safe).clamp(-8, 7), torch.zeros_like(g))
    return int4.pack(q.to(torch.int8).reshape(M, K)), scale


def _quantize_per_token(xs: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (``amax / 127``, rint, clamp +-127) or fp8 (``amax / 448``, clamp +-448, e4m3 RNE) per row."""
    qmax = 127.0 if mode == "int8" else 448.0
    scale = _act_scale(xs.abs().amax(dim=-1), qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    y = xs / safe
    if mode == "int8":
        y = torch.round(y)
    y = torch.where(scale[:, None] > 0, y.clamp(-qmax, qmax), torch.zeros_like(y))
    return y.to(torch.int8 if mode == "int8" else torch.float8_e4m3fn), scale


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    mode: str = "int4",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused activation quantizer (op ``lowbit::quantize_act``).

    ``x [M, K]`` bf16/fp16; ``smooth`` fp32 ``[K]`` divides x before quantization (fp32 division);
    ``lora_down [R, K]`` gives ``lora_act = x @ lora_down^T`` in fp32 on the RAW x (SVDQuant folds the
    smoothing into lora_down).

    Returns ``(q, scales, lora_act | None)``:
      - ``"int4"``: packed ``uint8 [M, K/2]`` and fp32 ``[M, K/64]`` group scales (K % 64 == 0);
      - ``"int8"``: ``int8 [M, K]`` and fp32 ``[M]``;
      - ``"fp8"``: ``float8_e4m3fn [M, K]`` and fp32 ``[M]``.
    A zero row or group gets scale 0 and q 0.

    Example:
        >>> x = torch.randn(2, 64, dtype=torch.float16)
        >>> q, s, la = quantize_act(x, lora_down=torch.randn(8, 64, dtype=torch.float16), mode="int8")
        >>> q.dtype, s.shape, la.shape
        (torch.int8, torch.Size([2]), torch.Size([2, 8]))
    """
    op = "quantize_act"
    _require(mode in ACT_MODES, op, f"mode must be one of {ACT_MODES}, got {mode!r}")
    _require(x.dim() == 2 and x.dtype in _FLOAT16S, op, f"x must be bf16/fp16 [M, K], got {x.dtype} {tuple(x.shape)}")
    M, K = x.shape
    _require(K > 0, op, "K must be > 0")
    if mode == "int4":
        _require(K % GROUP == 0, op, f"K must be a multiple of {GROUP} for int4, got {K}")
    xf = x.float()
    if smooth is not None:
        _require(smooth.shape == (K,), op, f"smooth must be [K={K}], got {tuple(smooth.shape)}")
        xs = xf / smooth.float()
    else:
        xs = xf
    q, scales = _quantize_int4_g64(xs) if mode == "int4" else _quantize_per_token(xs, mode)
    lora_act = None
    if lora_down is not None:
        _require(lora_down.dim() == 2 and lora_down.shape[1] == K, op,
                 f"lora_down must be [R, K={K}], got {tuple(lora_down.shape)}")
        lora_act = xf @ lora_down.float().T
    return q, scales, lora_act


def norm_modulate_quantize(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    mode: str = "int8",
    tokens_per_sample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """An entry linear's input in one op: adaLN ``y = LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without
    affine, in fp32), rounded to x's dtype once, then :func:`quantize_act` of ``y``.

    ``x [M, K]`` bf16/fp16 with M = B * T (``tokens_per_sample`` = T, default M), ``shift`` / ``scale``
    ``[B, K]``. Returns ``(q, scales, lora_act, y)``. The LayerNorm statistics are floating point (their
    summation order is free); given ``y``, q, scales and lora_act are exactly :func:`quantize_act`'s.

    Example:
        >>> x = torch.randn(6, 64, dtype=torch.bfloat16)
        >>> sh, sc = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)
        >>> q, s, _, y = norm_modulate_quantize(x, sh, sc, 1e-6, tokens_per_sample=3)
        >>> q.dtype, y.shape
        (torch.int8, torch.Size([6, 64]))
    """
    M, K = x.shape
    T = M if tokens_per_sample is None else tokens_per_sample
    _require(T >= 1 and M % T == 0, "norm_modulate_quantize", f"{M} tokens are not whole samples of {T}")
    B = M // T
    xf = x.float()
    mean = xf.mean(dim=1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=1, keepdim=True)
    norm = (xf - mean) * torch.rsqrt(var + eps)
    sc = scale.float().repeat_interleave(T, dim=0)
    sh = shift.float().repeat_interleave(T, dim=0)
    _require(sc.shape == (M, K) and B * T == M, "norm_modulate_quantize", f"shift/scale must be [B={B}, K={K}]")
    y = (norm * (1 + sc) + sh).to(x.dtype)
    q, s, la = quantize_act(y, smooth=smooth, lora_down=lora_down, mode=mode)
    return q, s, la, y


EXIT_ACTIVATIONS = ("none", "gelu_tanh")
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


def exit_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation an exit epilogue applies to a GEMM's 16-bit output ``h``: ``"none"`` or ``"gelu_tanh"``
    (diffusers' ``GELU(approximate="tanh")``, FLUX's MLP), computed in fp32 and rounded back to h's dtype
    as the unfused path holds it. tanh is written as ``1 - 2 / (exp(2u) + 1)`` so the kernels can use the same
    formula; it differs from torch's tanh by fp32 ulps, which round away in the 16-bit result nearly always.

    Example:
        >>> exit_activation(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.bfloat16), "gelu_tanh")
        tensor([-0.1592,  0.0000,  1.9531], dtype=torch.bfloat16)
    """
    _require(activation in EXIT_ACTIVATIONS, "exit_activation",
             f"activation must be one of {EXIT_ACTIVATIONS}, got {activation!r}")
    if activation == "none":
        return h
    x = h.float()
    u = _GELU_C * (x + 0.044715 * (x * x * x))
    t = 1.0 - 2.0 / (torch.exp(2.0 * u) + 1.0)
    return (0.5 * x * (1.0 + t)).to(h.dtype)


def quantize_act_static(
    x: torch.Tensor,
    scale: float,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    mode: str = "fp8",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """8-bit activations with one static per-tensor scale (the exit linears' input, docs/formats.md "Exit
    quantizer"): ``xs = x / smooth`` (fp32), ``q = rint(clamp(xs / scale, +-127))`` (int8) or
    ``e4m3(clamp(xs / scale, +-448))`` (fp8); values beyond the range saturate. ``scales`` is ``[M]`` filled
    with ``scale`` (the GEMMs take per-token scales), except that a row holding a NaN or an infinity gets a
    NaN scale (its non-finite elements get q = 0), so the GEMM writes NaN for that token as the per-token
    quantizer does. ``lora_act = x @ lora_down^T`` in fp32 on the raw x.

    Example:
        >>> q, s, la = quantize_act_static(torch.randn(3, 64, dtype=torch.bfloat16), 0.02, mode="int8")
        >>> q.dtype, s.tolist() == [0.019999999552965164] * 3
        (torch.int8, True)
    """
    op = "quantize_act_static"
    _require(mode in ("int8", "fp8"), op, f"mode must be 'int8' or 'fp8', got {mode!r}")
    _require(x.dim() == 2 and x.dtype in _FLOAT16S, op, f"x must be bf16/fp16 [M, K], got {x.dtype} {tuple(x.shape)}")
    _require(math.isfinite(scale) and scale > 0, op, f"scale must be a finite float > 0, got {scale!r}")
    M, K = x.shape
    xs = x.float() if smooth is None else x.float() / smooth.float()
    qmax = 127.0 if mode == "int8" else 448.0
    finite = torch.isfinite(xs)
    y = (torch.where(finite, xs, torch.zeros_like(xs)) / torch.tensor(scale, dtype=torch.float32)).clamp(-qmax, qmax)
    if mode == "int8":
        y = torch.round(y)
    q = y.to(torch.int8 if mode == "int8" else torch.float8_e4m3fn)
    scales = torch.full((M,), scale, dtype=torch.float32, device=x.device)
    scales = torch.where(finite.all(dim=1), scales, torch.full_like(scales, float("nan")))
    lora_act = None
    if lora_down is not None:
        _require(lora_down.dim() == 2 and lora_down.shape[1] == K, op,
                 f"lora_down must be [R, K={K}], got {tuple(lora_down.shape)}")
        lora_act = x.float() @ lora_down.float().T
    return q, scales, lora_act


# ---- GEMMs ------------------------------------------------------------------------------------


def _group_dots(a: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``[G, M, N]`` sums over each 64-group of ``a[m, k] * qw[n, k]``, in float64.

    Exact for int4/int8 activations (integers far below 2^53) and for e4m3 ones (every product is a
    multiple of 2^-9 below 2^12, so a group sum needs fewer than 53 bits).
    """
    M, K = a.shape
    N = qw.shape[0]
    G = K // GROUP
    ag = a.double().reshape(M, G, GROUP).permute(1, 0, 2)  # [G, M, 64]
    wg = qw.double().reshape(N, G, GROUP).permute(1, 2, 0)  # [G, 64, N]
    return torch.bmm(ag, wg)


def _check_gemm(op: str, M: int, K: int, w: torch.Tensor, w_scales: torch.Tensor, lora_act, lora_up,
                bias, out_dtype: torch.dtype, accum_dtype: torch.dtype) -> int:
    _require(K > 0 and K % GROUP == 0, op, f"K must be a positive multiple of {GROUP}, got {K}")
    _require(w.dtype == torch.uint8 and w.dim() == 2 and w.shape[1] * 2 == K, op,
             f"w must be uint8 [N, K/2={K // 2}], got {w.dtype} {tuple(w.shape)}")
    N = w.shape[0]
    _require(tuple(w_scales.shape) == (N, K // GROUP), op,
             f"w_scales must be [N={N}, K/64={K // GROUP}], got {tuple(w_scales.shape)}")
    _require((lora_act is None) == (lora_up is None), op, "lora_act and lora_up come both or neither")
    if lora_act is not None:
        _require(lora_act.dim() == 2 and lora_up.dim() == 2 and lora_act.shape[0] == M
                 and lora_up.shape[0] == N and lora_act.shape[1] == lora_up.shape[1], op,
                 f"lora_act must be [M={M}, R] and lora_up [N={N}, R], got {tuple(lora_act.shape)} "
                 f"and {tuple(lora_up.shape)}")
    if bias is not None:
        _require(tuple(bias.shape) == (N,), op, f"bias must be [N={N}], got {tuple(bias.shape)}")
    _require(out_dtype in _OUT_DTYPES, op, f"out_dtype must be bf16, fp16, fp32 or fp64, got {out_dtype}")
    _require(accum_dtype in (torch.float32, torch.float64), op, f"accum_dtype must be fp32 or fp64, got {accum_dtype}")
    return N


def _epilogue(acc: torch.Tensor, lora_act: torch.Tensor | None, lora_up: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``acc += lora_act @ lora_up^T; acc += bias``, in acc's dtype, then one rounding to out_dtype."""
    if lora_act is not None and lora_act.shape[1] > 0:
        acc = acc + lora_act.to(acc.dtype) @ lora_up.to(acc.dtype).T
    if bias is not None:
        acc = acc + bias.to(acc.dtype)
    return acc.to(out_dtype)


def gemm_w4a4(
    act: torch.Tensor,
    act_scales: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    lora_act: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W4A4 GEMM (op ``lowbit::gemm_w4a4``): ``out [M, N]`` from packed int4 activations and weights.

    ``act uint8 [M, K/2]`` with fp32 ``act_scales [M, K/64]``; ``w uint8 [N, K/2]`` with bf16
    ``w_scales [N, K/64]``; optional ``lora_act`` fp32 ``[M, R]`` with ``lora_up [N, R]`` (bf16/fp16), and
    ``bias [N]``. Per 64-group the exact integer sum is scaled by ``sa * sw`` (that product first, fp32)
    and accumulated; ``accum_dtype=torch.float64`` (with ``out_dtype=torch.float64`` to skip the final
    rounding) gives the float64 reference.

    Example:
        >>> qa, sa, _ = quantize_act(torch.randn(1, 64, dtype=torch.bfloat16))
        >>> qw, sw = int4.quantize(torch.randn(4, 64), scale_dtype=torch.bfloat16)
        >>> gemm_w4a4(qa, sa, int4.pack(qw), sw, out_dtype=torch.float32).dtype
        torch.float32
    """
    op = "gemm_w4a4"
    _require(act.dtype == torch.uint8 and act.dim() == 2, op, f"act must be uint8 [M, K/2], got {act.dtype}")
    M, K = act.shape[0], act.shape[1] * 2
    _check_gemm(op, M, K, w, w_scales, lora_act, lora_up, bias, out_dtype, accum_dtype)
    _require(tuple(act_scales.shape) == (M, K // GROUP), op,
             f"act_scales must be [M={M}, K/64={K // GROUP}], got {tuple(act_scales.shape)}")
    isum = _group_dots(int4.unpack(act), int4.unpack(w))  # [G, M, N], exact
    sa, sw = act_scales.float(), w_scales.float()
    if accum_dtype == torch.float64:
        scale = sa.double().T[:, :, None] * sw.double().T[:, None, :]  # exact products, [G, M, N]
        acc = (isum * scale).sum(dim=0)
    else:
        acc = torch.zeros(isum.shape[1:], dtype=torch.float32, device=act.device)
        for g in range(isum.shape[0]):  # the contract's order: acc += float(isum) * (sa * sw)
            acc = acc + isum[g].float() * (sa[:, g, None] * sw[None, :, g])
    return _epilogue(acc, lora_act, lora_up, bias, out_dtype)


def gemm_w4a8(
    act: torch.Tensor,
    act_scales: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    lora_act: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W4A8 GEMM (op ``lowbit::gemm_w4a8``): 8-bit per-token activations times int4 group-64 weights.

    ``act`` int8 or float8_e4m3fn ``[M, K]`` with fp32 ``act_scales [M]``; the rest as :func:`gemm_w4a4`.
    Per group the sum ``sum_k qa * qw`` (exact for int8; for fp8 the exact sum rounded once to fp32, a
    valid choice since its order is free) is scaled by ``sw``; the token scale is applied after all
    groups.

    Example:
        >>> qa, sa, _ = quantize_act(torch.randn(2, 128, dtype=torch.bfloat16), mode="fp8")
        >>> qw, sw = int4.quantize(torch.randn(8, 128), scale_dtype=torch.bfloat16)
        >>> gemm_w4a8(qa, sa, int4.pack(qw), sw).shape
        torch.Size([2, 8])
    """
    op = "gemm_w4a8"
    _require(act.dtype in (torch.int8, torch.float8_e4m3fn) and act.dim() == 2, op,
             f"act must be int8 or float8_e4m3fn [M, K], got {act.dtype} {tuple(act.shape)}")
    M, K = act.shape
    _check_gemm(op, M, K, w, w_scales, lora_act, lora_up, bias, out_dtype, accum_dtype)
    _require(tuple(act_scales.shape) == (M,), op, f"act_scales must be [M={M}], got {tuple(act_scales.shape)}")
    gsum = _group_dots(act.float(), int4.unpack(w))  # [G, M, N], exact in float64
    sa, sw = act_scales.float(), w_scales.float()
    if accum_dtype == torch.float64:
        acc = (gsum * sw.double().T[:, None, :]).sum(dim=0) * sa.double()[:, None]
    else:
        acc = torch.zeros(gsum.shape[1:], dtype=torch.float32, device=act.device)
        for g in range(gsum.shape[0]):  # acc += gsum * float(sw), then acc * sa
            acc = acc + gsum[g].float() * sw[None, :, g]
        acc = acc * sa[:, None]
    return _epilogue(acc, lora_act, lora_up, bias, out_dtype)


# ---- promotion-free 8-bit GEMMs (F8L and I8Q weights) ------------------------------------------


_W8_PAIRS = {torch.int8: torch.int8, torch.float8_e4m3fn: torch.float8_e4m3fn}


def gemm_w8(
    act: torch.Tensor,
    act_scales: torch.Tensor,
    w8: torch.Tensor,
    w_row_scale: torch.Tensor,
    lora_act: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The 8-bit GEMM every promotion-free format feeds (docs/formats.md, "8-bit GEMM with row scales").

    ``act`` int8 or e4m3 ``[M, K]`` with fp32 ``act_scales [M]``; ``w8`` of the same kind ``[N, K]`` with
    fp32 ``w_row_scale [N]``. ``acc = sum_k act * w8`` over the whole K (int8: exact in int32, then one
    rounding to fp32; e4m3: every product is exact, the sum is rounded once to fp32, a valid choice since
    its order is free), then ``(acc * act_scales[m]) * w_row_scale[n]``, then the low-rank term with
    ``lora_act`` rounded to ``lora_up``'s dtype (bf16 or fp16: its products are exact in fp32), then bias.
    ``accum_dtype=torch.float64`` gives the float64 reference (with ``lora_act`` rounded the same way).

    Example:
        >>> a = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
        >>> w = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
        >>> gemm_w8(a, torch.ones(3), w, torch.ones(5), out_dtype=torch.float32).equal(
        ...     (a.float() @ w.float().T))
        True
    """
    op = "gemm_w8"
    _require(act.dim() == 2 and act.dtype in _W8_PAIRS, op,
             f"act must be int8 or float8_e4m3fn [M, K], got {act.dtype} {tuple(act.shape)}")
    M, K = act.shape
    _require(w8.dim() == 2 and w8.shape[1] == K and w8.dtype == _W8_PAIRS[act.dtype], op,
             f"w8 must be {act.dtype} [N, K={K}] like act, got {w8.dtype} {tuple(w8.shape)}")
    N = w8.shape[0]
    _require(tuple(act_scales.shape) == (M,), op, f"act_scales must be [M={M}], got {tuple(act_scales.shape)}")
    _require(tuple(w_row_scale.shape) == (N,), op, f"w_row_scale must be [N={N}], got {tuple(w_row_scale.shape)}")
    _require((lora_act is None) == (lora_up is None), op, "lora_act and lora_up come both or neither")
    if lora_act is not None:
        _require(lora_act.dim() == 2 and lora_up.dim() == 2 and lora_act.shape[0] == M
                 and lora_up.shape[0] == N and lora_act.shape[1] == lora_up.shape[1], op,
                 f"lora_act must be [M={M}, R] and lora_up [N={N}, R], got {tuple(lora_act.shape)} "
                 f"and {tuple(lora_up.shape)}")
        lora_act = lora_act.to(lora_up.dtype)  # the kernels' low-rank operands are 16-bit
    if bias is not None:
        _require(tuple(bias.shape) == (N,), op, f"bias must be [N={N}], got {tuple(bias.shape)}")
    _require(out_dtype in _OUT_DTYPES, op, f"out_dtype must be bf16, fp16, fp32 or fp64, got {out_dtype}")
    _require(accum_dtype in (torch.float32, torch.float64), op, f"accum_dtype must be fp32 or fp64, got {accum_dtype}")
    # float64 sums: exact for int8 (|sum| <= 2^14 K) and, short of extreme exponent spreads, for e4m3
    # (each product is a multiple of 2^-18 with at most 8 significant bits)
    acc = act.double() @ w8.double().T
    if accum_dtype == torch.float64:
        acc = acc * act_scales.double()[:, None] * w_row_scale.double()[None, :]
    else:
        acc = (acc.float() * act_scales.float()[:, None]) * w_row_scale.float()[None, :]
    return _epilogue(acc, lora_act, lora_up, bias, out_dtype)


def gemm_w4a8_f8l(
    act: torch.Tensor,
    act_scales: torch.Tensor,
    w: torch.Tensor,
    w_gscales: torch.Tensor,
    w_row_scale: torch.Tensor,
    lora_act: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W4A8 GEMM on F8L weights (op ``lowbit::gemm_w4a8_f8l``): e4m3 tokens x :func:`formats.f8l.expand`.

    ``act`` e4m3 ``[M, K]``, ``act_scales`` fp32 ``[M]``; ``w`` uint8 ``[N, K/2]`` codes, ``w_gscales`` e4m3
    ``[N, K/64]``, ``w_row_scale`` fp32 ``[N]``; the rest as :func:`gemm_w8`.

    Example:
        >>> codes, gs, r = f8l.quantize(torch.randn(8, 128))
        >>> qa, sa, _ = quantize_act(torch.randn(2, 128, dtype=torch.bfloat16), mode="fp8")
        >>> gemm_w4a8_f8l(qa, sa, f8l.pack(codes), gs, r).shape
        torch.Size([2, 8])
    """
    _require(act.dtype == torch.float8_e4m3fn, "gemm_w4a8_f8l", f"act must be float8_e4m3fn, got {act.dtype}")
    return gemm_w8(act, act_scales, f8l.expand(w, w_gscales), w_row_scale, lora_act, lora_up, bias, out_dtype,
                   accum_dtype)


def gemm_w4a8_i8q(
    act: torch.Tensor,
    act_scales: torch.Tensor,
    w: torch.Tensor,
    w_steps: torch.Tensor,
    w_zeros: torch.Tensor,
    w_row_scale: torch.Tensor,
    lora_act: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W4A8 GEMM on I8Q weights (op ``lowbit::gemm_w4a8_i8q``): int8 tokens x :func:`formats.i8q.expand`.

    ``act`` int8 ``[M, K]``, ``act_scales`` fp32 ``[M]``; ``w`` uint8 ``[N, K/2]`` codes, ``w_steps`` and
    ``w_zeros`` uint8 ``[N, K/64]``, ``w_row_scale`` fp32 ``[N]``; the rest as :func:`gemm_w8`.

    Example:
        >>> codes, s, z, r = i8q.quantize(torch.randn(8, 128))
        >>> qa, sa, _ = quantize_act(torch.randn(2, 128, dtype=torch.bfloat16), mode="int8")
        >>> gemm_w4a8_i8q(qa, sa, i8q.pack(codes), s, z, r).shape
        torch.Size([2, 8])
    """
    _require(act.dtype == torch.int8, "gemm_w4a8_i8q", f"act must be int8, got {act.dtype}")
    return gemm_w8(act, act_scales, i8q.expand(w, w_steps, w_zeros), w_row_scale, lora_act, lora_up, bias,
                   out_dtype, accum_dtype)


# ---- vq ---------------------------------------------------------------------------------------


def vq_dequantize(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    N: int,
    K: int,
    index_bits: int,
    channel_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` decoded from vq indices (see :func:`lowbit_engine.formats.vq.dequantize`).

    Example:
        >>> cb = torch.randn(256, 4)
        >>> codes = vq.pack_indices(torch.randint(256, (3, 16)), 8)
        >>> vq_dequantize(codes, cb, 3, 64, 8).shape
        torch.Size([3, 64])
    """
    return vq.dequantize(codes, codebook, N, K, index_bits, channel_scale, out_dtype)


def vq_gemm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    N: int,
    K: int,
    index_bits: int,
    channel_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` with W decoded from vq indices; fp32 accumulate, output in x's dtype.

    Example:
        >>> cb = torch.randn(16, 4)
        >>> codes = vq.pack_indices(torch.randint(16, (8, 16)), 8)
        >>> vq_gemm(torch.randn(2, 64, dtype=torch.bfloat16), codes, cb, 8, 64, 8).dtype
        torch.bfloat16
    """
    _require(x.dim() == 2 and x.shape[1] == K, "vq_gemm", f"x must be [M, K={K}], got {tuple(x.shape)}")
    w = vq.dequantize(codes, codebook, N, K, index_bits, channel_scale, torch.float32)
    acc = x.float() @ w.T
    if bias is not None:
        _require(tuple(bias.shape) == (N,), "vq_gemm", f"bias must be [N={N}], got {tuple(bias.shape)}")
        acc = acc + bias.float()
    return acc.to(x.dtype)
