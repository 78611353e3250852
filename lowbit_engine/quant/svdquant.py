"""SVDQuant: smoothing, a 16-bit low-rank branch and an int4 residual (the W4A4 / W4A8 method of Nunchaku).

For a linear layer ``y = x @ W^T`` (``W [N, K]``):

1. **Smoothing** moves activation outliers into the weights: ``x' = x / lambda``, ``W' = W * lambda`` per
   input channel, with ``lambda_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``. ``alpha`` is picked on a grid
   by the layer's output error on the calibration tokens, measured with everything the kernels do in
   place (fake-quantized activations, the low-rank branch, the int4 residual).
2. **Low rank**: the top-r SVD of ``W'`` gives ``L_up = U_r S_r [N, r]`` and ``L_down' = V_r^T [r, K]``,
   which absorb the weight outliers and stay in 16 bits.
3. **Residual**: ``W' - L_up L_down'`` is quantized to 4 bits in the chosen weight layout
   (:mod:`lowbit_engine.formats.w4_layouts`: ``g64`` int4 with bf16 group scales; ``f8l`` and ``i8q``, the
   promotion-free layouts of the 8-bit GEMM), with the layout's own rounding inside the search, and once
   more at the end with its scale search (``search=True``) when that lowers the error.

The smoothing is folded into the branch so it consumes the raw input: ``lora_down = L_down' / lambda``.
The module then computes ``gemm(q(x / lambda), q(residual)) + (x @ lora_down^T) @ lora_up^T + bias``
(:class:`lowbit_engine.nn.SVDQLinear`).

Example:
    >>> import torch
    >>> from lowbit_engine.quant import svdquant
    >>> w, x = torch.randn(128, 256) * 0.02, torch.randn(64, 256)
    >>> res = svdquant(w, x, rank=16, alphas=(0.25, 0.5))
    >>> res.qweight.shape, res.lora_down.shape, res.lora_up.shape, res.alpha in (0.25, 0.5)
    (torch.Size([128, 128]), torch.Size([16, 256]), torch.Size([128, 16]), True)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from ..errors import NonFiniteError
from ..formats import int4, w4_layouts

GROUP = int4.GROUP_SIZE
ACT_MODES = ("int4", "int8", "fp8")
ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1
# A full SVD is exact and, at or below this min(N, K), cheap enough to repeat for every alpha on the grid;
# above it a randomized SVD (oversampled, with power iterations) keeps the search fast: on a 3072 x 3072
# layer a full SVD costs seconds per alpha on two cores, the randomized one a small fraction of that.
FULL_SVD_MAX = 512
# Floors for the channel statistics, relative to their largest channel: a channel that is all zero in
# the calibration set (or in W) would otherwise give lambda = 0 or inf.
_STAT_FLOOR = 1e-4


class NoCalibrationWarning(UserWarning):
    """SVDQuant ran without calibration activations: no smoothing, alpha not searched."""


@dataclass
class SVDQuantResult:
    """Everything :class:`lowbit_engine.nn.SVDQLinear` needs, and how the calibration went.

    Attributes:
        weight_layout: "g64", "f8l" or "i8q" (:mod:`lowbit_engine.formats.w4_layouts`).
        weight: the residual's buffers in that layout (``qweight`` uint8 ``[N, K/2]``, ``wscales [N, K/64]``,
            and ``wrow`` / ``wzeros`` where the layout has them).
        smooth: fp32 ``[K]``, lambda (the quantizer divides x by it; ones without smoothing).
        lora_down: ``[R, K]`` in the module dtype, ``L_down' / lambda``: it consumes the RAW input.
        lora_up: ``[N, R]`` in the module dtype, ``U_r S_r``.
        act_mode: the activation quantization the error was measured with ("int4", "int8" or "fp8").
        alpha: the chosen smoothing exponent (None when there was no smoothing).
        calib_error: relative output error ``||y_hat - y|| / ||y||`` on the calibration tokens, with the
            kernels' rounding (None without calibration).
        weight_error: relative error of the reconstructed weight, ``||W_hat - W|| / ||W||`` (always).
        alpha_errors: the calibration error for every alpha tried (the curve the search minimised).
        refine_errors: the error after each kept refinement iteration (output error with calibration,
            weight error without; a refit that does not improve it is dropped).
    """

    weight: dict[str, Tensor]
    smooth: Tensor
    lora_down: Tensor
    lora_up: Tensor
    act_mode: str
    alpha: float | None
    calib_error: float | None
    weight_error: float
    alpha_errors: dict[float, float] = field(default_factory=dict)
    refine_errors: list[float] = field(default_factory=list)
    weight_layout: str = "g64"

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def qweight(self) -> Tensor:
        """uint8 ``[N, K/2]``: the packed 4-bit codes of the residual."""
        return self.weight["qweight"]

    @property
    def wscales(self) -> Tensor:
        """``[N, K/64]``: the group scales (bf16 for g64, e4m3 for f8l, uint8 steps for i8q)."""
        return self.weight["wscales"]


# ---- the three pieces -------------------------------------------------------------------------


def smoothing_factors(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """``lambda_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, normalised to a geometric mean of 1.

    Both statistics are floored at ``1e-4`` of their largest channel so that dead channels give neither
    0 nor inf. The normalisation changes nothing the quantizers see (int4 group scales and per-token
    scales are scale-invariant, and so is the SVD), but keeps ``W'`` and ``x / lambda`` near the original
    magnitudes, which is kind to the 16-bit ``lora_down = L_down' / lambda``.

    Example:
        >>> lam = smoothing_factors(torch.tensor([1.0, 100.0]), torch.tensor([1.0, 1.0]), 0.5)
        >>> [round(v, 4) for v in lam.tolist()]           # sqrt(1) : sqrt(100), geometric mean 1
        [0.3162, 3.1623]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing_factors: alpha must be in [0, 1], got {alpha}")
    xa = _floored(x_absmax.float())
    wa = _floored(w_absmax.float())
    lam = xa.pow(alpha) / wa.pow(1.0 - alpha)
    return lam / lam.log().mean().exp()


