"""Pictures: the demo's bf16 / quantized / difference image, and the kernel benchmark chart.

:func:`comparison_image` needs only Pillow (a diffusers dependency); :func:`plot_kernels` needs matplotlib
(``pip install matplotlib``; imported when called, so this module imports without it).

Example:
    >>> import torch
    >>> ref = torch.rand(3, 32, 32)
    >>> f = fidelity(ref, (ref + 0.01).clamp(0, 1))
    >>> round(f["psnr_db"]) in range(39, 42), f["rel_l2"] < 0.05
    (True, True)
    >>> comparison_image(ref, ref.flip(-1), ["bf16 vs int4"], labels=("bf16", "int4")).size
    (800, 304)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PANEL = 256  # a small image is scaled up (nearest neighbour, whole factors) to at least this many pixels
PAD = 8
LINE = 16  # pixels per line of text


def fidelity(ref: Tensor, image: Tensor) -> dict[str, float | None | str]:
    """Relative L2 error, PSNR (peak 1: images in [0, 1]) and LPIPS of ``image`` against ``ref``.

    LPIPS is computed when the ``lpips`` package is installed and its network loads; otherwise
    ``lpips`` is None and ``lpips_note`` says why.
    """
    ref, image = ref.float(), image.float()
    mse = float((image - ref).pow(2).mean())
    out: dict[str, float | None | str] = {
        "rel_l2": float((image - ref).norm() / ref.norm().clamp_min(1e-12)),
        "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
    }
    out["lpips"], out["lpips_note"] = _lpips(ref, image)
    return out


def _lpips(ref: Tensor, image: Tensor) -> tuple[float | None, str]:
    try:
        import lpips
    except ImportError:
        return None, "LPIPS: not computed (pip install lpips)"
    try:
        net = lpips.LPIPS(net="alex", verbose=False)  # its AlexNet weights come from torchvision's cache or the net
    except (OSError, RuntimeError) as e:
        return None, f"LPIPS: not computed (the lpips network did not load: {type(e).__name__}: {e})"
    batch = lambda t: (t if t.dim() == 4 else t[None]) * 2 - 1  # noqa: E731  (lpips takes [-1, 1])
    with torch.no_grad():
        return float(net(batch(ref), batch(image)).mean()), ""


def _to_hwc(image: Tensor, scale: int) -> Tensor:
    """[3, H, W] or [1, 3, H, W] in [0, 1] -> uint8 [H*scale, W*scale, 3] (nearest-neighbour upscale)."""
    t = image.float().squeeze(0) if image.dim() == 4 else image.float()
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
    t = t.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _heat(diff: Tensor) -> Tensor:
    """[H, W] in [0, 1] -> [3, H, W]: black, red, yellow, white (the 'hot' colour ramp)."""
    return torch.stack([(3 * diff).clamp(0, 1), (3 * diff - 1).clamp(0, 1), (3 * diff - 2).clamp(0, 1)])


def comparison_image(ref: Tensor, image: Tensor, title: Sequence[str], *, labels: tuple[str, str] = ("bf16", "quantized"),
                     note: str | None = None) -> Any:
    """One picture: ``ref`` | ``image`` | their difference map, under ``title`` lines, ``note`` at the bottom.

    The difference is the per-pixel mean absolute difference over the channels, scaled so its maximum is
    white (the gain is written over the panel). Images are [3, H, W] (or [1, 3, H, W]) in [0, 1]. Returns
    a ``PIL.Image``; its width is ``3 * panel + 4 * 8`` with ``panel = H * ceil(256 / max(H, W))``.
    """
    from PIL import Image, ImageDraw

    if ref.shape != image.shape:
        raise ValueError(f"ref and image must have one shape, got {tuple(ref.shape)} and {tuple(image.shape)}")
    h, w = ref.shape[-2:]
    scale = max(1, math.ceil(PANEL / max(h, w)))
    diff = (image.float() - ref.float()).abs().reshape(-1, h, w).mean(0)
    peak = float(diff.max())
    gain = 1.0 / peak if peak > 0 else 1.0
    panels = [_to_hwc(ref, scale), _to_hwc(image, scale), _to_hwc(_heat(diff * gain), scale)]
    names = [labels[0], labels[1], f"|difference| x{gain:.0f} (white = {peak:.3f})" if peak > 0 else "identical"]

    ph, pw = h * scale, w * scale
    top = PAD + LINE * len(title)
    height = top + LINE + ph + (LINE if note else 0) + PAD
    canvas = Image.new("RGB", (3 * pw + 4 * PAD, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((PAD, PAD + i * LINE), line, fill="black")
    for i, (panel, name) in enumerate(zip(panels, names)):
        x = PAD + i * (pw + PAD)
        draw.text((x, top + 2), name, fill="black")
        canvas.paste(Image.fromarray(panel.numpy(), "RGB"), (x, top + LINE))
    if note:
        draw.text((PAD, top + LINE + ph + 2), note, fill=(180, 60, 0))
    return canvas


def require_matplotlib() -> None:
    """Raise ImportError with the install line if matplotlib is missing (before a long benchmark run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None


_BF16, _FP8 = "cublas_bf16", "cublas_fp8_scaled_mm"
_REFERENCE_ROWS = (_BF16, _FP8, "torch_matmul_bf16")
FIGSIZE, DPI = (16, 15), 100  # the chart is FIGSIZE * DPI pixels, whatever the report holds


def plot_kernels(report: dict[str, Any], path: str | Path) -> Path:
    """Draw a GPU benchmark report (``benchmark.run`` or its JSON) into a PNG of 1600 x 1500 pixels.

    Top two panels: per shape and M, each kernel's speed as a ratio to cuBLAS bf16 and to cuBLAS fp8,
    both timed in the same run (recomputed from the rows' medians), with the 1.0 line. Bottom panel:
    each kernel's achieved TFLOP/s against its arithmetic intensity (FLOP per byte moved) on a roofline
    of ceilings measured in that run: the best cuBLAS fp8 and bf16 TFLOP/s and the device copy
    bandwidth. Raises ValueError for a report without cuBLAS rows (a CPU run has nothing to rank against).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("median_ms")]
    base = {(r["M"], r["K"], r["N"], r["kernel"]): r["median_ms"] for r in rows if r["kernel"] in (_BF16, _FP8)}
    if not base:
        raise ValueError(f"the report ({report.get('gpu', '?')}) has no cuBLAS rows: a CPU run's reference timings "
                         "are not plotted against anything; draw a GPU run (bench/results/*-h100-*.json)")
    shapes = sorted({(r["M"], r["K"], r["N"]) for r in rows}, key=lambda s: (-s[0], s[1], s[2]))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows if r["kernel"] not in _REFERENCE_ROWS))
    colors = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(kernels)}
    # Ratios only for rows that do the whole GEMM of the shape: a quantizer or an expand alone is a part
    # of a linear, and "12x faster than cuBLAS" would rank it against work it does not do.
    ms = {(r["M"], r["K"], r["N"], r["kernel"]): r["median_ms"] for r in rows if _does_the_gemm(r)}
    ranked = [k for k in kernels if any(key[3] == k for key in ms)]

    fig, (ax_bf, ax_f8, ax_roof) = plt.subplots(3, 1, figsize=FIGSIZE, dpi=DPI)
    width = 0.8 / max(1, len(ranked))
    for ax, ref, name in ((ax_bf, _BF16, "cuBLAS bf16"), (ax_f8, _FP8, "cuBLAS fp8 (_scaled_mm)")):
        for j, k in enumerate(ranked):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                if (*s, k) in ms and (*s, ref) in base:
                    xs.append(i - 0.4 + (j + 0.5) * width)
                    ys.append(base[(*s, ref)] / ms[(*s, k)])
            ax.bar(xs, ys, width, color=colors[k], label=k)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(shapes)), [f"M={m}\n{k}x{n}" for m, k, n in shapes], fontsize=7)
        ax.set_ylabel(f"speed vs {name}\n(>1: faster)")
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    ax_bf.legend(fontsize=7, ncol=5, loc="lower left", bbox_to_anchor=(0.0, 1.01))
    fig.suptitle(f"{report.get('gpu', '?')}  commit {str(report.get('commit', '?'))[:12]}  "
                 f"{report.get('timestamp', '')}: whole-GEMM kernels against cuBLAS timed in the same run "
                 "(K x N, M tokens)", fontsize=10)

    _roofline(ax_roof, rows, [k for k in kernels if k not in ranked], colors, report.get("copy_gbps"))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _does_the_gemm(row: dict[str, Any]) -> bool:
    """Whether the row's FLOP count (TFLOP/s x time) is the shape's GEMM, 2 M N K (within 1%)."""
    if not row.get("tflops"):
        return False
    flops = row["tflops"] * 1e12 * row["median_ms"] * 1e-3
    return abs(flops / (2.0 * row["M"] * row["N"] * row["K"]) - 1) < 0.01


def _roofline(ax: Any, rows: list[dict[str, Any]], unranked: list[str], colors: dict[str, Any],
              copy_gbps: float | None) -> None:
    """Achieved TFLOP/s at each row's FLOP/byte; ``unranked``: kernels absent from the ratio panels (legend here)."""
    markers = {}
    for r in rows:
        if not (r.get("tflops") and r.get("gbps")):
            continue  # the expand rows move bytes but do no FLOPs: no point on this chart
        m = markers.setdefault(r["M"], "os^Dv"[len(markers) % 5])
        ai = r["tflops"] / r["gbps"] * 1e3  # FLOP per byte
        color = colors.get(r["kernel"], "black")
        ax.scatter(ai, r["tflops"], color=color, marker=m, s=18, edgecolors="none")
    ais = [r["tflops"] / r["gbps"] * 1e3 for r in rows if r.get("tflops") and r.get("gbps")]
    x = torch.logspace(math.log10(min(ais) / 2), math.log10(max(ais) * 2), 200).tolist()
    for kernel, style in ((_FP8, "-"), (_BF16, "--")):
        peaks = [r["tflops"] for r in rows if r["kernel"] == kernel and r.get("tflops")]
        if not peaks:
            continue
        top = max(peaks)
        y = [min(top, a * copy_gbps / 1e3) for a in x] if copy_gbps else [top] * len(x)
        ax.plot(x, y, "k" + style, linewidth=1,
                label=f"ceiling: best {kernel} {top:.0f} TFLOP/s" + (f", copy {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    for k in unranked:
        ax.scatter([], [], color=colors[k], marker="o", label=k)
    for M, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=f"M={M}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title("roofline of ceilings measured in the same run (black: cuBLAS; colours: the kernels above, "
                 "and the parts of a linear listed here)", fontsize=10)
    ax.grid(which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
