"""The fused entry-linear op ``lowbit::norm_modulate_quantize`` (lowbit_engine.ops_fused): the Triton kernel
under the interpreter, the C++ reference and the op, against lowbit_engine.reference.norm_modulate_quantize.

What is exact and what is not: y = round16(LayerNorm(x) * (1 + scale) + shift) rests on floating-point row
statistics whose order is free, so a backend's y may differ from the reference's by one ulp on a few
elements (measured: about 1e-4 of them); given its own y, q and the scales must be exactly what
quantize_act makes of it, and lora_act within 1e-5 (fp32, order free). The kernel's y is returned for that
check (``return_y``).
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops, ops_fused, reference
from lowbit_engine._build_info import native
from lowbit_engine.errors import OpInputError
from triton_interp import load_interpreted

BF, FP16 = torch.bfloat16, torch.float16
Y_MISMATCH_LIMIT = 2e-3  # fraction of elements of y allowed one ulp off the reference


def _inputs(gen, B, T, K, R, dtype=BF):
    x = (torch.randn(B * T, K, generator=gen) * 3 + 2).to(dtype)
    x[:, 7] *= 30  # an outlier channel, as DiT activations have
    shift = (torch.randn(B, K, generator=gen) * 0.5).to(dtype)
    scale = (torch.randn(B, K, generator=gen) * 0.5).to(dtype)
    smooth = torch.rand(K, generator=gen) + 0.5
    lora_down = (torch.randn(R, K, generator=gen) * 0.1).to(dtype) if R else None
    return x, shift, scale, smooth, lora_down


def _ulp_close(y, yr) -> None:
    off = y.float() != yr.float()
    assert off.float().mean().item() < Y_MISMATCH_LIMIT, off.float().mean().item()
    eps = 2.0**-7 if y.dtype == BF else 2.0**-10
    assert ((y.float() - yr.float()).abs() <= eps * yr.float().abs() + 1e-6).all()


def _consistent(q, s, la, y, smooth, lora_down, mode) -> None:
    q2, s2, la2 = reference.quantize_act(y, smooth=smooth, lora_down=lora_down, mode=mode)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    if lora_down is not None:
        assert ((la - la2).norm() / la2.norm()).item() < 1e-5


@pytest.fixture(scope="module")
def q8():
    mod = load_interpreted("quant8.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    return mod


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("B, T, K, R", [(1, 1, 64, 0), (1, 17, 192, 16), (3, 37, 320, 32), (2, 111, 128, 8)])
@pytest.mark.parametrize("dtype", [BF, FP16])
def test_kernel_matches_the_reference(q8, gen, mode, B, T, K, R, dtype):
    x, shift, scale, smooth, ld = _inputs(gen, B, T, K, R, dtype)
    q, s, la, y = q8.norm_modulate_quantize_triton(x, shift, scale, 1e-6, smooth, ld, mode, tokens_per_sample=T,
                                                   return_y=True)
    _, _, _, yr = reference.norm_modulate_quantize(x, shift, scale, 1e-6, smooth, ld, mode, T)
    _ulp_close(y, yr)
    _consistent(q, s, la, y, smooth, ld, mode)
    assert la.shape == (B * T, R)


def test_kernel_without_smoothing_and_a_nan_row(q8, gen):
    x, shift, scale, _, ld = _inputs(gen, 2, 9, 128, 16)
    x[4, 3] = float("nan")
    q, s, la, y = q8.norm_modulate_quantize_triton(x, shift, scale, 1e-6, None, ld, "int8", tokens_per_sample=9,
                                                   return_y=True)
    assert torch.isnan(s[4]) and (q[4] == 0).all()  # a non-finite row: NaN scale, q = 0 (docs/formats.md)
    keep = torch.arange(18) != 4
    _consistent(q[keep], s[keep], la[keep], y[keep], None, ld, "int8")


@pytest.mark.skipif(native() is None, reason="needs lowbit_engine._C")
@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_cpu_reference_and_the_op(gen, mode):
    x, shift, scale, smooth, ld = _inputs(gen, 2, 23, 256, 16)
    with ops.record_backends() as used:
        q, s, la = ops_fused.norm_modulate_quantize(x, shift, scale, 1e-6, smooth, ld, mode, tokens_per_sample=23)
    assert used == {"norm_modulate_quantize": {"cpu"}}
    qr, sr, lar, yr = reference.norm_modulate_quantize(x, shift, scale, 1e-6, smooth, ld, mode, 23)
    # the C++ statistics run in double: y comes out as the reference's on nearly every element
    assert (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item() < Y_MISMATCH_LIMIT
    assert ((la - lar).norm() / lar.norm()).item() < 1e-3
    with ops.use_backend("torch", op="norm_modulate_quantize"):
        qt, st, lat = ops_fused.norm_modulate_quantize(x, shift, scale, 1e-6, smooth, ld, mode, tokens_per_sample=23)
    assert torch.equal(qt.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(st, sr)


def test_matches_diffusers_style_unfused_math_within_bf16(gen):
    """The unfused path (diffusers: LayerNorm in x's dtype, then ``* (1 + scale) + shift`` in bf16) rounds
    three more times; the fused y is within those roundings of it."""
    x, shift, scale, _, _ = _inputs(gen, 2, 16, 128, 0)
    unfused = torch.nn.functional.layer_norm(x, (128,), eps=1e-6) * (1 + scale.repeat_interleave(16, 0)) \
        + shift.repeat_interleave(16, 0)
    _, _, _, y = reference.norm_modulate_quantize(x, shift, scale, 1e-6, None, None, "int8", 16)
    rel = ((y.float() - unfused.float()).norm() / unfused.float().norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize("change, match", [
    (dict(tokens_per_sample=7), "tokens_per_sample"),
    (dict(shift="wrong-batch"), "shift"),
    (dict(mode="int3"), "mode"),
    (dict(eps=0.0), "eps"),
    (dict(lora_down="wrong-dtype"), "lora_down"),
])
def test_bad_arguments(gen, change, match):
    x, shift, scale, smooth, ld = _inputs(gen, 2, 8, 128, 8)
    kw = dict(eps=1e-6, smooth=smooth, lora_down=ld, mode="int8", tokens_per_sample=8)
    if change.get("shift") == "wrong-batch":
        change = dict(change, shift=shift[:1].contiguous())
    if change.get("lora_down") == "wrong-dtype":
        change = dict(change, lora_down=ld.float())
    kw |= change
    sh = kw.pop("shift", shift)
    with pytest.raises(OpInputError, match=match):
        ops_fused.norm_modulate_quantize(x, sh, scale, **kw)


def test_compiles_without_graph_breaks(gen):
    x, shift, scale, smooth, ld = _inputs(gen, 2, 8, 128, 8)
    fn = torch.compile(lambda *a: ops_fused.norm_modulate_quantize(*a, mode="int8", tokens_per_sample=8),
                       fullgraph=True, backend="eager")
    got = fn(x, shift, scale, 1e-6, smooth, ld)
    want = ops_fused.norm_modulate_quantize(x, shift, scale, 1e-6, smooth, ld, "int8", 8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
