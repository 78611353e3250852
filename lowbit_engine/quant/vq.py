"""VQ4DiT: codebook quantization of a linear layer's weight (formats ``vq2`` and ``vq3``).

Two stages (VQ4DiT, Deng et al. 2024):

1. **k-means** (:func:`lowbit_engine.formats.vq.quantize`): one codebook ``[k, d]`` per layer over the
   ``d``-long sub-vectors of the weight rows along K; each sub-vector gets its nearest centroid.
2. **Calibration of the assignments**: nearest-centroid assignment minimises the *weight* error, not the
   layer's *output* error. Each sub-vector keeps its ``n_candidates`` nearest centroids; a learnable
   softmax over them gives a soft sub-vector ``sum_j softmax(logits)_j * codebook[cand_j]``. The logits
   (and, optionally, the codebook) are optimised with Adam to minimise the output MSE
   ``||X W^T - X W_soft^T||^2`` on calibration inputs ``X`` (the layer's real inputs when given, else
   zero-data Gaussian ``N(0, 1)`` rows). **Progressive freezing**: every ``freeze_every`` steps the
   sub-vectors whose largest softmax weight exceeds ``freeze_threshold`` are frozen to their argmax
   candidate (a hard assignment the remaining soft ones then compensate for), until all are hard; whatever
   is still soft after ``iters`` steps is frozen to its argmax.

The result is kept only if its hard output MSE on the calibration inputs beats plain k-means
(``keep_best``); ``stats`` records both. With an optional per-output-channel scale (row absmax before
k-means), the scale is refit at the end by least squares in the same output metric.

Cost: the k-means stage (``formats.vq.quantize``) is vectorised torch on the weight's device (batched
k-means++ seeding, Lloyd steps on a subset of at most 64 points per centroid, one final assignment of
every sub-vector); docs/usage.md ("Quantization time") has the measured times. The calibration is
vectorised torch on ``device`` (default: the weight's; a FLUX-sized layer is 2.4M sub-vectors x 4
candidates, and each Adam step costs two N x K x K products: minutes on a GPU, far too slow on a CPU).

Zero-data caveat: for a *single* linear layer with ``N(0, I)`` inputs the output MSE equals the weight MSE
in expectation, for which nearest-centroid k-means is already optimal; Gaussian calibration then only
fits sampling noise and ``keep_best`` keeps k-means. VQ4DiT's zero-data calibration pays off at block
level (nonlinearities, correlated inputs); with real calibration activations it pays off per layer.

Example:
    >>> import torch
    >>> from lowbit_engine.quant.vq import vq_quantize
    >>> res = vq_quantize(torch.randn(32, 64), "vq2", kmeans_iters=3, iters=20, seed=0)
    >>> res.codes.shape, res.codebook.shape, res.index_bits
    (torch.Size([32, 16]), torch.Size([256, 4]), 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..formats import vq as vqf
from .checks import check_calib, check_weight


@dataclass
class VQResult:
    """What :func:`vq_quantize` returns: the format's tensors and how the calibration went.

    ``codes`` uint8 ``[N, packed_row_bytes(K/d)]``, ``codebook`` fp32 ``[k, d]``, ``channel_scale`` fp32
    ``[N]`` or None. ``stats``: ``mse_kmeans`` / ``mse_calibrated`` (output MSE per element on the
    calibration inputs, hard assignments), ``wmse_kmeans`` / ``wmse_calibrated`` (weight MSE), ``steps``,
    ``frozen_by_threshold`` / ``frozen_forced`` (sub-vectors), ``changed`` (assignments that differ from
    k-means), ``kept`` ("calibrated" or "kmeans").
    """

    codes: Tensor
    codebook: Tensor
    channel_scale: Tensor | None
    index_bits: int
    k: int
    d: int
    stats: dict = field(default_factory=dict)

    def dequantize(self, N: int, K: int) -> Tensor:
        """The dense fp32 weight ``[N, K]`` these tensors encode."""
        return vqf.dequantize(self.codes, self.codebook, N, K, self.index_bits, self.channel_scale)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(ref.pow(2).sum().item() / noise)


def _candidates(x: Tensor, codebook: Tensor, n: int, chunk_elems: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """The ``n`` nearest centroids of each row of ``x`` (sorted, nearest first) and their squared distances."""
    c2 = (codebook * codebook).sum(1)
    rows = max(1, chunk_elems // codebook.shape[0])
    idx = torch.empty(x.shape[0], n, dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], rows):
        xc = x[s : s + rows]
        dd = (xc * xc).sum(1, keepdim=True) + c2[None, :] - 2.0 * (xc @ codebook.T)
        v, i = torch.topk(dd, n, dim=1, largest=False, sorted=True)
        idx[s : s + rows], dist[s : s + rows] = i, v.clamp_min(0)
    return idx, dist


def _softmax(logits: Tensor, temp: float) -> Tensor:
    """Softmax of ``logits / temp`` with the shifted logits clamped at -60 (weights below ~1e-26 become
    exactly that): a sharp softmax otherwise fills the tensors, and their gradients, with subnormal
    floats, which run ~100x slower on the CPU."""
    z = logits / temp
    z = (z - z.detach().amax(dim=1, keepdim=True)).clamp_min(-60.0)
    return torch.softmax(z, dim=1)


def _calib_inputs(calib: Tensor | None, K: int, n_samples: int, gen: torch.Generator, device) -> Tensor:
    if calib is None:  # zero-data calibration: Gaussian inputs
        return torch.randn(n_samples, K, generator=gen).to(device)
    x = calib.detach().reshape(-1, K).float()
    if x.shape[0] > n_samples:  # a deterministic subset
        x = x[torch.randperm(x.shape[0], generator=gen)[:n_samples].to(x.device)]
    return x.to(device)


def vq_quantize(
    w: Tensor,
    fmt: str = "vq2",
    calib: Tensor | None = None,
    *,
    k: int | None = None,
    d: int | None = None,
    channel_scale: bool = False,
    kmeans_iters: int = 10,
    calibrate: bool = True,
    n_candidates: int = 4,
    iters: int = 300,
    lr: float = 0.2,
    freeze_every: int = 10,
    freeze_threshold: float = 0.95,
    learn_codebook: bool = False,
    codebook_lr: float = 1e-3,
    n_samples: int = 4096,
    temp_end: float = 0.01,
    keep_best: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> VQResult:
    """Quantize ``w [N, K]`` to a vq format with k-means and VQ4DiT assignment calibration.

    Args:
        w: the float weight ``[N, K]`` (K a multiple of d).
        fmt: "vq2" (k=256, d=4, 8-bit indices) or "vq3" (k=4096, d=4, 12-bit indices); ``k``/``d``
            override the format's values (the index width follows k).
        calib: the layer's input activations ``[..., K]``; None for zero-data (Gaussian) calibration.
        channel_scale: divide rows by their absmax before k-means and store that fp32 ``[N]`` scale
            (refit by least squares on the calibration inputs at the end).
        kmeans_iters: Lloyd iterations of the k-means stage.
        calibrate: False returns plain k-means (stats still report its output MSE).
        n_candidates: candidate centroids per sub-vector (top-n nearest).
        iters: the most Adam steps; freezing usually ends earlier.
        lr, codebook_lr: Adam learning rates of the logits and (with ``learn_codebook``) the codebook.
        freeze_every, freeze_threshold: progressive freezing schedule.
        temp_end: the softmax temperature at the last step (annealed geometrically from 1).
        n_samples: calibration rows used (Gaussian rows drawn, or a subset of ``calib``).
        keep_best: keep k-means when calibration did not lower the hard output MSE.
        seed: seeds k-means and the Gaussian inputs; same seed, same result.
        device: where the calibration runs (default: w's device).

    Example:
        >>> r = vq_quantize(torch.randn(16, 64), "vq2", calibrate=False, kmeans_iters=2)
        >>> r.stats["kept"]
        'kmeans'
    """
    # The same checks (and words) as svdquant: a NaN weight would land in the codebook, a bad calib in Y.
    check_weight("vq_quantize", w)
    if calib is not None:
        check_calib("vq_quantize", calib, w.shape[1])
    if fmt not in vqf.FORMATS:
        raise ValueError(f"vq_quantize: unknown format {fmt!r}; expected one of {list(vqf.FORMATS)}")
    spec = vqf.FORMATS[fmt]
    k = spec.k if k is None else k
    d = spec.d if d is None else d
    bits = vqf.index_bits_for(k)
    if w.dim() != 2:
        raise ValueError(f"vq_quantize: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    if K % d:
        raise ValueError(f"vq_quantize: K={K} must be a multiple of d={d}")
    if not 1 <= n_candidates <= k:
        raise ValueError(f"vq_quantize: n_candidates must be in [1, k={k}], got {n_candidates}")
    dev = torch.device(device) if device is not None else w.device

    # ---- stage 1: k-means (CPU, float64) ----
    codes0, codebook, scale = vqf.quantize(w, k, d, iters=kmeans_iters, seed=seed, index_bits=bits,
                                           channel_scale=channel_scale)
    idx0 = vqf.unpack_indices(codes0, K // d, bits).reshape(-1).to(dev)
    gen = torch.Generator().manual_seed(seed + 1)
    X = _calib_inputs(calib, K, n_samples, gen, dev)
    W = w.detach().float().to(dev)
    Y = X @ W.T
    cb = codebook.to(dev)
    s = None if scale is None else scale.to(dev)

    def recon(assign: Tensor, book: Tensor, sc: Tensor | None) -> Tensor:
        wh = book[assign].reshape(N, K)
        return wh if sc is None else wh * sc[:, None]

    def out_mse(wh: Tensor) -> float:
        return (Y - X @ wh.T).pow(2).mean().item()

    w_km = recon(idx0, cb, s)
    stats: dict = {"mse_kmeans": out_mse(w_km), "wmse_kmeans": (W - w_km).pow(2).mean().item(),
                   "steps": 0, "frozen_by_threshold": 0, "frozen_forced": 0, "changed": 0,
                   "calib": "data" if calib is not None else "gaussian"}
    best = (idx0, cb, s)
    if calibrate:
        best = _calibrate(W, X, Y, cb, s, idx0, n_candidates, iters, lr, freeze_every, freeze_threshold,
                          learn_codebook, codebook_lr, stats, recon, temp_end)
        a, b, sc = best
        stats["mse_calibrated"] = out_mse(recon(a, b, sc))
        stats["wmse_calibrated"] = (W - recon(a, b, sc)).pow(2).mean().item()
        stats["changed"] = int((a != idx0).sum())
        if keep_best and stats["mse_calibrated"] >= stats["mse_kmeans"]:
            best = (idx0, cb, s)
            stats["kept"] = "kmeans"
        else:
            stats["kept"] = "calibrated"
    else:
        stats["mse_calibrated"], stats["wmse_calibrated"] = stats["mse_kmeans"], stats["wmse_kmeans"]
        stats["kept"] = "kmeans"

    a, b, sc = best
    codes = vqf.pack_indices(a.reshape(N, K // d).cpu(), bits)
    return VQResult(codes=codes.to(w.device), codebook=b.detach().float().to(w.device),
                    channel_scale=None if sc is None else sc.detach().float().to(w.device),
                    index_bits=bits, k=k, d=d, stats=stats)


def _calibrate(W, X, Y, cb, s, idx0, n, iters, lr, freeze_every, threshold, learn_codebook, codebook_lr,
               stats, recon, temp_end):
    """The VQ4DiT assignment calibration; returns (assignments ``[P]``, codebook, channel scale)."""
    N, K = W.shape
    d = cb.shape[1]
    Ws = W if s is None else W / s[:, None]
    sub = Ws.reshape(-1, d)
    cand, dist = _candidates(sub, cb, n)
    # Initial logits favour the nearer candidates: softmax of -dist / tau, tau the mean gap between the
    # nearest and second-nearest centroid (so the initial weights are soft but ordered like k-means).
    tau = (dist[:, 1] - dist[:, 0]).mean().clamp_min(1e-12) if n > 1 else dist.new_tensor(1.0)
    logits = (-(dist - dist[:, :1]) / tau).clone().requires_grad_(True)
    book = cb.clone().requires_grad_(learn_codebook)
    params = [{"params": [logits], "lr": lr}]
    if learn_codebook:
        params.append({"params": [book], "lr": codebook_lr})
    opt = torch.optim.Adam(params)
    P = sub.shape[0]
    frozen = torch.zeros(P, dtype=torch.bool, device=W.device)
    hard = torch.zeros(P, dtype=torch.int64, device=W.device)  # candidate slot of frozen sub-vectors
    ar = torch.arange(P, device=W.device)
    norm = Y.pow(2).mean().clamp_min(1e-30)
    # mean_m ||X e||^2 = e (X^T X / M) e^T: with more rows than K, the K x K second moment is cheaper.
    H = (X.T.double() @ X.double() / X.shape[0]).float() if X.shape[0] > K else None
    # Softmax temperature annealed geometrically from t_start to t_end over the first 3/4 of the steps: the
    # soft weights sharpen, so the threshold freezing takes over progressively instead of forcing
    # everything at the end.
    t_start, t_end = 1.0, temp_end

    steps = 0
    for step in range(1, iters + 1):
        steps = step
        temp = t_start * (t_end / t_start) ** min(1.0, (step - 1) / max(1.0, 0.75 * iters))
        prob = _softmax(logits, temp)
        prob = torch.where(frozen[:, None], torch.nn.functional.one_hot(hard, n).to(prob.dtype), prob)
        wsoft = (prob[:, :, None] * book[cand]).sum(1).reshape(N, K)
        if s is not None:
            wsoft = wsoft * s[:, None]
        err = W - wsoft
        loss = ((err @ H) * err).sum() / (N * norm) if H is not None else (X @ err.T).pow(2).mean() / norm
        # Adam is invariant to the loss scale, but per-logit gradients of a mean over P sub-vectors are
        # ~1/P small and their squares underflow to subnormals (10-50x slower on the CPU): scale by P.
        loss = loss * P
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % freeze_every == 0:
            with torch.no_grad():
                p = _softmax(logits, temp)
                pmax, parg = p.max(dim=1)
                new = (~frozen) & (pmax > threshold)
                hard[new] = parg[new]
                frozen |= new
                stats["frozen_by_threshold"] += int(new.sum())
            if bool(frozen.all()):
                break
    with torch.no_grad():
        rest = ~frozen
        hard[rest] = logits.argmax(dim=1)[rest]  # argmax does not depend on the temperature
        stats["frozen_forced"] = int(rest.sum())
        stats["steps"] = steps
        assign = cand[ar, hard]
        book = book.detach()
        s_new = s
        if s is not None:  # least-squares channel scale in the output metric: s_n = <Xw_n, Xq_n>/||Xq_n||^2
            q = book[assign].reshape(N, K)
            Yq = X @ q.T
            den = Yq.pow(2).sum(0)
            s_new = torch.where(den > 0, (Y * Yq).sum(0) / den.clamp_min(1e-30), s)
    return assign, book, s_new


__all__ = ["VQResult", "sqnr_db", "vq_quantize"]
