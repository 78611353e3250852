"""``load(pipe, "svdq-int4")``: quantize a diffusers transformer in place, or load a saved checkpoint into it.

The steps, in order:

1. pick the architecture's policy table (:mod:`lowbit_engine.integrations.policies`);
2. fuse Q, K and V into one GEMM with diffusers' own ``fuse_qkv_projections()`` where the policy says it
   works; the separate projections it leaves behind are unused afterwards and are removed (their memory
   would otherwise stay);
3. calibrate: forward pre-hooks on every layer to quantize keep a uniform random sample of its input tokens
   while the user's calibration inputs run (``calib``);
4. replace every such layer, on its parent, by ``quantize_linear(layer, fmt, calib=tokens, rank=rank)``;
5. FLUX.1 and SD3 / SD3.5 with 8-bit-token layers (svdq-w4a8): give the blocks their fused forwards
   (:mod:`lowbit_engine.integrations.fused`: the entry linears' quantizer fused into the adaLN norm) and,
   when calibrating, run the calibration inputs once more on the quantized model to calibrate the MLP
   exits' static input scales (:func:`~lowbit_engine.integrations.fused_blocks.calibrate_exit_scales`), so
   that fc1's GEMM writes fc2's 8-bit input. ``fused_blocks=False`` turns step 5 off.

With ``checkpoint=`` step 3 and 4 become :func:`lowbit_engine.load_checkpoint` (no calibration; the exit
scales come from the checkpoint).

The call is atomic: every argument is checked before the model is touched, and steps 2 to 5 run inside one
:func:`~lowbit_engine.integrations.staging.staged` transaction, so a failure at any step (a calibration
input the model rejects, a layer the quantizer refuses, a corrupt checkpoint) leaves the model with the same
modules and a bit-identical state dict.

The call returns the object it was given. The :class:`LoadReport` (what was quantized, what was kept and
why, memory before and after) is logged at INFO on the ``lowbit_engine`` logger unless ``progress=False``
(``logging.basicConfig(level=logging.INFO)`` shows it; the ``lowbit-engine`` command does), stored at
``obj._lowbit_report`` and returned by :func:`last_report`.

Example:
    >>> import torch, warnings
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    >>> calib = [{"input": torch.randn(16, 64, dtype=torch.bfloat16)}]
    >>> _ = load(model, "svdq-int4", rank=8, calib=calib, progress=False)
    >>> [type(m).__name__ for m in model]
    ['SVDQLinear', 'GELU', 'SVDQLinear']
    >>> last_report().num_quantized
    2
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..errors import CalibrationError, CheckpointError, UnknownFormatError
from ..formats import FORMATS
from ..quant.svdquant import NoCalibrationWarning
from ..quantize import available_formats, check_options, quantize_linear
from .policies import KEEP, USER_SKIP, W4A16, Policy, Rule, policy_for
from . import folder as _folder
from .staging import Transaction, staged

MAX_CALIB_TOKENS = 512  # tokens kept per layer: enough for the alpha search, bounded memory
_POLICY_FORMATS = (W4A16,)  # formats a policy row assigns on its own (weight-only: no calibration, no rank)
SIDECAR_SUFFIX = ".json"  # "<checkpoint>.json" records the architecture, its config, fmt and rank
_FUSED_NAMES = ("to_qkv", "to_added_qkv", "to_kv")
# fused child -> the separate projections it replaces (they are dead weight once the fused one runs)
_SUPERSEDES = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
               "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}

_LAST_REPORT: LoadReport | None = None
# A child of the "lowbit_engine" logger: a library logs its report rather than printing it.
logger = logging.getLogger(__name__)


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load` did. ``str(report)`` is a readable summary.

    Attributes:
        architecture: the transformer's class name; ``policy``: the table used.
        fmt, rank: the format and low-rank branch rank asked for.
        source: "calibrated", "uncalibrated" or "checkpoint".
        quantized: format -> names of the layers quantized (or loaded) in that format.
        kept: reason -> names of the linear layers left as they were.
        qkv_fused: whether Q/K/V were fused; ``qkv_note`` says how or why not.
        removed: the separate Q/K/V projections dropped after fusion (unused by the fused attention).
        uncalibrated: quantized layers that saw no calibration tokens (quantized without smoothing).
        calib_runs: calibration forward calls (or pipeline calls) made.
        bytes_before, bytes_after: parameter + buffer bytes of the transformer before and after.
        seconds: wall time of the whole call; ``quantize_seconds``: of the layer loop alone.
        fused_blocks: blocks given a fused forward (:mod:`.fused`); ``fused_note`` says which or why none.
        exit_scales: ``(used, tried, max_loss_db)``: MLP exits calibrated to a static input scale, of those
            tried, and the SQNR loss allowed (None: not calibrated).
    """

    architecture: str
    policy: str
    fmt: str
    rank: int
    source: str = "uncalibrated"
    quantized: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, list[str]] = field(default_factory=dict)
    qkv_fused: bool = False
    qkv_note: str = ""
    removed: list[str] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    calib_runs: int = 0
    checkpoint: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    quantize_seconds: float = 0.0
    fused_blocks: int = 0
    fused_note: str = ""
    exit_scales: tuple[int, int, float] | None = None

    @property
    def num_quantized(self) -> int:
        return sum(len(v) for v in self.quantized.values())

    @property
    def num_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def __str__(self) -> str:
        mib = 2.0 ** 20
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        src = {"checkpoint": f"checkpoint {self.checkpoint}",
               "calibrated": f"calibrated ({self.calib_runs} run(s), up to {MAX_CALIB_TOKENS} tokens per layer)",
               "uncalibrated": "no calibration: no smoothing (pass calib= for W4A4 quality)"}[self.source]
        lines = [f"lowbit-engine: {self.architecture} (policy {self.policy}), {self.fmt} rank {self.rank}, {src}"]
        for fmt, names in self.quantized.items():
            lines.append(f"  quantized {fmt}: {len(names)} layers")
        if self.quantize_seconds:
            lines.append(f"  quantizing took {self.quantize_seconds:.1f} s")
        for reason, names in self.kept.items():
            shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
            lines.append(f"  kept {len(names)}: {reason} [{shown}]")
        lines.append(f"  QKV fused: {'yes' if self.qkv_fused else 'no'} ({self.qkv_note})")
        if self.fused_note:
            lines.append(f"  fused block forwards: {self.fused_blocks} blocks ({self.fused_note})")
        if self.exit_scales is not None:
            used, tried, db = self.exit_scales
            lines.append(f"  exit fusion: {used} of {tried} MLP exits got a static input scale (the others would "
                         f"lose more than {db:g} dB SQNR with one: per-token)")
        if self.removed:
            lines.append(f"  removed {len(self.removed)} separate Q/K/V projections superseded by the fused ones")
        if self.uncalibrated and self.source == "calibrated":
            lines.append(f"  {len(self.uncalibrated)} layers saw no calibration tokens (no smoothing): "
                         f"{', '.join(self.uncalibrated[:3])}{' ...' if len(self.uncalibrated) > 3 else ''}")
        lines.append(f"  memory: {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                     f"({ratio:.2f}x smaller), {self.seconds:.1f} s")
        return "\n".join(lines)


def last_report() -> LoadReport | None:
    """The report of the most recent :func:`load` call in this process (None before the first)."""
    return _LAST_REPORT


# ---- small helpers ------------------------------------------------------------------------------


def resolve_transformer(obj: Any, who: str = "lowbit_engine.load") -> nn.Module:
    """The transformer of a pipeline (``obj.transformer``), or ``obj`` itself if it is an ``nn.Module``.

    Raises TypeError for anything else; its message starts with ``who`` (the public function called).

    Example:
        >>> resolve_transformer(nn.Linear(64, 64)).__class__.__name__
        'Linear'
    """
    if isinstance(obj, nn.Module):
        return obj
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    raise TypeError(f"{who}: expected a diffusers pipeline with a .transformer or an nn.Module, "
                    f"got {type(obj).__name__}")


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_format(fmt: str) -> None:
    # The same checks quantize_linear makes, made before the model is touched.
    if not isinstance(fmt, str):
        raise TypeError(f"lowbit_engine.load: fmt must be a format name (str), got {type(fmt).__name__}")
    if fmt not in FORMATS:
        raise UnknownFormatError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    if fmt not in available_formats():
        raise NotImplementedError(f"format {fmt!r} has no quantized module yet; load builds: "
                                  f"{', '.join(available_formats())}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _timed(items: Sequence[Any], enabled: bool, desc: str, report: LoadReport) -> Iterable[Any]:
    """``items`` through one progress bar (tqdm: count, rate, ETA) that stays on screen, and the loop's wall
    time into ``report.quantize_seconds`` (the report prints it)."""
    start = time.perf_counter()
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with diffusers; without it, no bar (the time is still reported)
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=len(items), desc=desc, unit="layer")
    try:
        for item in items:
            if bar is not None:
                bar.set_postfix_str(str(item)[-40:], refresh=False)
            yield item
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        report.quantize_seconds = time.perf_counter() - start


def _config_dict(transformer: nn.Module) -> dict[str, Any]:
    """The diffusers config of the transformer as JSON reads it back (private ``_`` keys and the
    ``quantization_config`` that quantizing adds dropped: the architecture, not its quantization)."""
    cfg = getattr(transformer, "config", None)
    if cfg is None:
        return {}
    if callable(cfg):  # a module whose config() is a method (SVDQLinear and the other quantized layers)
        cfg = cfg()
    arch = {k: v for k, v in dict(cfg).items() if not k.startswith("_") and k != "quantization_config"}
    return json.loads(json.dumps(arch, default=str))


# ---- QKV fusion, undoable ----------------------------------------------------------------------


def fuse_qkv(transformer: nn.Module) -> tuple[bool, str, list[str]]:
    """Fuse Q/K/V with diffusers' ``fuse_qkv_projections()`` and drop the separate projections it supersedes.

    Returns ``(fused, note, removed names)``. A model without the method, or whose call raises or creates
    no fused layer, is left as it was (``fused`` False, the note says why).
    """
    fn = getattr(transformer, "fuse_qkv_projections", None)
    if fn is None:
        return False, "the model has no fuse_qkv_projections()", []
    tx = Transaction(transformer)
    try:
        fn()
    except Exception as e:  # diffusers raises ValueError for added-KV processors; anything else: same answer
        tx.rollback()
        return False, f"fuse_qkv_projections() failed: {type(e).__name__}: {e}", []
    fused = [n for n, _ in transformer.named_modules() if n.rpartition(".")[2] in _FUSED_NAMES]
    if fused:
        from .processors import repair_self_attention

        repair_self_attention(transformer)  # SD3.5: attn2 and the qk norms (integrations/processors.py)
    if not fused:
        tx.rollback()
        return False, "fuse_qkv_projections() created no fused projection (not supported by these attentions)", []
    tx.commit()
    removed = []
    for name in fused:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        for old in _SUPERSEDES[child]:
            if old in parent._modules:
                del parent._modules[old]  # the fused attention never calls it again; free its weights
                removed.append(f"{parent_name}.{old}")
    kinds = sorted({n.rpartition(".")[2] for n in fused})
    return True, f"diffusers fuse_qkv_projections(): {len(fused)} fused layers ({', '.join(kinds)})", removed


# ---- calibration --------------------------------------------------------------------------------


class _TokenSampler:
    """A uniform random sample of at most ``limit`` input tokens of one layer, over all its calls.

    Every token gets a random key and the ``limit`` smallest keys are kept (sampling without replacement
    across calls, in bounded memory); tokens are stored on the CPU.
    """

    def __init__(self, limit: int, gen: torch.Generator):
        self.limit, self.gen = limit, gen
        self.tokens: Tensor | None = None
        self.keys: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        x = args[0] if args else (kwargs or {}).get("input")
        if not isinstance(x, Tensor):
            return
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu")
        keys = torch.rand(x.shape[0], generator=self.gen)
        if self.tokens is not None:
            x, keys = torch.cat([self.tokens, x.to(self.tokens.dtype)]), torch.cat([self.keys, keys])
        if x.shape[0] > self.limit:
            keep = keys.topk(self.limit, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.tokens, self.keys = x.contiguous(), keys


def _calib_items(obj: Any, transformer: nn.Module, calib: Any,
                 calib_kwargs: dict[str, Any] | None = None) -> list[Any] | Callable[[Any], Any]:
    """``calib`` checked (before the model is touched): a callable, or a list of dicts / prompt strings."""
    if callable(calib):
        return calib
    items = [calib] if isinstance(calib, (str, dict)) else list(calib)
    if not items:
        raise ValueError("lowbit_engine.load: calib is empty; pass at least one input, or calib=None for no "
                         "calibration")
    if calib_kwargs and any(isinstance(item, str) for item in items):
        _check_call_kwargs(obj, calib_kwargs)
    for item in items:
        if isinstance(item, str):
            if obj is transformer:
                raise TypeError("calib prompts need a pipeline; for a bare transformer pass dicts of forward kwargs")
            if hasattr(obj, "text_encoder") and obj.text_encoder is None:
                raise ValueError("calib prompts need the pipeline's text encoders (text_encoder is None); pass "
                                 "dicts of transformer kwargs or a callable that runs the pipeline")
        elif not isinstance(item, dict):
            raise TypeError(f"calib items must be dicts of transformer kwargs or prompt strings, "
                            f"got {type(item).__name__}")
    return items


def _check_call_kwargs(obj: Any, calib_kwargs: dict[str, Any]) -> None:
    """calib_kwargs the pipeline's ``__call__`` does not take fail here, before the model is touched."""
    try:
        params = inspect.signature(obj.__call__).parameters
    except (TypeError, ValueError):  # no signature to read (a C callable): the run itself will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(calib_kwargs) - set(params))
    if unknown:
        raise ValueError(f"lowbit_engine.load: calib_kwargs {unknown} are not arguments of "
                         f"{type(obj).__name__}.__call__ (it takes: {', '.join(sorted(params))})")


def _run_calibration(obj: Any, transformer: nn.Module, calib: Any, calib_steps: int,
                     calib_kwargs: dict[str, Any]) -> int:
    """Run the calibration inputs; returns how many runs were made.

    A run that raises becomes a :class:`CalibrationError` naming the input (the original error is its
    ``__cause__``); the caller's transaction then puts the model back.
    """
    items = _calib_items(obj, transformer, calib, calib_kwargs)
    if callable(items):
        try:
            items(obj)
        except Exception as e:
            raise CalibrationError(f"lowbit_engine.load: the calib callable raised {type(e).__name__}: {e}") from e
        return 1
    for i, item in enumerate(items):
        try:
            if isinstance(item, dict):
                transformer(**item)
            else:  # a prompt: a few denoising steps of the pipeline itself, latents out (no VAE decode)
                obj(**{"prompt": item, "num_inference_steps": calib_steps, "output_type": "latent",
                       **calib_kwargs})
        except Exception as e:
            what = "dict of transformer kwargs" if isinstance(item, dict) else f"prompt {item!r}"
            raise CalibrationError(f"lowbit_engine.load: calibration input {i} (a {what}) failed: "
                                   f"{type(e).__name__}: {e}") from e
    return len(items)


def collect_activations(obj: Any, transformer: nn.Module, names: Sequence[str], calib: Any, *,
                        calib_steps: int = 4, calib_kwargs: dict[str, Any] | None = None,
                        max_tokens: int = MAX_CALIB_TOKENS, seed: int = 0) -> tuple[dict[str, Tensor], int]:
    """Input tokens of each layer in ``names`` while ``calib`` runs: ``({name: [T, K]}, runs)``.

    Layers that were never called are absent from the dict.
    """
    gen = torch.Generator().manual_seed(seed)
    samplers = {n: _TokenSampler(max_tokens, gen) for n in names}
    hooks = [transformer.get_submodule(n).register_forward_pre_hook(s, with_kwargs=True)
             for n, s in samplers.items()]
    try:
        with torch.no_grad():
            runs = _run_calibration(obj, transformer, calib, calib_steps, calib_kwargs or {})
    finally:
        for h in hooks:
            h.remove()
    return {n: s.tokens for n, s in samplers.items() if s.tokens is not None}, runs


# ---- the plan -----------------------------------------------------------------------------------


def plan_layers(transformer: nn.Module, policy: Policy,
                skip: Sequence[str] | dict[str, str] | None = None) -> dict[str, Rule]:
    """Every ``nn.Linear`` of the model and the rule that applies to it. ``skip`` regexes win and keep the
    layer: a list (reason "skip= given by the caller") or ``{regex: reason}`` (the caller's reason)."""
    whys = list(skip.values()) if isinstance(skip, dict) else None
    patterns = compile_skips(list(skip) if isinstance(skip, dict) else skip)
    skips = [(rx, USER_SKIP if whys is None or whys[i] == USER_SKIP else f"{USER_SKIP}: {whys[i]}")
             for i, rx in enumerate(patterns)]
    plan = {}
    for name, mod in transformer.named_modules():
        if not isinstance(mod, nn.Linear) or not name:
            continue
        reason = next((why for rx, why in skips if rx.fullmatch(name)), None)
        plan[name] = Rule(".*", KEEP, reason) if reason is not None else policy.decide(name, mod.in_features)
    return plan


def compile_skips(skip: Sequence[str] | dict[str, str] | None) -> list[re.Pattern[str]]:
    """The ``skip=`` regexes compiled; a ValueError names a pattern that is not a regex (or not a str).

    Example:
        >>> compile_skips(["(unclosed"])
        Traceback (most recent call last):
        ...
        ValueError: lowbit_engine.load: skip pattern '(unclosed' is not a valid regex: missing ), unterminated subpattern at position 0
    """
    if skip is None:
        return []
    if isinstance(skip, str):  # a lone string would be iterated character by character
        skip = [skip]
    elif isinstance(skip, dict):  # {regex: reason}
        skip = list(skip)
    out = []
    for pattern in skip:
        if not isinstance(pattern, str):
            raise TypeError(f"lowbit_engine.load: skip patterns must be str regexes, got {type(pattern).__name__} "
                            f"({pattern!r})")
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"lowbit_engine.load: skip pattern {pattern!r} is not a valid regex: {e}") from None
    return out


def _kept_by_reason(plan: dict[str, Rule]) -> dict[str, list[str]]:
    kept: dict[str, list[str]] = {}
    for name, rule in plan.items():
        if rule.action == KEEP:
            kept.setdefault(rule.reason, []).append(name)
    return kept


# ---- checkpoints --------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save` writes the architecture record: ``<checkpoint>.json``."""
    return Path(str(path) + SIDECAR_SUFFIX)


def save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Save the quantized layers of a pipeline's transformer (or of a module) and a sidecar JSON.

    The safetensors file is :func:`lowbit_engine.checkpoint.save`'s; ``<path>.json`` records the
    transformer's class, its diffusers config, the formats and ranks, and whether QKV was fused, so that
    loading into another architecture or config is a clear :class:`CheckpointError`.

    Example:
        >>> import tempfile, os, torch
        >>> model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
        >>> _ = load(model, "svdq-int4", rank=8, calib=[{"input": torch.randn(8, 64, dtype=torch.bfloat16)}],
        ...      progress=False)
        >>> p = save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> json.loads(sidecar_path(p).read_text())["architecture"]
        'Sequential'
    """
    transformer = resolve_transformer(obj, "lowbit_engine.save")
    path = ckpt.save(transformer, path)
    mods = ckpt.quantized_modules(transformer)
    configs = [m.config() for m in mods.values() if hasattr(m, "config")]
    record = {
        "architecture": type(transformer).__name__,
        "config": _config_dict(transformer),
        "formats": sorted({c.get("format") for c in configs}),
        "ranks": sorted({c["rank"] for c in configs if "rank" in c}),  # weight-only layers have none
        "qkv_fused": any(n.rpartition(".")[2] in _FUSED_NAMES for n in mods),
    }
    sidecar_path(path).write_text(json.dumps(record, indent=1, sort_keys=True))
    return path


def _checkpoint_modules(path: Path) -> dict[str, dict[str, Any]]:
    """The ``modules`` record of a checkpoint's metadata (raises CheckpointError if it cannot be read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[ckpt.METADATA_KEY])
        return dict(meta["modules"])
    except Exception as e:  # unreadable, not ours, garbled: load_checkpoint words it best, but it needs a model
        raise CheckpointError(f"{path}: not a readable lowbit-engine checkpoint ({type(e).__name__}: {e})") from e


def _check_sidecar(path: Path, transformer: nn.Module, fmt: str, rank: int) -> None:
    side = sidecar_path(path)
    if not side.exists():
        return  # a plain lowbit_engine.save file: load_checkpoint's own checks still apply
    try:
        record = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{side}: the checkpoint's sidecar is not valid JSON ({e}); restore it from the "
                              f"save or delete it (the checkpoint's own checks still apply without it)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{side}: the sidecar must hold a JSON object, got {type(record).__name__}")
    arch = type(transformer).__name__
    if record.get("architecture") != arch:
        raise CheckpointError(f"{path}: saved from a {record.get('architecture')}, the model is a {arch}")
    want, have = record.get("config", {}), _config_dict(transformer)
    diff = {k: (want.get(k), have.get(k)) for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)}
    if diff:
        raise CheckpointError(f"{path}: the {arch} has another config; (checkpoint, model): {diff}")
    main = [f for f in record.get("formats", []) if f not in _POLICY_FORMATS or f == fmt]
    if main != [fmt] or record.get("ranks") not in ([rank], []):
        raise CheckpointError(f"{path}: holds formats {record.get('formats')} rank {record.get('ranks')}; "
                              f"load asked for {fmt!r} rank {rank}")


