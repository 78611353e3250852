"""The exit epilogue of the 8-bit GEMM (kernels/gemm8.py ``gemm8_exit_triton``), under the Triton interpreter.

The fused path must equal the unfused one: the plain GEMM's 16-bit output ``h``, then
``reference.exit_activation`` and ``reference.quantize_act_static`` (docs/formats.md, "Exit quantizer"). The
kernel and the reference compute GELU with the same formula, but exp may differ by an fp32 ulp between the
interpreter (numpy) and torch, which changes the 16-bit h of a rare element by one ulp and its code by at
most one step: the tests allow that on at most 0.5% of the codes and require everything else bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import reference
from triton_interp import load_interpreted

pytest.importorskip("triton")

BF = torch.bfloat16
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def g8():
    mod = load_interpreted("gemm8.py")
    mod._tiles = load_interpreted("fp8_gemm.py")
    mod._q = load_interpreted("quant8.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    return mod


def _operands(gen, M, N, K, R, int8: bool):
    if int8:
        a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        sa, sw = torch.rand(M, generator=gen) * 1e-3 + 1e-4, torch.rand(N, generator=gen) * 1e-3 + 1e-4
    else:
        a = (torch.randn(M, K, generator=gen) * 40).clamp(-448, 448).to(E4M3)
        w = (torch.randn(N, K, generator=gen) * 40).clamp(-448, 448).to(E4M3)
        sa, sw = torch.rand(M, generator=gen) * 2e-3 + 1e-4, torch.rand(N, generator=gen) * 2e-3 + 1e-4
    la = torch.randn(M, R, generator=gen) if R else None
    lu = (torch.randn(N, R, generator=gen) * 0.1).to(BF) if R else None
    bias = torch.randn(N, generator=gen).to(BF)
    return a, sa, w, sw, la, lu, bias


def _unfused(g8, *args):
    """The unfused producer's bf16 output. Taken in fp32 and rounded by torch (RNE): the interpreter's own
    fp32 -> bf16 store truncates, which a compiled kernel does not (the exit epilogue rounds on the bits)."""
    return g8.gemm8_triton(*args, torch.float32).to(BF)


def _codes_match(q, qr, mode):
    """Bit-exact except for at most 0.5% of the codes, each at most one step off (see the module doc)."""
    if mode == "int8":
        d = (q.view(torch.int8).int() - qr.view(torch.int8).int()).abs()
        assert int(d.max()) <= 1
    else:
        d = (q.view(torch.uint8).int() - qr.view(torch.uint8).int()).abs()
        d = torch.where(d > 1, (q.float() - qr.float()).abs() / qr.float().abs().clamp_min(1e-30) > 0.15, d.bool())
    frac = d.bool().float().mean().item()
    assert frac <= 5e-3, f"{frac:.3%} of the codes differ"


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "none"])
@pytest.mark.parametrize("M, N, K, R, R2", [(1, 48, 64, 0, 8), (17, 80, 128, 16, 8), (111, 96, 192, 8, 24)])
def test_exit_epilogue_equals_the_unfused_path(g8, gen, mode, activation, M, N, K, R, R2):
    int8_in = mode == "int8"  # the producer's tokens; either kind feeds either next mode
    a, sa, w, sw, la, lu, bias = _operands(gen, M, N, K, R, int8_in)
    h = _unfused(g8, a, sa, w, sw, la, lu, bias)
    act = reference.exit_activation(h, activation)
    smooth = torch.rand(N, generator=gen) + 0.5
    ld2 = (torch.randn(R2, N, generator=gen) * 0.1).to(BF)
    qmax = 127.0 if mode == "int8" else 448.0
    scale = float((act.float() / smooth).abs().amax()) / qmax * 0.7  # 0.7: the largest values saturate
    qr, sr, lar = reference.quantize_act_static(act, scale, smooth, ld2, mode)

    q, s, lq = g8.gemm8_exit_triton(a, sa, w, sw, la, lu, bias, BF, activation=activation, next_scale=scale,
                                    next_mode=mode, next_smooth=smooth, next_lora_down=ld2)
    assert q.dtype == qr.dtype and q.shape == (M, N)
    _codes_match(q, qr, mode)
    assert torch.equal(s, sr)
    rel = ((lq.double() - lar.double()).norm() / lar.double().norm()).item()
    assert rel < 1e-5, rel  # fp32 atomics in a free order (measured ~1e-7)


def test_exit_fills_columns_of_a_wider_input(g8, gen):
    """Two producers fill one concatenated next input (FLUX's single block: attention | MLP)."""
    M, K, R2 = 17, 64, 8
    parts = [_operands(gen, M, N, K, 0, False) for N in (32, 48)]
    width = 32 + 48
    smooth = torch.rand(width, generator=gen) + 0.5
    ld2 = (torch.randn(R2, width, generator=gen) * 0.1).to(BF)
    scale = 0.05
    q = torch.full((M, width), 0x5A, dtype=torch.uint8).view(E4M3)  # poisoned
    s = torch.full((M,), scale)
    lo = torch.zeros(M, R2)
    hs = []
    for (a, sa, w, sw, la, lu, bias), col in zip(parts, (0, 32)):
        g8.gemm8_exit_triton(a, sa, w, sw, la, lu, bias, BF, activation="gelu_tanh", next_scale=scale,
                             next_mode="fp8", next_smooth=smooth, next_lora_down=ld2, q_out=q, scales_out=s,
                             lora_out=lo, col=col)
        hs.append(reference.exit_activation(_unfused(g8, a, sa, w, sw, la, lu, bias), "gelu_tanh"))
    qr, sr, lar = reference.quantize_act_static(torch.cat(hs, dim=1), scale, smooth, ld2, "fp8")
    _codes_match(q, qr, "fp8")
    assert torch.equal(s, sr)
    assert ((lo - lar).norm() / lar.norm()).item() < 1e-5


def test_non_finite_rows_get_a_nan_scale(g8, gen):
    M, N, K = 9, 48, 64
    a, sa, w, sw, _, _, bias = _operands(gen, M, N, K, 0, True)
    sa[3] = float("inf")  # row 3's GEMM output is +-inf / NaN
    q, s, _ = g8.gemm8_exit_triton(a, sa, w, sw, None, None, bias, BF, activation="none", next_scale=0.1,
                                   next_mode="int8")
    h = _unfused(g8, a, sa, w, sw, None, None, bias)
    qr, sr, _ = reference.quantize_act_static(h, 0.1, mode="int8")
    assert torch.isnan(s[3]) and torch.isnan(sr[3])
    assert torch.equal(torch.isnan(s), torch.isnan(sr)) and torch.equal(s[~torch.isnan(s)], sr[~torch.isnan(sr)])
    assert torch.equal(q, qr)


@pytest.mark.parametrize("bad, match", [
    (dict(activation="relu"), "activation"),
    (dict(next_mode="int4"), "next_mode"),
    (dict(next_scale=0.0), "next_scale"),
    (dict(next_scale=float("nan")), "next_scale"),
    (dict(next_smooth=torch.ones(7)), "next_smooth"),
    (dict(next_lora_down=torch.ones(4, 7, dtype=BF)), "next_lora_down"),
    (dict(q_out=torch.empty(3, 48, dtype=torch.int8)), "q_out"),
    (dict(q_out=torch.empty(5, 48, dtype=torch.int8), col=8), "q_out"),
])
def test_exit_rejects_bad_arguments(g8, gen, bad, match):
    a, sa, w, sw, _, _, _ = _operands(gen, 5, 48, 64, 0, True)
    kw = dict(activation="gelu_tanh", next_scale=0.1, next_mode="int8") | bad
    with pytest.raises(ValueError, match=match):
        g8.gemm8_exit_triton(a, sa, w, sw, None, None, None, BF, **kw)


# ------------------------------------------------------------------------------------------------ the ops


def _layer(gen, fmt, N, K):
    from lowbit_engine.formats import f8l, i8q
    w = torch.randn(N, K, generator=gen)
    if fmt == "f8l":
        codes, gs, row = f8l.quantize(w)
        return f8l.pack(codes), gs, None, row
    codes, st, z, row = i8q.quantize(w)
    return i8q.pack(codes), st, z, row


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("next_mode", ["int8", "fp8"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "none"])
def test_exit_op_cpu_backend_equals_the_reference(gen, fmt, next_mode, activation):
    """The C++ backend (csrc/cpu/exit_quant.cpp after the C++ GEMM) against the torch reference, M = 17."""
    from lowbit_engine import ops, ops_exit

    M, N, K, R, R2 = 17, 96, 128, 8, 16
    w, s1, s2, row = _layer(gen, fmt, N, K)
    x = torch.randn(M, K, generator=gen).to(BF)
    tok = "fp8" if fmt == "f8l" else "int8"
    qa, sa, _ = ops.quantize_act(x, mode=tok)
    la, lu = torch.randn(M, R, generator=gen), (torch.randn(N, R, generator=gen) * 0.1).to(BF)
    bias = torch.randn(N, generator=gen).to(BF)
    smooth = torch.rand(N, generator=gen) + 0.5
    ld2 = (torch.randn(R2, N, generator=gen) * 0.1).to(BF)
    args = (fmt, qa, sa, w, s1, s2, row, la, lu, bias)
    kw = dict(activation=activation, next_scale=0.02, next_smooth=smooth, next_lora_down=ld2, next_mode=next_mode)
    with ops.use_backend("torch", op="gemm_w4a8_exit"):
        qr, sr, lr = ops_exit.gemm_w4a8_exit(*args, **kw)
    with ops.record_backends() as used:
        q, s, lq = ops_exit.gemm_w4a8_exit(*args, **kw)
    assert used["gemm_w4a8_exit"] == {"cpu"}
    _codes_match(q, qr, next_mode)
    assert torch.equal(s, sr)
    assert ((lq - lr).norm() / lr.norm()).item() < 1e-5


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_static_quantizer_cpu_equals_the_reference(gen, mode):
    from lowbit_engine import ops, ops_exit

    x = (torch.randn(33, 192, generator=gen) * 3).to(BF)
    x[5, 7] = float("nan")
    x[9, 0] = float("-inf")
    smooth = torch.rand(192, generator=gen) + 0.5
    ld = (torch.randn(8, 192, generator=gen) * 0.1).to(BF)
    with ops.record_backends() as used:
        q, s, la = ops_exit.quantize_act_static(x, 0.01, smooth, ld, mode)  # 0.01: many values saturate
    assert used["quantize_act_static"] == {"cpu"}
    qr, sr, lr = reference.quantize_act_static(x, 0.01, smooth, ld, mode)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(torch.isnan(s), torch.isnan(sr)) and torch.isnan(s[5]) and torch.isnan(s[9])
    assert torch.equal(s[~torch.isnan(s)], sr[~torch.isnan(sr)])
    ok = torch.isfinite(lr).all(dim=1)
    assert ((la[ok] - lr[ok]).norm() / lr[ok].norm()).item() < 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(mode="int4"), "mode"),
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(smooth=torch.ones(3)), "smooth"),
    (dict(lora_down=torch.ones(2, 64)), "lora_down"),  # fp32, x is bf16
])
def test_static_quantizer_rejects_bad_arguments(bad, match):
    from lowbit_engine import ops_exit
    from lowbit_engine.errors import OpInputError

    kw = dict(scale=0.1, smooth=None, lora_down=None, mode="fp8") | bad
    with pytest.raises(OpInputError, match=match):
        ops_exit.quantize_act_static(torch.ones(4, 64, dtype=BF), **kw)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M, K, R", [(1, 64, 0), (17, 192, 16), (40, 320, 8)])