def _floored(stat: Tensor) -> Tensor:
    top = stat.max().clamp(min=1e-30)
    return stat.clamp(min=float(top) * _STAT_FLOOR)


def top_r_svd(w: Tensor, rank: int, *, oversample: int = 16, power_iters: int = 2,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of ``w [N, K]``: ``(U_r S_r [N, r], V_r^T [r, K])``, fp32.

    A full SVD when ``min(N, K) <= FULL_SVD_MAX``; otherwise a randomized SVD (Halko et al.): a Gaussian
    sketch of ``rank + oversample`` columns (seeded, so the result is reproducible and independent of the
    global RNG), ``power_iters`` power iterations with re-orthonormalisation, then an exact SVD of the
    small projected matrix.

    Example:
        >>> a = torch.randn(64, 8) @ torch.randn(8, 128)           # rank 8
        >>> up, down = top_r_svd(a, 8)
        >>> bool(torch.allclose(up @ down, a, atol=1e-3))
        True
    """
    N, K = w.shape
    if not 0 <= rank <= min(N, K):
        raise ValueError(f"top_r_svd: rank must be in [0, min(N, K) = {min(N, K)}], got {rank}")
    w = w.float()
    if rank == 0:
        return w.new_zeros(N, 0), w.new_zeros(0, K)
    if min(N, K) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        q = min(rank + oversample, min(N, K))
        gen = torch.Generator(device=w.device).manual_seed(seed)
        basis = torch.linalg.qr(w @ torch.randn(K, q, generator=gen, device=w.device)).Q  # [N, q]
        for _ in range(power_iters):  # sharpens the spectrum so the sketch finds the true top directions
            basis = torch.linalg.qr(w.T @ basis).Q
            basis = torch.linalg.qr(w @ basis).Q
        ub, s, vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
        u = basis @ ub
    return u[:, :rank] * s[:rank], vh[:rank].contiguous()


@dataclass
class _Branch:
    """One candidate decomposition of the smoothed weight ``W'``."""

    lora_up: Tensor    # [N, R] module dtype
    lora_down: Tensor  # [R, K] module dtype, folded: L_down' / lambda
    layout: str        # weight layout of the residual
    weight: dict[str, Tensor]  # the residual's buffers in that layout
    residual: Tensor   # the float residual the weight quantizes (to requantize it with the scale search)

    def residual_hat(self) -> Tensor:
        """The dequantized residual, fp32 ``[N, K]`` (in the smoothed space)."""
        return w4_layouts.dequantize(self.layout, self.weight)

    def searched(self) -> _Branch:
        """The same branch with the residual quantized again with the layout's scale search."""
        return _Branch(self.lora_up, self.lora_down, self.layout,
                       w4_layouts.quantize(self.residual, self.layout, search=True), self.residual)


def lowrank_residual(w_smooth: Tensor, smooth: Tensor, rank: int, dtype: torch.dtype, *,
                     target: Tensor | None = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Low-rank branch and residual of the smoothed weight ``W' = W * lambda``.

    Fits the top-``rank`` SVD of ``target`` (``W'`` itself unless refining), folds the smoothing into the
    down-projection and rounds both factors to ``dtype`` as the module stores them. The residual is taken
    against the ROUNDED factors, so the int4 residual also absorbs their rounding error.

    Returns ``(lora_up [N, R], lora_down [R, K], residual [N, K])`` with ``lora_down = L_down' / lambda``
    and ``W' == residual + (lora_up @ lora_down) * lambda`` (columns), up to fp32 rounding.
    """
    up, down = top_r_svd(w_smooth if target is None else target, rank, seed=seed)
    lora_up = up.to(dtype)
    lora_down = (down / smooth[None, :]).to(dtype)
    low = (lora_up.float() @ lora_down.float()) * smooth[None, :]
    return lora_up, lora_down, w_smooth - low


def _branch(w_smooth: Tensor, smooth: Tensor, rank: int, dtype: torch.dtype, layout: str,
            target: Tensor | None = None, seed: int = 0) -> _Branch:
    lora_up, lora_down, residual = lowrank_residual(w_smooth, smooth, rank, dtype, target=target, seed=seed)
    return _Branch(lora_up, lora_down, layout, w4_layouts.quantize(residual, layout), residual)


def fake_quantize_act(x: Tensor, smooth: Tensor | None, mode: str) -> Tensor:
    """What the GEMM sees of ``x / smooth``: the activation quantizer's output dequantized, fp32 ``[M, K]``.

    Runs the torch reference of ``lowbit::quantize_act`` (whole tensor at once), so the calibration
    measures exactly the kernels' rounding. ``x`` must be bf16 or fp16 like the op's input.

    Example:
        >>> xq = fake_quantize_act(torch.randn(4, 64, dtype=torch.bfloat16), None, "int8")
        >>> xq.dtype, xq.shape
        (torch.float32, torch.Size([4, 64]))
    """
    q, scales, _ = reference.quantize_act(x, smooth=smooth, mode=mode)
    if mode == "int4":
        return int4.dequantize(int4.unpack(q), scales)
    return q.float() * scales[:, None]


# ---- the error the search minimises -----------------------------------------------------------


class _OutputError:
    """Relative output error on calibration tokens, with the activations quantized like the kernels."""

    def __init__(self, weight: Tensor, x: Tensor, mode: str):
        self.x = x                    # [T, K] in the module dtype: what the layer's kernels receive
        self.xf = x.float()
        self.mode = mode
        self.y = self.xf @ weight.T   # the float layer's output on the same input
        self.norm = self.y.norm()

    def __call__(self, smooth: Tensor, b: _Branch) -> float:
        y_hat = fake_quantize_act(self.x, smooth, self.mode) @ b.residual_hat().T
        if b.lora_up.shape[1]:
            y_hat += (self.xf @ b.lora_down.float().T) @ b.lora_up.float().T
        return float((y_hat - self.y).norm() / self.norm)


class _WeightError:
    """Without calibration: relative error of the reconstructed weight in the original space."""

    def __init__(self, weight: Tensor):
        self.w = weight
        self.norm = weight.norm()

    def __call__(self, smooth: Tensor, b: _Branch) -> float:
        w_hat = b.residual_hat() / smooth[None, :] + b.lora_up.float() @ b.lora_down.float()
        return float((w_hat - self.w).norm() / self.norm)


# ---- the entry point --------------------------------------------------------------------------


def svdquant(
    weight: Tensor,
    calib: Tensor | None = None,
    *,
    rank: int = 32,
    act_mode: str = "int4",
    alphas: Sequence[float] = ALPHAS,
    smoothing: bool = True,
    refine_iters: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    max_eval_tokens: int = 2048,
    seed: int = 0,
    weight_layout: str = "g64",
) -> SVDQuantResult:
    """Quantize one linear weight with SVDQuant.

    Args:
        weight: ``[N, K]`` (``nn.Linear.weight``), K a multiple of 64; any float dtype.
        calib: activations at the layer's input, ``[..., K]`` (leading dims flattened). Without them the
            smoothing is off (lambda = 1: with no activation statistics there is nothing to balance the
            weights against, and weight-only smoothing would blindly amplify activation channels) and a
            :class:`NoCalibrationWarning` says so.
        rank: rank of the 16-bit branch (0 for none).
        act_mode: activation quantization of the target kernel: "int4" (svdq-int4), "int8" or "fp8"
            (svdq-w4a8). The search measures error with exactly this rounding.
        alphas: the smoothing exponents to try; the one with the least output error wins.
        smoothing: False forces lambda = 1 even with calibration (naive W4A4 plus the branch).
        refine_iters: refit the low rank on ``W' - Q(residual)`` and requantize, this many times; a
            refit is kept only if it lowers the error.
        dtype: the module dtype (bf16 or fp16): activations are rounded to it and the low-rank factors
            stored in it, as at inference.
        max_eval_tokens: the error is measured on at most this many calibration tokens (evenly spaced);
            the channel maxima always use them all.
        seed: seed of the randomized SVD's sketch.
        weight_layout: how the int4 residual is stored: "g64" (int4, bf16 scale per 64), "f8l" (for fp8
            tokens) or "i8q" (for int8 tokens); see :mod:`lowbit_engine.formats.w4_layouts`. The search
            measures the error with this layout's rounding.

    Example:
        >>> res = svdquant(torch.randn(64, 128), torch.randn(32, 128), rank=8, alphas=(0.5,))
        >>> res.alpha, res.rank, res.smooth.dtype
        (0.5, 8, torch.float32)
    """
    w = _check_weight(weight, rank)
    N, K = w.shape
    if act_mode not in ACT_MODES:
        raise ValueError(f"svdquant: act_mode must be one of {ACT_MODES}, got {act_mode!r}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"svdquant: dtype must be bfloat16 or float16, got {dtype}")
    if refine_iters < 0:
        raise ValueError(f"svdquant: refine_iters must be >= 0, got {refine_iters}")
    w4_layouts.check_layout(weight_layout)
    if act_mode not in w4_layouts.ACTS[weight_layout]:
        raise ValueError(f"svdquant: weight layout {weight_layout!r} takes act_mode in "
                         f"{w4_layouts.ACTS[weight_layout]}, got {act_mode!r}")
    alphas = tuple(float(a) for a in alphas)
    if smoothing and calib is not None and not alphas:
        raise ValueError("svdquant: alphas is empty")

    ones = torch.ones(K, dtype=torch.float32, device=w.device)
    if calib is None:
        warnings.warn(
            f"svdquant: no calibration activations for this {N}x{K} layer; smoothing is OFF (smooth = 1, "
            "alpha not searched), so activation outliers stay in the activations. Pass calib= (inputs of "
            "the layer) for W4A4 quality.", NoCalibrationWarning, stacklevel=2)
        measure = _WeightError(w)
        candidates = [(None, ones)]
    else:
        x = _check_calib(calib, K, w.device, dtype)
        if not smoothing:
            candidates = [(None, ones)]
        else:
            x_absmax = x.float().abs().amax(dim=0)
            w_absmax = w.abs().amax(dim=0)
            candidates = [(a, smoothing_factors(x_absmax, w_absmax, a)) for a in alphas]
        measure = _OutputError(w, _evenly_spaced(x, max_eval_tokens), act_mode)

    # Alpha search: the full decomposition for every alpha, scored with the kernels' rounding.
    best = None
    curve: dict[float, float] = {}
    for alpha, smooth in candidates:
        b = _branch(w * smooth[None, :], smooth, rank, dtype, weight_layout, seed=seed)
        err = measure(smooth, b)
        if alpha is not None:
            curve[alpha] = err
        if best is None or err < best[0]:
            best = (err, alpha, smooth, b)
    err, alpha, smooth, b = best

    # Refinement: the low rank fitted to what the int4 residual misses, then the residual requantized.
    w_smooth = w * smooth[None, :]
    refine_errors = []
    for _ in range(refine_iters if rank else 0):
        cand = _branch(w_smooth, smooth, rank, dtype, weight_layout, target=w_smooth - b.residual_hat(), seed=seed)
        cand_err = measure(smooth, cand)
        if cand_err >= err:
            break
        err, b = cand_err, cand
        refine_errors.append(err)

    # The layouts with a scale search (f8l, i8q): quantize the final residual once more with it; kept only
    # when the measured error drops (the search minimises the weight error, the measure is the output's).
    if weight_layout != "g64":
        cand = b.searched()
        cand_err = measure(smooth, cand)
        if cand_err < err:
            err, b = cand_err, cand

    return SVDQuantResult(
        weight=b.weight, weight_layout=weight_layout, smooth=smooth.contiguous(),
        lora_down=b.lora_down.contiguous(), lora_up=b.lora_up.contiguous(), act_mode=act_mode,
        alpha=alpha, calib_error=None if calib is None else err, weight_error=_WeightError(w)(smooth, b),
        alpha_errors=curve, refine_errors=refine_errors,
    )


def _check_weight(weight: Tensor, rank: int) -> Tensor:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"svdquant: weight must be a float [N, K] tensor, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if K % GROUP != 0 or K == 0:
        raise ValueError(f"svdquant: K = weight.shape[1] = {K} must be a positive multiple of {GROUP}")
    if not 0 <= rank <= min(N, K):
        raise ValueError(f"svdquant: rank must be in [0, min(N, K) = {min(N, K)}], got {rank}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise NonFiniteError("svdquant: weight has non-finite values")
    return w


def _check_calib(calib: Tensor, K: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``calib`` as the kernels would receive it: ``[T, K]`` in the module dtype, on the weight's device."""
    if calib.shape[-1] != K:
        raise ValueError(f"svdquant: calib must be [..., K={K}], got shape {tuple(calib.shape)}")
    x = calib.detach().reshape(-1, K).to(device=device, dtype=dtype)
    if x.shape[0] == 0:
        raise ValueError("svdquant: calib has no tokens")
    if not torch.isfinite(x).all():  # checked after the cast: fp16 overflows at 65504
        raise NonFiniteError(f"svdquant: calib has non-finite values (in {dtype})")
    return x


def _evenly_spaced(x: Tensor, n: int) -> Tensor:
    if x.shape[0] <= n:
        return x.contiguous()
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx].contiguous()