def _precheck(path: Path, modules: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, int, bool]],
              fmt: str) -> None:
    """Every checkpoint module must land on a linear of the (planned) model with its shape: cheap, no tensors."""
    for name, rec in modules.items():
        cfg = rec.get("config", {}) if isinstance(rec, dict) else {}
        if cfg.get("format") != fmt and cfg.get("format") not in _POLICY_FORMATS:
            raise CheckpointError(f"{path}: module {name!r} is {cfg.get('format')!r}; load asked for {fmt!r}")
        want = (cfg.get("in_features"), cfg.get("out_features"), cfg.get("has_bias"))
        if name not in shapes:
            raise CheckpointError(f"{path}: module {name!r}: no nn.Linear of that name in the model")
        if shapes[name] != want:
            raise CheckpointError(f"{path}: module {name!r}: (in, out, bias) {want} in the checkpoint, "
                                  f"{shapes[name]} in the model")


def _planned_shapes(transformer: nn.Module, fuse: bool) -> dict[str, tuple[int, int, bool]]:
    """(in, out, bias) of every linear, with the fused Q/K/V layers fusion would create (nothing touched)."""
    shapes = {n: (m.in_features, m.out_features, m.bias is not None)
              for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    if fuse:
        for fused, parts in _SUPERSEDES.items():
            for n in list(shapes):
                prefix, _, child = n.rpartition(".")
                if child != parts[0] or not all(f"{prefix}.{p}" in shapes for p in parts):
                    continue
                ins, outs, bias = zip(*(shapes[f"{prefix}.{p}"] for p in parts))
                shapes[f"{prefix}.{fused}"] = (ins[0], sum(outs), bias[0])
    return shapes


def _load_from_checkpoint(transformer: nn.Module, path: Path, fmt: str, rank: int, report: LoadReport,
                          allow_extra: bool = False) -> None:
    _check_sidecar(path, transformer, fmt, rank)
    modules = _checkpoint_modules(path)
    wants_fused = any(n.rpartition(".")[2] in _FUSED_NAMES for n in modules)
    _precheck(path, modules, _planned_shapes(transformer, wants_fused), fmt)
    if wants_fused:
        fused, note, removed = fuse_qkv(transformer)
        if not fused:
            raise CheckpointError(f"{path}: holds fused Q/K/V layers but this model cannot fuse: {note}")
        report.qkv_fused, report.qkv_note, report.removed = True, note, removed
    else:
        report.qkv_note = "the checkpoint holds separate Q/K/V projections"
    ckpt.load_checkpoint(path, transformer, allow_extra=allow_extra)  # a failure undoes the fusion (load's transaction)
    report.source, report.checkpoint = "checkpoint", str(path)
    for name, rec in modules.items():
        report.quantized.setdefault(rec["config"]["format"], []).append(name)
    others = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    if others:
        report.kept["not in the checkpoint"] = others


# ---- the entry point ----------------------------------------------------------------------------


def _route_lora(obj: Any, transformer: nn.Module) -> None:
    from ..lora.diffusers_api import guard_transformer, route_pipeline

    if hasattr(transformer, "load_lora_adapter"):
        guard_transformer(transformer)
    if obj is not transformer:
        route_pipeline(obj)


def _quantizer_attach(transformer: nn.Module, fmt: str, rank: int) -> None:
    # Only diffusers models have save_pretrained; importing the backend imports diffusers, so only then.
    if hasattr(transformer, "register_to_config"):
        from .diffusers_quantizer import attach

        attach(transformer, fmt, rank)


def load(obj: Any, fmt: str | None = None, *, rank: int | None = None, calib: Any = None,
         checkpoint: str | os.PathLike[str] | None = None, skip: Sequence[str] | dict[str, str] | None = None,
         policy: Policy | str | None = None, calib_steps: int = 4, calib_kwargs: dict[str, Any] | None = None,
         fuse_qkv_projections: bool = True, max_calib_tokens: int = MAX_CALIB_TOKENS,
         quant_opts: dict[str, Any] | None = None, fused_blocks: bool | None = None,
         exit_max_loss_db: float = 1.0, progress: bool = True) -> Any:
    """Quantize the transformer of ``obj`` (a diffusers pipeline or a bare ``nn.Module``) in place.

    Args:
        obj: a pipeline (its ``.transformer`` is used) or the transformer / any module itself.
        fmt: a format :func:`lowbit_engine.quantize_linear` builds ("svdq-int4", "svdq-w4a8"); None:
            "svdq-int4", or with ``checkpoint=`` the format the checkpoint holds.
        rank: rank of the SVDQuant low-rank branch; None: 32, or the checkpoint's.
        calib: calibration inputs: a list of dicts of transformer forward kwargs; a callable run as
            ``calib(obj)``; or, for a pipeline with text encoders, a list of prompt strings (each runs the
            pipeline for ``calib_steps`` steps with ``output_type="latent"`` and ``calib_kwargs``, e.g. a
            small ``height``/``width``). None: no smoothing (the report says so; one warning).
        checkpoint: a file from :func:`save`, or a lowbit folder from ``save_pretrained``
            (:mod:`lowbit_engine.integrations.folder`; a pipeline folder's ``transformer/`` too): fuse as it
            was saved and load it, no calibration. A path that does not exist (e.g. a hub id) is a
            CheckpointError: nothing is downloaded.
        skip: regexes of layer names (``re.fullmatch``) to keep as they are, on top of the policy; or
            ``{regex: reason}``, the reason shown in the report (e.g. ``{"norm_out.linear": "A/B test"}``).
        policy: a :class:`Policy`, a policy name ("flux", "sd3", "pixart", "sana", "wan", "generic") or
            None to pick one by the transformer's class.
        fuse_qkv_projections: False keeps Q, K and V separate even where fusion works.
        max_calib_tokens: tokens kept per layer (a uniform sample over all calibration calls).
        quant_opts: passed to ``quantize_linear`` (e.g. ``{"act_mode": "fp8"}``, ``{"alphas": (0.5,)}``).
        fused_blocks: the fused block forwards (step 5 above): None installs them on FLUX.1 and SD3 / SD3.5
            when the layers have 8-bit tokens; False never; True always (a ValueError for an architecture
            without them). Undo with ``lowbit_engine.integrations.fused.remove(transformer)``.
        exit_max_loss_db: with fused blocks and ``calib``, an MLP exit gets a static input scale (exit
            fusion) only where it loses at most this much SQNR against per-token scales
            (:func:`~lowbit_engine.integrations.fused_blocks.calibrate_exit_scales`).
        progress: a progress bar over layers, and the report logged at INFO (logger ``lowbit_engine``).

    Returns:
        ``obj`` itself; the :class:`LoadReport` is at ``obj._lowbit_report`` and :func:`last_report`.

    Raises:
        UnknownFormatError: ``fmt`` is not a format name.
        TypeError: ``obj`` is neither a pipeline nor an ``nn.Module``; an argument of the wrong type.
        ValueError: a bad argument: a ``skip`` pattern that is not a regex, a negative ``rank``, a
            ``quant_opts`` key the format's quantizer does not take, ``calib_kwargs`` the pipeline does not
            take, an empty ``calib``, ``fused_blocks=True`` for an architecture without fused blocks.
        CalibrationError: a calibration run raised (its error is the ``__cause__``).
        CheckpointError: the checkpoint is missing or does not fit the model.

        Whatever is raised, the model is left exactly as it was: the arguments are checked first, and the
        changes (fusion, calibration hooks, layer replacement) are undone on any failure.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
        >>> load(model, "int3")
        Traceback (most recent call last):
        ...
        lowbit_engine.errors.UnknownFormatError: unknown format 'int3'; known formats: fp8, mxfp4, nvfp4, svdq-int4, svdq-w4a8, vq2, vq3, w4a16
    """
    global _LAST_REPORT
    start = time.perf_counter()
    transformer = resolve_transformer(obj)
    resolved = None
    if checkpoint is not None:
        resolved = _folder.resolve_checkpoint(checkpoint)  # no sidecar, fmt or rank needed for a folder
        fmt, rank = _folder.checkpoint_format(resolved, transformer, fmt, rank)
    fmt = "svdq-int4" if fmt is None else fmt
    rank = 32 if rank is None else rank
    _check_format(fmt)
    chosen = policy_for(transformer, policy)
    if calib is not None and not callable(calib) and not isinstance(calib, (str, dict)):
        calib = list(calib)  # a generator would be used up by the check below
    _check_load_args(fmt, rank=rank, skip=skip, checkpoint=checkpoint, calib_steps=calib_steps,
                     calib_kwargs=calib_kwargs, max_calib_tokens=max_calib_tokens, quant_opts=quant_opts)
    if calib is not None and checkpoint is None:
        _calib_items(obj, transformer, calib, calib_kwargs)  # a bad calib fails here, before anything is touched
    _check_fused_blocks(transformer, fused_blocks, exit_max_loss_db)
    report = LoadReport(type(transformer).__name__, chosen.name, fmt, rank, bytes_before=model_nbytes(transformer))

    with staged(transformer):  # any exception below puts the model back as it was, then propagates
        if checkpoint is not None:
            _load_from_checkpoint(transformer, resolved.file, fmt, rank, report, allow_extra=resolved.is_folder)
        else:
            _quantize(obj, transformer, chosen, report, rank=rank, calib=calib, skip=skip,
                      calib_steps=calib_steps, calib_kwargs=calib_kwargs, fuse=fuse_qkv_projections,
                      max_tokens=max_calib_tokens, quant_opts=quant_opts or {}, progress=progress)
        _install_fused(obj, transformer, report, fused_blocks, calib=calib if checkpoint is None else None,
                       calib_steps=calib_steps, calib_kwargs=calib_kwargs, max_loss_db=exit_max_loss_db)

    _quantizer_attach(transformer, fmt, rank)  # save_pretrained writes the lowbit folder from here on
    _route_lora(obj, transformer)  # pipe.load_lora_weights & co. go to engine.lora (or raise exactly)
    report.bytes_after = model_nbytes(transformer)
    report.seconds = time.perf_counter() - start
    _LAST_REPORT = report
    for target in {id(obj): obj, id(transformer): transformer}.values():
        try:
            target._lowbit_report = report  # nn.Module.__setattr__ keeps a plain attribute for non-tensors
        except AttributeError:
            pass
    if progress:
        logger.info("%s", report)
    return obj


def _check_fused_blocks(transformer: nn.Module, fused_blocks: Any, exit_max_loss_db: Any) -> None:
    from . import fused

    if isinstance(exit_max_loss_db, bool) or not isinstance(exit_max_loss_db, (int, float)) \
            or exit_max_loss_db != exit_max_loss_db:
        raise TypeError(f"lowbit_engine.load: exit_max_loss_db must be a number of dB, got {exit_max_loss_db!r}")

    if fused_blocks is not None and not isinstance(fused_blocks, bool):
        raise TypeError(f"lowbit_engine.load: fused_blocks must be True, False or None, got "
                        f"{type(fused_blocks).__name__}")
    if fused_blocks and not fused.supported(transformer):
        raise ValueError(f"lowbit_engine.load: fused_blocks=True, but {type(transformer).__name__} has no blocks "
                         f"with a fused forward (they exist for {fused.ARCHITECTURES}); pass None or False")


def _install_fused(obj: Any, transformer: nn.Module, report: LoadReport, fused_blocks: bool | None, *, calib: Any,
                   calib_steps: int, calib_kwargs: dict[str, Any] | None, max_loss_db: float) -> None:
    """Step 5: the fused block forwards, and with ``calib`` the static exit scales (inside load's transaction)."""
    from . import fused
    from .fused_blocks import calibrate_exit_scales

    if fused_blocks is False:
        report.fused_note = "fused_blocks=False" if fused.supported(transformer) else ""
        return
    if not fused.supported(transformer):
        return  # another architecture: the unfused path, nothing to say
    if fused_blocks is None and not fused.wanted(transformer):
        report.fused_note = "no 8-bit-token layers to fuse (svdq-w4a8 has them)"
        return
    report.fused_blocks = fused.install(transformer)
    report.fused_note = "entry quantizers fused into the adaLN norms"
    if calib is not None:
        try:
            exits = calibrate_exit_scales(transformer, lambda: _run_calibration(obj, transformer, calib, calib_steps,
                                                                                calib_kwargs or {}),
                                           max_loss_db=float(max_loss_db))
        except CalibrationError as e:
            raise CalibrationError(f"{e} (calibrating the exit scales of the fused blocks)") from e.__cause__
        report.exit_scales = (sum(1 for r in exits.values() if r["used"]), len(exits), float(max_loss_db))


def _check_load_args(fmt: str, *, rank: Any, skip: Any, checkpoint: Any, calib_steps: Any, calib_kwargs: Any,
                     max_calib_tokens: Any, quant_opts: Any) -> None:
    """Every argument of :func:`load` that can be checked without running anything, checked up front."""
    def count(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"lowbit_engine.load: {name} must be an int >= {low}, got {type(value).__name__} "
                            f"({value!r})")
        if value < low:
            raise ValueError(f"lowbit_engine.load: {name} must be an int >= {low}, got {value}")

    count("rank", rank, 0)
    count("calib_steps", calib_steps, 1)
    count("max_calib_tokens", max_calib_tokens, 1)
    compile_skips(skip)
    if calib_kwargs is not None and not isinstance(calib_kwargs, dict):
        raise TypeError(f"lowbit_engine.load: calib_kwargs must be a dict or None, got {type(calib_kwargs).__name__}")
    if quant_opts is not None:
        if checkpoint is not None and quant_opts:
            raise ValueError("lowbit_engine.load: quant_opts has no effect with checkpoint= (the checkpoint "
                             "holds the quantized layers); drop one of them")
        check_options(fmt, quant_opts, who="lowbit_engine.load: quant_opts")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"lowbit_engine.load: checkpoint must be a path, got {type(checkpoint).__name__}")
        if not Path(checkpoint).exists():  # a file, or a lowbit (pipeline) folder
            raise CheckpointError(f"{checkpoint}: no such file or folder (lowbit-engine reads local paths only)")


