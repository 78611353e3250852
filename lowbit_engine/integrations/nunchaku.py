"""``load_nunchaku(transformer, path)``: run a Nunchaku SVDQuant int4 FLUX.1 checkpoint on this engine.

Nunchaku (mit-han-lab / nunchaku-tech) publishes pre-quantized FLUX.1 transformers, e.g.
``svdq-int4_r32-flux.1-dev.safetensors``, whose kernels do not run on Hopper. Their W4A4 linears hold the
same math as this engine's ``g64`` layout (int4 two's complement codes, a 16-bit scale per 64 input
channels, ``x / smooth`` quantized per token, a 16-bit low-rank branch on the raw x), stored in
Nunchaku's MMA-fragment order (:mod:`lowbit_engine.integrations.nunchaku_packing`). This module:

1. reads and checks every tensor of the file against the model (names, shapes, dtypes), and unpacks each
   W4A4 linear into an :class:`~lowbit_engine.nn.SVDQLinear` in ``g64``, built on the side;
2. converts it to the asked weight layout (``"auto"``: ``f8l`` on GPUs without int4 tensor cores, i.e.
   Hopper and later, else ``g64``; docs/usage.md);
3. only then touches the model: fuses Q/K/V (diffusers' ``fuse_qkv_projections``, as Nunchaku's
   ``qkv_proj`` is Q, K, V stacked), swaps the layers in, copies the unquantized tensors the file holds.

Names (Nunchaku's "v1" file, read from its loaders; docs/formats.md "Nunchaku"):

* double block ``transformer_blocks.{i}``: ``qkv_proj`` -> ``attn.to_qkv``, ``qkv_proj_context`` ->
  ``attn.to_added_qkv``, ``out_proj`` -> ``attn.to_out.0``, ``out_proj_context`` -> ``attn.to_add_out``,
  ``mlp_fc1`` / ``mlp_fc2`` -> ``ff.net.0.proj`` / ``ff.net.2``, ``mlp_context_fc1`` / ``mlp_context_fc2`` ->
  ``ff_context.net.0.proj`` / ``ff_context.net.2``;
* single block ``single_transformer_blocks.{i}``: ``qkv_proj`` -> ``attn.to_qkv``, ``mlp_fc1`` -> ``proj_mlp``;
  ``out_proj`` (attention part) and ``mlp_fc2`` (MLP part) are the two K-halves of diffusers' ``proj_out``
  and are merged into one SVDQLinear: codes, scales and smoothing concatenated along K, the low-rank
  factors block-diagonal (rank R1 + R2), the biases summed. Exact in the g64 semantics, since both
  halves start on a 64-group boundary;
* ``norm_q`` / ``norm_k`` (/ ``norm_added_q`` / ``norm_added_k``) ``.weight`` -> ``attn.<same>.weight`` (copied);
* the AdaLN linears (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``) are W4A16 AWQ in
  Nunchaku's files: not imported (the report lists them), the model keeps its own;
* every other key outside the blocks must name a tensor of the model with the same shape: copied.

Every MLP fc2 (``mlp_fc2``, ``mlp_context_fc2``) gets, in Nunchaku, ``gelu + 0.171875`` on its residual path
(unsigned int4 tokens) and the plain GELU output on its low-rank branch; its bias in the file is made for
that. This engine feeds the plain GELU output, so ``0.171875 * W @ (1 / smooth)`` is added to that bias.

Each W4A4 linear's tensors: ``qweight``, ``wscales``, ``bias``, ``smooth`` (or ``smooth_factor``),
``lora_down`` / ``lora_up`` (or ``proj_down`` / ``proj_up``), and the unused ``smooth_orig`` /
``smooth_factor_orig``. ``wtscale`` / ``wcscales`` mark an NVFP4 checkpoint: refused.

Example:
    >>> report = load_nunchaku(pipe, "svdq-int4_r32-flux.1-dev.safetensors")  # doctest: +SKIP
    >>> load_nunchaku(nn.Linear(64, 64), "svdq-int4_r32-flux.1-dev.safetensors")
    Traceback (most recent call last):
    ...
    TypeError: load_nunchaku: expected a FLUX transformer with .transformer_blocks and .single_transformer_blocks, got Linear
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import CheckpointError
from ..formats import int4, w4_layouts
from ..nn.svdq_linear import SVDQLinear, has_int4_tensor_cores
from . import nunchaku_packing as P
from .diffusers import _set_submodule, fuse_qkv, model_nbytes, resolve_transformer
from .staging import Transaction

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"
# Nunchaku W4A4 linear -> the diffusers linear it becomes
_DOUBLE_LINEARS = {
    "qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.to_added_qkv", "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
}
_SINGLE_LINEARS = {"qkv_proj": "attn.to_qkv", "mlp_fc1": "proj_mlp"}
_SINGLE_MERGED = ("out_proj", "mlp_fc2")  # the K-halves of proj_out, in its input order (attention, MLP)
_NORMS = {DOUBLE: ("norm_q", "norm_k", "norm_added_q", "norm_added_k"), SINGLE: ("norm_q", "norm_k")}
_AWQ = {DOUBLE: ("norm1.linear", "norm1_context.linear"), SINGLE: ("norm.linear",)}
_AWQ_PARAMS = ("qweight", "wscales", "wzeros", "bias", "lora_down", "lora_up")
# canonical tensor of a W4A4 linear -> the spellings Nunchaku's files use (C++ loader, then diffusers-style)
_SPELLINGS = {
    "qweight": ("qweight",), "wscales": ("wscales",), "bias": ("bias",), "smooth": ("smooth", "smooth_factor"),
    "smooth_orig": ("smooth_orig", "smooth_factor_orig"), "lora_down": ("lora_down", "proj_down"),
    "lora_up": ("lora_up", "proj_up"),
}
_BY_SPELLING = {s: canon for canon, spellings in _SPELLINGS.items() for s in spellings}
_NVFP4_MARKS = ("wtscale", "wcscales")
# Nunchaku's int4 MLPs fuse GELU into fc1's epilogue and quantize fc2's input unsigned after adding this shift
# (SHIFT_GELU in its gemm_w4a4 launcher); the low-rank branch sees the unshifted GELU output. fc2's bias in
# the file is made for that shifted residual input, so it is corrected here for an unshifted one.
GELU_SHIFT = 0.171875
_SHIFTED = ("mlp_fc2", "mlp_context_fc2")
_FIQKV = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


@dataclass
class NunchakuReport:
    """What :func:`load_nunchaku` did; ``str(report)`` is a summary.

    Attributes:
        path: the file; ``weight_layout`` / ``act_mode``: what the imported layers run.
        quantized: the model's layers now SVDQLinear (diffusers names).
        merged: target -> the Nunchaku linears merged into it (the single blocks' ``proj_out``).
        copied: model tensors overwritten by unquantized tensors of the file.
        skipped: reason -> file keys not imported.
        qkv_note: how Q/K/V were fused.
    """

    path: str
    weight_layout: str
    act_mode: str
    quantized: list[str] = field(default_factory=list)
    merged: dict[str, list[str]] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    qkv_note: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        mib = 2.0 ** 20
        lines = [f"lowbit-engine: Nunchaku checkpoint {self.path} -> {len(self.quantized)} SVDQLinear layers "
                 f"(layout {self.weight_layout}, {self.act_mode} tokens), {len(self.merged)} merged "
                 f"(single-block proj_out), {len(self.copied)} unquantized tensors copied"]
        for reason, keys in self.skipped.items():
            lines.append(f"  skipped {len(keys)} keys: {reason}")
        lines.append(f"  QKV: {self.qkv_note}")
        lines.append(f"  memory: {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB, "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)


# ---- reading and checking ------------------------------------------------------------------------


def _pad128(n: int) -> int:
    return -(-n // P.TILE_N) * P.TILE_N


class _File:
    """The checkpoint's tensors, read lazily; every error names the file and the tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # missing, truncated, not safetensors: all one answer
            raise CheckpointError(f"{path}: cannot open as safetensors ({type(e).__name__}: {e})") from e
        self.keys = set(self._f.keys())
        self.metadata = self._f.metadata() or {}

    def check_metadata(self) -> None:
        """Refuse what the header says is not an int4 g64 FLUX file (``nunchaku.merge_safetensors`` writes
        ``model_class`` and a ``quantization_config`` JSON; files without them pass to the tensor checks)."""
        cls = self.metadata.get("model_class")
        if cls is not None and "flux" not in cls.lower():
            raise CheckpointError(f"{self.path}: model_class {cls!r}: expected a Nunchaku FLUX transformer")
        raw = self.metadata.get("quantization_config")
        if raw is None:
            return
        try:
            weight = json.loads(raw).get("weight", {})
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: unreadable quantization_config metadata ({e})") from e
        got = (weight.get("dtype", "int4"), weight.get("group_size", 64))
        if got != ("int4", 64):
            raise CheckpointError(f"{self.path}: quantization_config weight (dtype, group_size) {got}: expected "
                                  f"('int4', 64); NVFP4 Nunchaku checkpoints are not supported")

    def error(self, key: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {key!r}: {msg}")

    def get(self, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> Tensor:
        t = self._f.get_tensor(key)
        if t.dtype not in dtypes:
            raise self.error(key, f"expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise self.error(key, f"expected shape {shape}, got {tuple(t.shape)}")
        return t


def _find(f: _File, prefix: str, canon: str) -> str | None:
    """The key of tensor ``canon`` of the linear at ``prefix`` under whichever spelling the file uses."""
    found = [f"{prefix}.{s}" for s in _SPELLINGS[canon] if f"{prefix}.{s}" in f.keys]
    if len(found) > 1:
        raise CheckpointError(f"{f.path}: {prefix} holds {canon} twice ({', '.join(found)})")
    return found[0] if found else None


def _read_linear(f: _File, prefix: str, K: int, N: int, has_bias: bool, shift: float = 0.0) -> dict[str, Any]:
    """Check and unpack one Nunchaku W4A4 linear for a model linear of ``K`` in, ``N`` out (row-major out).

    ``shift``: Nunchaku feeds this linear's residual ``(x + shift) / smooth`` (an MLP's fc2); the bias returned
    is the one for ``x / smooth``: ``bias + shift * (codes * scales) @ (1 / smooth)``. The bias comes back in
    float64 (rounded to bf16 once, by :func:`_build`).
    """
    Kp, Np = _pad128(K), _pad128(N)
    keys = {c: _find(f, prefix, c) for c in _SPELLINGS}
    for mark in _NVFP4_MARKS:
        if f"{prefix}.{mark}" in f.keys:
            raise f.error(f"{prefix}.{mark}", "an NVFP4 checkpoint (per-tensor / per-channel fp4 scales); "
                                             "only Nunchaku's int4 checkpoints are supported")
    need = ["qweight", "wscales", "smooth", "lora_down", "lora_up"] + (["bias"] if has_bias else [])
    missing = [f"{prefix}.{_SPELLINGS[c][0]}" for c in need if keys[c] is None]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensors {missing} (the model's linear has K={K}, N={N}, "
                              f"bias={has_bias})")
    if keys["bias"] is not None and not has_bias:
        raise f.error(keys["bias"], "the model's linear has no bias")
    qweight = f.get(keys["qweight"], (Np, Kp // 2), (torch.int8,))
    wscales = f._f.get_tensor(keys["wscales"])
    if wscales.dtype == torch.float8_e4m3fn:
        raise f.error(keys["wscales"], "fp8 group scales: an NVFP4 checkpoint; only int4 ones are supported")
    if wscales.dtype == torch.float16:
        # g64 holds bf16 scales: fp16 -> bf16 would round the scales, i.e. change the weights
        raise f.error(keys["wscales"], "expected dtype torch.bfloat16 (g64 holds bf16 scales; fp16 Nunchaku "
                                       "checkpoints are not supported), got torch.float16")
    dtype = torch.bfloat16
    wscales = f.get(keys["wscales"], (Kp // 64, Np), (dtype,))
    smooth = f.get(keys["smooth"], (Kp,), (dtype,))
    down = f._f.get_tensor(keys["lora_down"])
    R = down.shape[1] if down.dim() == 2 else -1
    if R < 0 or R % P.FRAG != 0:
        raise f.error(keys["lora_down"], f"expected shape ({Kp}, R) with R a multiple of {P.FRAG}, "
                                         f"got {tuple(down.shape)}")
    down = f.get(keys["lora_down"], (Kp, R), (dtype,))
    up = f.get(keys["lora_up"], (Np, R), (dtype,))
    bias = f.get(keys["bias"], (Np,), (dtype,)) if has_bias else None
    for canon, t in (("wscales", wscales), ("lora_down", down), ("lora_up", up), ("bias", bias)):
        if t is not None and not torch.isfinite(t.float()).all():
            raise f.error(keys[canon], "non-finite values")
    sm = P.unpack_vector(smooth)[:K]
    if not (torch.isfinite(sm.float()).all() and (sm != 0).all()):
        raise f.error(keys["smooth"], "the smoothing factor divides x: it must be finite and non-zero")
    codes = P.unpack_weight(qweight)[:N, :K]
    scales = P.unpack_scales(wscales)[:N, : K // 64]
    # float64 until the module is built, so that a shift and a merge round only once
    b = None if bias is None else P.unpack_vector(bias)[:N].double()
    if shift:
        if b is None:
            raise CheckpointError(f"{f.path}: {prefix} takes a shifted input (Nunchaku's unsigned fc2) and needs "
                                  f"a bias to absorb the shift; the model's linear has none")
        wq = (codes.double().reshape(N, K // 64, 64) * scales.double()[..., None]).reshape(N, K)
        b = b + shift * (wq @ (1.0 / sm.double()))
    return {
        "codes": codes, "scales": scales, "smooth": sm, "bias": b,
        "lora_down": P.unpack_lowrank(down, down=True)[:, :K] if R else down.new_zeros(0, K),
        "lora_up": P.unpack_lowrank(up, down=False)[:N] if R else up.new_zeros(N, 0),
        "keys": [k for k in keys.values() if k is not None],
    }


def _merge_k(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Linears that read consecutive K-slices of one input and sum into one output, as one linear."""
    R = sum(p["lora_down"].shape[0] for p in parts)
    K = sum(p["codes"].shape[1] for p in parts)
    down = parts[0]["lora_down"].new_zeros(R, K)
    r = k = 0
    for p in parts:  # block-diagonal: each rank block sees only its own K-slice
        pr, pk = p["lora_down"].shape
        down[r:r + pr, k:k + pk] = p["lora_down"]
        r, k = r + pr, k + pk
    biases = [p["bias"] for p in parts if p["bias"] is not None]
    # summed in float64 and rounded once (by _build); Nunchaku adds each bias in its own epilogue
    bias = torch.stack(biases).sum(0) if biases else None
    return {
        "codes": torch.cat([p["codes"] for p in parts], dim=1),
        "scales": torch.cat([p["scales"] for p in parts], dim=1),
        "smooth": torch.cat([p["smooth"] for p in parts]),
        "lora_down": down,
        "lora_up": torch.cat([p["lora_up"] for p in parts], dim=1),
        "bias": bias,
        "keys": [k for p in parts for k in p["keys"]],
    }


def _build(lin: dict[str, Any], layout: str, device: torch.device) -> SVDQLinear:
    """An SVDQLinear holding ``lin`` in g64 (exactly), then moved to ``layout``."""
    N, K = lin["codes"].shape
    R = lin["lora_down"].shape[0]
    mod = SVDQLinear(K, N, rank=R, fmt="svdq-int4", bias=lin["bias"] is not None, dtype=torch.bfloat16,
                     weight_layout="g64")
    with torch.no_grad():
        mod.qweight.copy_(int4.pack(lin["codes"]))
        mod.wscales.copy_(lin["scales"])
        mod.smooth.copy_(lin["smooth"].float())  # bf16 -> fp32: exact
        mod.lora_down.copy_(lin["lora_down"])
        mod.lora_up.copy_(lin["lora_up"])
        if lin["bias"] is not None:
            mod.bias.copy_(lin["bias"])  # the one rounding of a shifted or merged bias
    mod.check_buffers()
    mod = mod.to(device)  # convert where the model runs: the scale search is much faster on a GPU
    if layout != "g64":
        mod.convert_layout(layout)
    return mod


# ---- the model side ------------------------------------------------------------------------------


def _linear_shape(block: nn.Module, base: str, name: str) -> tuple[int, int, bool]:
    """(K, N, bias) the model's linear ``base.name`` has, or will have once Q/K/V are fused."""
    if name in _FIQKV and not _has(block, name):
        parts = [block.get_submodule(p) for p in _FIQKV[name]]
        return parts[0].in_features, sum(p.out_features for p in parts), parts[0].bias is not None
    m = block.get_submodule(name)
    if not isinstance(m, nn.Linear):
        raise CheckpointError(f"the model's {base}.{name} is a {type(m).__name__}, not an nn.Linear "
                              f"(already quantized?)")
    return m.in_features, m.out_features, m.bias is not None


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _auto_layout(weight_layout: str, device: torch.device) -> str:
    if weight_layout == "auto":
        # the conversion that keeps the most fidelity where int4 tensor cores are missing (issue 14: -0.12 dB)
        return "g64" if has_int4_tensor_cores(device) else "f8l"
    if weight_layout not in w4_layouts.LAYOUTS:
        raise ValueError(f"load_nunchaku: weight_layout must be 'auto' or one of {list(w4_layouts.LAYOUTS)}, "
                         f"got {weight_layout!r}")
    return weight_layout


def _classify(f: _File, n_blocks: dict[str, int]) -> tuple[dict[str, list[str]], list[str]]:
    """Sort the file's keys: (skipped reason -> keys, keys outside the blocks). Unknown block keys raise."""
    skipped: dict[str, list[str]] = {}
    top: list[str] = []
    linears = {DOUBLE: set(_DOUBLE_LINEARS), SINGLE: set(_SINGLE_LINEARS) | set(_SINGLE_MERGED)}
    for key in sorted(f.keys):
        head, _, rest = key.partition(".")
        if head not in n_blocks:
            top.append(key)
            continue
        idx, _, rest = rest.partition(".")
        if not idx.isdigit() or int(idx) >= n_blocks[head]:
            raise f.error(key, f"no block {head}.{idx} in the model (it has {n_blocks[head]} {head})")
        local, _, param = rest.rpartition(".")
        if local in linears[head] and (param in _BY_SPELLING or param in _NVFP4_MARKS):
            if _BY_SPELLING.get(param) == "smooth_orig":
                skipped.setdefault("smooth_orig: the pre-fusion smoothing, unused by the kernels", []).append(key)
            continue  # read by _read_linear
        if local in _AWQ[head] and param in _AWQ_PARAMS:
            skipped.setdefault("AdaLN linears in W4A16 AWQ: not imported, the model keeps its own", []).append(key)
            continue
        if local in _NORMS[head] and param == "weight":
            continue  # copied
        raise f.error(key, f"not a tensor a Nunchaku FLUX {head} block holds (expected the W4A4 linears "
                           f"{sorted(linears[head])}, the AdaLN {list(_AWQ[head])} or {list(_NORMS[head])})")
    return skipped, top


def _build_all(f: _File, transformer: nn.Module, layout: str, device: torch.device, shift: float,
               report: NunchakuReport) -> dict[str, SVDQLinear]:
    """Every W4A4 linear of the file as an SVDQLinear of ``layout``, by the model name it replaces."""
    built: dict[str, SVDQLinear] = {}
    for head in (DOUBLE, SINGLE):
        table = _DOUBLE_LINEARS if head == DOUBLE else _SINGLE_LINEARS
        for i, block in enumerate(getattr(transformer, head)):
            base = f"{head}.{i}"
            for nk, target in table.items():
                K, N, has_bias = _linear_shape(block, base, target)
                lin = _read_linear(f, f"{base}.{nk}", K, N, has_bias, shift if nk in _SHIFTED else 0.0)
                built[f"{base}.{target}"] = _build(lin, layout, device)
            if head == SINGLE:  # proj_out = [out_proj | mlp_fc2] along K
                out = block.get_submodule("proj_out")
                k2 = block.get_submodule("proj_mlp").out_features
                halves = [_read_linear(f, f"{base}.{nk}", k, out.out_features, out.bias is not None,
                                       shift if nk in _SHIFTED else 0.0)
                          for nk, k in zip(_SINGLE_MERGED, (out.in_features - k2, k2))]
                built[f"{base}.proj_out"] = _build(_merge_k(halves), layout, device)
                report.merged[f"{base}.proj_out"] = [f"{base}.{nk}" for nk in _SINGLE_MERGED]
    return built


def _check_copies(f: _File, transformer: nn.Module, top: list[str]) -> list[tuple[Tensor, Tensor, str]]:
    """(model tensor, file tensor, model name) for every unquantized tensor of the file, all checked."""
    params = dict(transformer.named_parameters())
    params.update(dict(transformer.named_buffers()))
    pairs = [(key, key) for key in top]  # (file key, model name)
    for head in (DOUBLE, SINGLE):
        for i in range(len(getattr(transformer, head))):
            for norm in _NORMS[head]:
                key = f"{head}.{i}.{norm}.weight"
                if key in f.keys:
                    pairs.append((key, f"{head}.{i}.attn.{norm}.weight"))
    checked = []
    for key, name in pairs:
        if name not in params:
            raise f.error(key, f"no tensor {name!r} in the model to load it into")
        want, t = params[name], f._f.get_tensor(key)
        if tuple(t.shape) != tuple(want.shape):
            raise f.error(key, f"expected shape {tuple(want.shape)} (the model's {name}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise f.error(key, f"expected a floating-point tensor, got {t.dtype}")
        checked.append((want, t, name))
    return checked


@torch.no_grad()
def load_nunchaku(obj: Any, path: str | os.PathLike[str], *, weight_layout: str = "auto",
                  fc2_input_shift: float = GELU_SHIFT, progress: bool = False) -> NunchakuReport:
    """Load a Nunchaku SVDQuant int4 FLUX.1 checkpoint into a diffusers ``FluxTransformer2DModel``, in place.

    Args:
        obj: a FluxPipeline (its ``.transformer``) or the transformer.
        path: the ``.safetensors`` file (e.g. ``svdq-int4_r32-flux.1-dev.safetensors``).
        weight_layout: "auto" (``f8l`` where the GPU has no int4 tensor cores, else ``g64``), "g64" (the
            file's weights exactly, W4A4), "f8l" (fp8 tokens) or "i8q" (int8 tokens; costs fidelity).
        fc2_input_shift: the shift Nunchaku adds to every MLP fc2 input before its unsigned int4
            quantization (0.171875 in its kernels); folded into those layers' biases, since this engine
            feeds them the unshifted GELU output. 0 for a file whose fc2 biases assume no shift.
        progress: print the report.

    Returns:
        A :class:`NunchakuReport` (also at ``transformer._lowbit_report``).

    Raises:
        CheckpointError: the file cannot be read, misses or has extra tensors, or a tensor has the wrong
            shape or dtype; the message names the tensor, what was expected and what came. Raised before the
            model is touched: it is left exactly as it was.
        ValueError: an unknown ``weight_layout``.
    """
    start = time.perf_counter()
    transformer = resolve_transformer(obj)
    n_blocks = {}
    for head in (DOUBLE, SINGLE):
        blocks = getattr(transformer, head, None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"load_nunchaku: expected a FLUX transformer with .{DOUBLE} and .{SINGLE}, "
                            f"got {type(transformer).__name__}")
        n_blocks[head] = len(blocks)
    device = next(iter(transformer.parameters())).device
    layout = _auto_layout(weight_layout, device)
    f = _File(Path(path))
    f.check_metadata()
    report = NunchakuReport(str(path), layout, w4_layouts.ACTS[layout][0] if layout != "g64" else "int4",
                            bytes_before=model_nbytes(transformer))
    report.skipped, top = _classify(f, n_blocks)

    # 1. everything read, checked and built on the side (the cheap checks first)
    checked = _check_copies(f, transformer, top)
    built = _build_all(f, transformer, layout, device, fc2_input_shift, report)

    # 2. the model changes: fusion (undoable), the swaps, the copies
    snap = Transaction(transformer)
    if any("to_q" in m._modules for m in transformer.modules()):
        fused, report.qkv_note, _removed = fuse_qkv(transformer)
        if not fused:
            snap.rollback()
            raise CheckpointError(f"{path}: Nunchaku's qkv_proj layers need fused Q/K/V, but this model cannot "
                                  f"fuse: {report.qkv_note}")
    else:
        report.qkv_note = "the model's Q/K/V were already fused"
    for name, mod in built.items():
        mod.train(transformer.training)
        _set_submodule(transformer, name, mod)
        report.quantized.append(name)
    for want, t, name in checked:
        want.copy_(t)  # shape checked above; casts to the model's dtype
        report.copied.append(name)
    snap.commit()
    report.act_mode = next(iter(built.values())).act_mode if built else report.act_mode
    report.bytes_after = model_nbytes(transformer)
    report.seconds = time.perf_counter() - start
    try:
        transformer._lowbit_report = report
    except AttributeError:
        pass
    if progress:
        print(report)
    return report


__all__ = ["load_nunchaku", "NunchakuReport"]