def test_static_quantizer_triton_is_bit_exact(gen, mode, M, K, R):
    """kernels/quant8.py with STATIC: the reference's codes and scales bit for bit, non-finite rows included."""
    q8 = load_interpreted("quant8.py")
    x = (torch.randn(M, K, generator=gen) * 3).to(BF)
    if M > 5:
        x[3, 5] = float("nan")
        x[M - 1] = 0.0
    sm = torch.rand(K, generator=gen) + 0.5
    ld = (torch.randn(R, K, generator=gen) * 0.1).to(BF) if R else None
    poison = (torch.full((M, K), 0x5A, dtype=torch.uint8).view(E4M3 if mode == "fp8" else torch.int8),
              torch.full((M,), -1.0), torch.full((M, R), float("nan")))
    q, s, la = q8.quantize_8bit_triton(x, sm, ld, mode, out=poison, static_scale=0.01)
    qr, sr, lr = reference.quantize_act_static(x, 0.01, sm, ld, mode)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(torch.isnan(s), torch.isnan(sr)) and torch.equal(s[~torch.isnan(s)], sr[~torch.isnan(sr)])
    if R:
        ok = torch.isfinite(lr).all(dim=1)
        assert ((la[ok] - lr[ok]).norm() / lr[ok].norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------------ row-strided lora_down


def _in_wider(t: torch.Tensor, gen, left: int = 24, right: int = 40) -> torch.Tensor:
    """``t [R, K]`` as the column slice ``[:, left : left + K]`` of a wider random matrix (a row-strided view:
    the next layer's lora-down read in place, fused_blocks' single block)."""
    R, K = t.shape
    wide = torch.randn(R, left + K + right, generator=gen).to(t.dtype)
    wide[:, left:left + K] = t
    view = wide[:, left:left + K]
    assert not view.is_contiguous() and view.stride() == (left + K + right, 1)
    return view


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M, N, K, R2", [(1, 48, 64, 8), (17, 80, 128, 24), (111, 96, 64, 16)])
def test_exit_epilogue_reads_a_sliced_next_lora_down(g8, gen, mode, M, N, K, R2):
    """next_lora_down as a column slice of a wider matrix, read in place: the same codes, scales and lora_act
    as with the contiguous copy (and the reference), into poisoned outputs."""
    a, sa, w, sw, la, lu, bias = _operands(gen, M, N, K, 8, mode == "int8")
    smooth = torch.rand(N, generator=gen) + 0.5
    ld2 = (torch.randn(R2, N, generator=gen) * 0.1).to(BF)
    view = _in_wider(ld2, gen)
    scale = 0.05
    outs = []
    for lora_down in (ld2, view):
        poison = torch.full((M, N), 0x5A, dtype=torch.uint8).view(E4M3 if mode == "fp8" else torch.int8)
        outs.append(g8.gemm8_exit_triton(a, sa, w, sw, la, lu, bias, BF, activation="gelu_tanh", next_scale=scale,
                                         next_mode=mode, next_smooth=smooth, next_lora_down=lora_down, q_out=poison))
    (qc, sc, lc), (qv, sv, lv) = outs
    assert torch.equal(qv.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sv, sc)
    assert ((lv - lc).norm() / lc.norm()).item() < 1e-6  # the atomics' order only
    h = reference.exit_activation(_unfused(g8, a, sa, w, sw, la, lu, bias), "gelu_tanh")
    qr, sr, lr = reference.quantize_act_static(h, scale, smooth, ld2, mode)
    _codes_match(qv, qr, mode)
    assert torch.equal(sv, sr) and ((lv - lr).norm() / lr.norm()).item() < 1e-5


def test_exit_columns_of_a_wider_input_with_a_sliced_lora_down(g8, gen):
    """col > 0 into a wider q_out while next_lora_down is itself a slice of an even wider matrix (row stride
    != LDQ): the column offset and the row stride are independent."""
    M, K, R2, width, col = 17, 64, 8, 80, 32
    a, sa, w, sw, la, lu, bias = _operands(gen, M, width - col, K, 0, False)
    smooth = torch.rand(width, generator=gen) + 0.5
    ld2 = (torch.randn(R2, width, generator=gen) * 0.1).to(BF)
    q = torch.full((M, width), 0x5A, dtype=torch.uint8).view(E4M3)
    s, lo = torch.full((M,), 0.05), torch.zeros(M, R2)
    g8.gemm8_exit_triton(a, sa, w, sw, la, lu, bias, BF, activation="gelu_tanh", next_scale=0.05, next_mode="fp8",
                         next_smooth=smooth, next_lora_down=_in_wider(ld2, gen, 16, 8), q_out=q, scales_out=s,
                         lora_out=lo, col=col)
    h = reference.exit_activation(_unfused(g8, a, sa, w, sw, la, lu, bias), "gelu_tanh")
    qr, sr, lr = reference.quantize_act_static(h, 0.05, smooth[col:], ld2[:, col:], "fp8")
    _codes_match(q[:, col:], qr, "fp8")
    assert torch.equal(q.view(torch.uint8)[:, :col], torch.full((M, col), 0x5A, dtype=torch.uint8))  # untouched
    assert torch.equal(s, sr) and ((lo - lr).norm() / lr.norm()).item() < 1e-5


@pytest.mark.parametrize("bad", ["column stride", "overlapping rows", "transposed"])
def test_exit_rejects_a_lora_down_that_is_not_row_strided(g8, gen, bad):
    a, sa, w, sw, _, _, _ = _operands(gen, 5, 48, 64, 0, True)
    ld = {"column stride": torch.ones(4, 96, dtype=BF)[:, ::2],
          "overlapping rows": torch.ones(4 * 48, dtype=BF).as_strided((4, 48), (24, 1)),
          "transposed": torch.ones(48, 4, dtype=BF).t()}[bad]
    with pytest.raises(ValueError, match="next_lora_down"):
        g8.gemm8_exit_triton(a, sa, w, sw, None, None, None, BF, activation="none", next_scale=0.1, next_mode="int8",
                             next_lora_down=ld)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M, K, R", [(1, 64, 8), (17, 192, 16), (111, 320, 24)])
def test_static_quantizer_triton_reads_a_sliced_lora_down(gen, mode, M, K, R):
    q8 = load_interpreted("quant8.py")
    x = (torch.randn(M, K, generator=gen) * 3).to(BF)
    sm = torch.rand(K, generator=gen) + 0.5
    ld = (torch.randn(R, K, generator=gen) * 0.1).to(BF)
    poison = (torch.full((M, K), 0x5A, dtype=torch.uint8).view(E4M3 if mode == "fp8" else torch.int8),
              torch.full((M,), -1.0), torch.full((M, R), float("nan")))
    q, s, la = q8.quantize_8bit_triton(x, sm, _in_wider(ld, gen), mode, out=poison, static_scale=0.01)
    qr, sr, lr = reference.quantize_act_static(x, 0.01, sm, ld, mode)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    assert ((la - lr).norm() / lr.norm()).item() < 1e-5
    qc, sc, lc = q8.quantize_8bit_triton(x, sm, ld, mode, static_scale=0.01)
    assert torch.equal(la, lc)  # the same sums in the same order as the contiguous lora_down


@pytest.mark.parametrize("M", [1, 17, 111])
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_static_quantizer_op_reads_a_sliced_lora_down(gen, M, mode):
    """lowbit::quantize_act_static with lora_down (and smooth) sliced out of a wider layer's, on the C++ and the
    torch backends: bit-equal to the contiguous copies."""
    from lowbit_engine import ops, ops_exit

    K, R = 128, 16
    x = (torch.randn(M, K, generator=gen) * 3).to(BF)
    smooth_wide = torch.rand(K + 64, generator=gen) + 0.5
    ld = (torch.randn(R, K, generator=gen) * 0.1).to(BF)
    view = _in_wider(ld, gen, 64, 0)
    for backend in ("cpu", "torch"):
        with ops.use_backend(backend, op="quantize_act_static"), ops.record_backends() as used:
            qv, sv, lv = ops_exit.quantize_act_static(x, 0.01, smooth_wide[64:], view, mode)
            qc, sc, lc = ops_exit.quantize_act_static(x, 0.01, smooth_wide[64:].clone(), ld, mode)
        assert used["quantize_act_static"] == {backend}
        assert torch.equal(qv.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sv, sc)
        assert torch.equal(lv, lc), backend
    qr, _, lr = reference.quantize_act_static(x, 0.01, smooth_wide[64:], ld, mode)
    assert torch.equal(qv.view(torch.uint8), qr.view(torch.uint8))
    assert ((lv - lr).norm() / lr.norm()).item() < 1e-5


@pytest.mark.parametrize("M", [1, 17, 111])
@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
def test_exit_op_reads_a_sliced_next_lora_down(gen, M, fmt):
    """lowbit::gemm_w4a8_exit with the next layer's lora-down as a column slice (the FLUX single block's
    proj_out), on the C++ and the torch backends: bit-equal to the contiguous copy, and to the reference."""
    from lowbit_engine import ops, ops_exit

    N, K, R2 = 96, 128, 16
    w, s1, s2, row = _layer(gen, fmt, N, K)
    qa, sa, _ = ops.quantize_act(torch.randn(M, K, generator=gen).to(BF), mode="fp8" if fmt == "f8l" else "int8")
    smooth = torch.rand(N + 32, generator=gen) + 0.5
    ld2 = (torch.randn(R2, N, generator=gen) * 0.1).to(BF)
    view = _in_wider(ld2, gen, 32, 0)
    args = (fmt, qa, sa, w, s1, s2, row)
    kw = dict(activation="gelu_tanh", next_scale=0.02, next_smooth=smooth[32:], next_mode="fp8")
    got = {}
    for backend in ("cpu", "torch"):
        with ops.use_backend(backend, op="gemm_w4a8_exit"), ops.record_backends() as used:
            qv, sv, lv = ops_exit.gemm_w4a8_exit(*args, **kw, next_lora_down=view)
            qc, sc, lc = ops_exit.gemm_w4a8_exit(*args, **kw, next_lora_down=ld2)
        assert used["gemm_w4a8_exit"] == {backend}
        assert torch.equal(qv.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sv, sc)
        assert torch.equal(lv, lc), backend
        got[backend] = (qv, sv, lv)
    (qv, sv, lv), (qr, sr, lr) = got["cpu"], got["torch"]
    _codes_match(qv, qr, "fp8")
    assert torch.equal(sv, sr) and ((lv - lr).norm() / lr.norm()).item() < 1e-5