def _quantize(obj: Any, transformer: nn.Module, policy: Policy, report: LoadReport, *, rank: int, calib: Any,
              skip: Sequence[str] | dict[str, str] | None, calib_steps: int, calib_kwargs: dict[str, Any] | None, fuse: bool,
              max_tokens: int, quant_opts: dict[str, Any], progress: bool) -> None:
    if fuse and policy.fuse_qkv:
        report.qkv_fused, report.qkv_note, report.removed = fuse_qkv(transformer)
    elif not fuse:
        report.qkv_note = "fuse_qkv_projections=False"
    else:
        report.qkv_note = f"not enabled in the {policy.name} policy"

    plan = plan_layers(transformer, policy, skip)
    todo = [n for n, r in plan.items() if r.action != KEEP]
    fmts = {n: plan[n].format_for(report.fmt) for n in todo}
    calibrated = [n for n in todo if fmts[n] not in _POLICY_FORMATS]  # weight-only layers need no tokens
    report.kept = _kept_by_reason(plan)

    acts: dict[str, Tensor] = {}
    if calib is not None:
        acts, report.calib_runs = collect_activations(obj, transformer, calibrated, calib, calib_steps=calib_steps,
                                                      calib_kwargs=calib_kwargs, max_tokens=max_tokens)
        report.source = "calibrated"
    report.uncalibrated = [n for n in calibrated if n not in acts]

    with warnings.catch_warnings():
        # One summary warning below rather than one per layer.
        warnings.simplefilter("ignore", NoCalibrationWarning)
        for name in _timed(todo, progress, "lowbit-engine: quantizing", report):
            layer = transformer.get_submodule(name)
            # A layer narrower than the rank (only in small or generic models) gets the largest rank it has.
            r = min(rank, layer.in_features, layer.out_features)
            opts = quant_opts if fmts[name] == report.fmt else {}  # quant_opts are the load format's options
            q = quantize_linear(layer, fmts[name], calib=acts.pop(name, None), rank=r, **opts)
            q.train(layer.training)
            _set_submodule(transformer, name, q)
            report.quantized.setdefault(fmts[name], []).append(name)
    if report.uncalibrated:
        warnings.warn(f"lowbit_engine.load: {len(report.uncalibrated)} of {len(calibrated)} layers were quantized "
                      "without calibration tokens (no smoothing); pass calib= for W4A4 quality",
                      NoCalibrationWarning, stacklevel=3)


__all__ = ["load", "save", "LoadReport", "last_report", "resolve_transformer", "model_nbytes", "fuse_qkv",
           "collect_activations", "plan_layers", "sidecar_path"]
