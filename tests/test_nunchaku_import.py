"""Importing Nunchaku SVDQuant int4 checkpoints (lowbit_engine.integrations.nunchaku).

The synthetic checkpoint is quantized here, independently of the importer (amax / 7 per 64, bf16 scales),
packed with the forward packer into Nunchaku's order and names, loaded into a tiny FLUX; every imported
layer must hold exactly those codes and match a float64 reference built from them.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit_engine import reference
from lowbit_engine.errors import CheckpointError
from lowbit_engine.formats import int4
from lowbit_engine.integrations import load_nunchaku
from lowbit_engine.integrations import nunchaku_packing as P
from lowbit_engine.integrations.nunchaku import GELU_SHIFT
from lowbit_engine.nn import SVDQLinear

BF = torch.bfloat16
RANK = 16
# (Nunchaku name, K, N) of the tiny FLUX (inner 128, MLP 512)
DOUBLE = [("qkv_proj", 128, 384), ("qkv_proj_context", 128, 384), ("out_proj", 128, 128),
          ("out_proj_context", 128, 128), ("mlp_fc1", 128, 512), ("mlp_fc2", 512, 128),
          ("mlp_context_fc1", 128, 512), ("mlp_context_fc2", 512, 128)]
SINGLE = [("qkv_proj", 128, 384), ("mlp_fc1", 128, 512), ("out_proj", 128, 128), ("mlp_fc2", 512, 128)]
TARGET = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.to_added_qkv", "out_proj": "attn.to_out.0",
          "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
          "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2"}


def _quantized_linear(g: torch.Generator, K: int, N: int) -> dict[str, torch.Tensor]:
    """An independent int4 g64 quantization of a random weight, plus random smoothing, low-rank and bias."""
    w = torch.randn(N, K, generator=g)
    scales = (w.reshape(N, K // 64, 64).abs().amax(-1) / 7).to(BF)
    codes = torch.round(w.reshape(N, K // 64, 64) / scales.float()[..., None]).clamp(-8, 7)
    return {"codes": codes.reshape(N, K).to(torch.int8), "scales": scales,
            "smooth": torch.exp(0.3 * torch.randn(K, generator=g)).to(BF),
            "lora_down": (0.1 * torch.randn(RANK, K, generator=g)).to(BF),
            "lora_up": (0.1 * torch.randn(N, RANK, generator=g)).to(BF),
            "bias": (0.1 * torch.randn(N, generator=g)).to(BF)}


def _wq(lin: dict[str, torch.Tensor]) -> torch.Tensor:
    N, K = lin["codes"].shape
    return (lin["codes"].double().reshape(N, K // 64, 64) * lin["scales"].double()[..., None]).reshape(N, K)


def _bias(lin: dict[str, torch.Tensor], shifted: bool) -> torch.Tensor:
    """The file's bias, plus, for an fc2, what Nunchaku's shifted residual input adds: shift * W @ (1 / smooth)."""
    b = lin["bias"].double()
    return b + GELU_SHIFT * (_wq(lin) @ (1 / lin["smooth"].double())) if shifted else b


def _spell(parts: dict[str, torch.Tensor], diffusers_style: bool) -> dict[str, torch.Tensor]:
    packed = P.pack_linear(parts["codes"], parts["scales"], parts["smooth"], parts["lora_down"], parts["lora_up"],
                           parts["bias"])
    if diffusers_style:  # the spellings of deepcompressor's converter / nunchaku's python modules
        packed = {{"smooth": "smooth_factor", "lora_down": "proj_down", "lora_up": "proj_up"}.get(k, k): v
                  for k, v in packed.items()}
        packed["smooth_factor_orig"] = packed["smooth_factor"].clone()
    return packed


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    import diffusers

    torch.manual_seed(0)
    # the tiny FLUX of lowbit_engine.integrations.tiny, without the pipeline (whose import costs seconds)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128,
        axes_dims_rope=[4, 14, 14]).to(BF).eval()
    g = torch.Generator().manual_seed(7)
    emb = {"prompt_embeds": torch.randn(1, 16, 128, generator=g).to(BF),
           "pooled_prompt_embeds": torch.randn(1, 128, generator=g).to(BF)}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for head, table, style in (("transformer_blocks.0", DOUBLE, False), ("single_transformer_blocks.0", SINGLE, True)):
        for name, K, N in table:
            parts[f"{head}.{name}"] = lin = _quantized_linear(g, K, N)
            tensors.update({f"{head}.{name}.{k}": v for k, v in _spell(lin, style).items()})
        norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k") if style is False else ("norm_q", "norm_k")
        for norm in norms:
            tensors[f"{head}.{norm}.weight"] = (1 + 0.1 * torch.randn(32, generator=g)).to(BF)
    tensors["transformer_blocks.0.qkv_proj.smooth_orig"] = torch.ones(128, dtype=BF)
    for awq in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                "single_transformer_blocks.0.norm.linear"):  # W4A16 AWQ: recognised, not imported
        tensors[f"{awq}.qweight"] = torch.randint(-2**31, 2**31 - 1, (192, 64), generator=g, dtype=torch.int32)
        tensors[f"{awq}.wscales"] = torch.rand(2, 768, generator=g).to(BF)
        tensors[f"{awq}.wzeros"] = torch.rand(2, 768, generator=g).to(BF)
        tensors[f"{awq}.bias"] = torch.rand(768, generator=g).to(BF)
    tensors["x_embedder.weight"] = torch.randn(128, 16, generator=g).to(BF)
    path = tmp_path_factory.mktemp("nunchaku") / "svdq-int4_r16-tiny.safetensors"
    meta = {"model_class": "NunchakuFluxTransformer2dModel", "quantization_config": json.dumps(
        {"method": "svdquant", "weight": {"dtype": "int4", "group_size": 64}, "rank": RANK})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return transformer, emb, parts, tensors, path


def _fresh(synth):
    return copy.deepcopy(synth[0])


# ---- the packing ---------------------------------------------------------------------------------


def test_pack_unpack_round_trips_are_exact(gen):
    codes = torch.randint(-8, 8, (256, 384), generator=gen, dtype=torch.int8)
    assert torch.equal(P.unpack_weight(P.pack_weight(codes)), codes)
    packed = P.pack_weight(codes)
    assert packed.shape == (256, 192) and packed.dtype == torch.int8
    assert not torch.equal(packed.view(torch.uint8), int4.pack(codes))  # not row-major: the test can fail
    scales = torch.rand(256, 6, generator=gen).to(BF)
    assert torch.equal(P.unpack_scales(P.pack_scales(scales)), scales)
    v = torch.randn(384, generator=gen).to(BF)
    assert torch.equal(P.unpack_vector(P.pack_vector(v)), v)
    down, up = torch.randn(32, 384, generator=gen).to(BF), torch.randn(256, 32, generator=gen).to(BF)
    assert P.pack_lowrank(down, down=True).shape == (384, 32)
    assert torch.equal(P.unpack_lowrank(P.pack_lowrank(down, down=True), down=True), down)
    assert torch.equal(P.unpack_lowrank(P.pack_lowrank(up, down=False), down=False), up)


def test_vector_order_is_the_table_of_nunchakus_packer():
    # NunchakuWeightPacker.pack_scale's comment (warp_n = 128): lane 0 loads 0 1 8 9, lane 1 2 3 10 11, ...,
    # lane 4 16 17 24 25, lane 28 112 113 120 121, lane 31 118 119 126 127.
    order = P.pack_vector(torch.arange(256, dtype=torch.float32)).long().tolist()
    assert order[:20] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 16, 17, 24, 25]
    assert order[112:116] == [112, 113, 120, 121] and order[124:128] == [118, 119, 126, 127]
    assert order[128:132] == [128, 129, 136, 137]  # the next 128-tile starts over


def test_weight_word_is_the_mma_b_fragment_of_its_lane():
    # mma.m16n8k64 s4, B operand: lane = 4 * groupID + tig holds column n = groupID, rows k = tig*8 .. +7 of
    # each 32-k half. Nunchaku's word order per tile is [n_pack][lane][n_half][k_half], 8 codes per word.
    N = K = 128
    n_idx, k_idx = torch.meshgrid(torch.arange(N), torch.arange(K), indexing="ij")
    codes = ((n_idx * 3 + k_idx) % 16 - 8).to(torch.int8)
    words = P.pack_weight(codes).view(torch.uint8).reshape(-1, 4)  # tile (n 0..127, k 0..63) comes first
    n_pack, group_id, tig, n_half, k_half = 2, 1, 3, 1, 1
    word = (((n_pack * 8 + group_id) * 4 + tig) * 2 + n_half) * 2 + k_half
    n = n_pack * 16 + n_half * 8 + group_id
    ks = [k_half * 32 + tig * 8 + j for j in range(8)]
    got = [((int(words[word, j // 2]) >> (4 * (j % 2))) & 0xF) for j in range(8)]
    got = [c - 16 if c >= 8 else c for c in got]
    assert got == codes[n, ks].tolist()


def test_lowrank_order_is_lane_major_16x16_fragments(gen):
    # NunchakuWeightPacker.pack_lowrank_weight: fragments of 16 x 16 (channel-fragment major, then rank
    # fragment), each [n_lane 8][k_lane 4][n_half 2][k_half 2][2] with row = n_half*8 + n_lane and
    # column = k_half*8 + k_lane*2 + e; lora_down's rows are rank, lora_up's rows are output channels.
    def position(row: int, col: int, frag: int) -> int:
        n_half, n_lane = divmod(row % 16, 8)
        k_half, rest = divmod(col % 16, 8)
        k_lane, e = divmod(rest, 2)
        return frag * 256 + (((n_lane * 4 + k_lane) * 2 + n_half) * 2 + k_half) * 2 + e

    R, K, N = 32, 256, 128
    down = torch.randn(R, K, generator=gen).to(BF)
    flat = P.pack_lowrank(down, down=True).reshape(-1)
    for r, c in [(0, 0), (5, 3), (17, 200), (31, 255), (9, 18)]:
        assert flat[position(r, c, (c // 16) * (R // 16) + r // 16)] == down[r, c]
    up = torch.randn(N, R, generator=gen).to(BF)
    flat = P.pack_lowrank(up, down=False).reshape(-1)
    for n, r in [(0, 0), (5, 3), (100, 17), (127, 31), (9, 18)]:
        assert flat[position(n, r, (n // 16) * (R // 16) + r // 16)] == up[n, r]


def test_packers_reject_shapes_off_the_tile():
    with pytest.raises(ValueError, match="multiple of 128"):
        P.pack_weight(torch.zeros(64, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        P.pack_weight(torch.full((128, 128), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiples of 16"):
        P.pack_lowrank(torch.zeros(8, 128, dtype=BF), down=True)


# ---- the import ----------------------------------------------------------------------------------


def _layers(model, parts):
    """(imported module, reference parts) per imported layer; the single proj_out = out_proj + mlp_fc2."""
    out = []
    for name, lin in parts.items():
        head, _, nk = name.rpartition(".")
        if head.startswith("single"):
            if nk in ("out_proj", "mlp_fc2"):
                continue
            target = {"qkv_proj": "attn.to_qkv", "mlp_fc1": "proj_mlp"}[nk]
        else:
            target = TARGET[nk]
        out.append((model.get_submodule(f"{head}.{target}"), [(lin, nk in ("mlp_fc2", "mlp_context_fc2"))]))
    s = "single_transformer_blocks.0"
    out.append((model.get_submodule(f"{s}.proj_out"),
                [(parts[f"{s}.out_proj"], False), (parts[f"{s}.mlp_fc2"], True)]))
    return out


def _ref_layer(lins, x: torch.Tensor, mode: str = "int4") -> torch.Tensor:
    """float64 reference of an imported layer on bf16 x, from the file's codes: the engine's token quantizer
    of x / smooth (one quantization of the whole input: a merged layer's tokens span both parts), the weight
    from the codes and scales, each low-rank branch on its raw K-slice of x, the (fc2: shift-corrected) bias.
    """
    smooth = torch.cat([lin["smooth"] for lin, _ in lins]).float()
    q, s, _ = reference.quantize_act(x, smooth, None, mode)
    M, K = x.shape
    if mode == "int4":
        a = (int4.unpack(q).double().reshape(M, K // 64, 64) * s.double()[..., None]).reshape(M, K)
    else:
        a = q.double() * s.double()[:, None]
    k, out = 0, 0
    for lin, shifted in lins:
        kk = lin["codes"].shape[1]
        lora_act = x[:, k:k + kk].float() @ lin["lora_down"].float().T  # fp32, as the quantizer computes it
        out = out + a[:, k:k + kk] @ _wq(lin).T + lora_act.double() @ lin["lora_up"].double().T
        out = out + _bias(lin, shifted)
        k += kk
    return out


def test_import_holds_the_exact_codes_and_matches_the_float64_reference(synth, gen):
    model = _fresh(synth)
    _, emb, parts, tensors, path = synth
    report = load_nunchaku(model, path, weight_layout="g64")
    assert len(report.quantized) == 8 + 3 and report.weight_layout == "g64" and report.act_mode == "int4"
    assert report.merged == {"single_transformer_blocks.0.proj_out": ["single_transformer_blocks.0.out_proj",
                                                                       "single_transformer_blocks.0.mlp_fc2"]}
    # skipped: 12 AWQ tensors, one smooth_orig, the single block's four smooth_factor_orig
    assert sum(len(v) for v in report.skipped.values()) == 12 + 1 + 4
    for mod, lins in _layers(model, parts):
        assert isinstance(mod, SVDQLinear) and mod.weight_layout == "g64"
        codes = torch.cat([lin["codes"] for lin, _ in lins], dim=1)
        assert torch.equal(int4.unpack(mod.qweight), codes)
        assert torch.equal(mod.wscales, torch.cat([lin["scales"] for lin, _ in lins], dim=1))
        assert torch.equal(mod.smooth, torch.cat([lin["smooth"] for lin, _ in lins]).float())
        bias = sum(_bias(lin, shifted) for lin, shifted in lins)
        assert ((mod.bias.double() - bias).abs() <= 2 ** -8 * bias.abs()).all()  # one bf16 rounding (half an ulp)
        x = torch.randn(17, mod.in_features, generator=gen).to(BF)
        ref = _ref_layer(lins, x)
        err = ((mod(x).double() - ref).norm() / ref.norm()).item()
        assert err < 4e-3, err  # bf16 output rounding (2^-9 relative) and fp32 accumulation
    assert torch.equal(model.transformer_blocks[0].attn.norm_added_k.weight,
                       tensors["transformer_blocks.0.norm_added_k.weight"])
    assert torch.equal(model.x_embedder.weight, tensors["x_embedder.weight"])
    assert "x_embedder.weight" in report.copied
    adaln = model.transformer_blocks[0].norm1.linear  # AWQ in the file: the model's own stays
    assert type(adaln) is torch.nn.Linear
    assert torch.equal(adaln.weight, synth[0].transformer_blocks[0].norm1.linear.weight)
    latents = torch.randn(1, 16, 16, generator=gen).to(BF)
    ids = torch.zeros(16, 3)
    out = model(hidden_states=latents, encoder_hidden_states=emb["prompt_embeds"],
                pooled_projections=emb["pooled_prompt_embeds"], timestep=torch.tensor([0.5]), guidance=None,
                img_ids=ids, txt_ids=torch.zeros(16, 3), return_dict=False)[0]
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()


def test_f8l_import_stays_within_the_layer_conversion_tolerance(synth, gen):
    # Same tokens on both sides (e4m3): the g64 layers run as svdq-w4a8 with fp8 tokens, so only the
    # g64 -> f8l requantization of the weights is measured (svdq-int4's g64 runs int4 tokens, whose noise
    # would dominate the comparison).
    _, _, parts, _, path = synth
    g64, f8l = _fresh(synth), _fresh(synth)
    load_nunchaku(g64, path, weight_layout="g64")
    report = load_nunchaku(f8l, path, weight_layout="f8l")
    assert report.weight_layout == "f8l" and report.act_mode == "fp8"
    for (a, lins), (b, _) in zip(_layers(g64, parts), _layers(f8l, parts)):
        assert b.weight_layout == "f8l" and b.act_mode == "fp8"
        same_tokens = SVDQLinear(a.in_features, a.out_features, rank=a.rank, fmt="svdq-w4a8", act_mode="fp8",
                                 weight_layout="g64")
        same_tokens.load_state_dict(a.state_dict())
        x = torch.randn(16, a.in_features, generator=gen).to(BF)
        y64, y8 = same_tokens(x).double(), b(x).double()
        assert ((y8 - y64).norm() / y64.norm()).item() < 0.05  # test_svdq_linear's g64 -> f8l layer bound
        ref = _ref_layer(lins, x, "fp8")  # and the g64 layer on e4m3 tokens is the float64 reference
        assert ((y64 - ref).norm() / ref.norm()).item() < 4e-3


def test_auto_layout_on_a_cpu_is_g64_and_a_prefused_model_loads(synth):
    from lowbit_engine.integrations.diffusers import fuse_qkv

    assert load_nunchaku(_fresh(synth), synth[4]).weight_layout == "g64"
    model = _fresh(synth)
    assert fuse_qkv(model)[0]
    report = load_nunchaku(model, synth[4])
    assert report.qkv_note == "the model's Q/K/V were already fused" and len(report.quantized) == 11
    with pytest.raises(CheckpointError, match="already quantized"):  # a second import: the layers are gone
        load_nunchaku(model, synth[4])


def test_padded_tensors_are_cropped_to_the_model_shapes(tmp_path, gen):
    # Nunchaku pads N and K to 128 and R to 16; a model linear of K=192, N=200 reads the top-left corner
    from lowbit_engine.integrations.nunchaku import _File, _read_linear

    K, N = 192, 200
    lin = _quantized_linear(gen, K, N)
    lin["lora_down"], lin["lora_up"] = lin["lora_down"][:10], lin["lora_up"][:, :10]  # rank 10 -> padded 16
    packed = P.pack_linear(lin["codes"], lin["scales"], lin["smooth"], lin["lora_down"], lin["lora_up"], lin["bias"])
    assert packed["qweight"].shape == (256, 128) and packed["lora_down"].shape == (256, 16)
    path = tmp_path / "padded.safetensors"
    save_file({f"blk.{k}": v for k, v in packed.items()}, str(path))
    got = _read_linear(_File(path), "blk", K, N, has_bias=True)
    assert torch.equal(got["codes"], lin["codes"]) and torch.equal(got["scales"], lin["scales"])
    assert torch.equal(got["smooth"], lin["smooth"]) and torch.equal(got["bias"], lin["bias"].double())
    assert torch.equal(got["lora_down"][:10], lin["lora_down"]) and not got["lora_down"][10:].any()
    assert torch.equal(got["lora_up"][:, :10], lin["lora_up"]) and not got["lora_up"][:, 10:].any()


# ---- failures leave the model as it was ----------------------------------------------------------


def _mutations():
    q = "transformer_blocks.0.mlp_fc2.qweight"
    return {
        "missing": (lambda t: t.pop("single_transformer_blocks.0.mlp_fc1.proj_up"),
                    "single_transformer_blocks.0.mlp_fc1.lora_up"),
        "shape": (lambda t: t.__setitem__(q, t[q][:, :128].contiguous()),
                  r"mlp_fc2.qweight.*\(128, 256\).*\(128, 128\)"),
        "dtype": (lambda t: t.__setitem__("transformer_blocks.0.out_proj.wscales",
                                          t["transformer_blocks.0.out_proj.wscales"].half()),
                  r"out_proj.wscales.*bfloat16.*float16"),
        "qweight dtype": (lambda t: t.__setitem__(q, t[q].view(torch.uint8)), r"mlp_fc2.qweight.*int8.*uint8"),
        "extra": (lambda t: t.__setitem__("transformer_blocks.0.mlp_fc3.qweight", t[q].clone()), "mlp_fc3"),
        "extra block": (lambda t: t.__setitem__("transformer_blocks.5.mlp_fc2.qweight", t[q].clone()), "no block"),
        "nan": (lambda t: t["transformer_blocks.0.mlp_fc1.lora_up"].__setitem__((0, 0), float("nan")),
                r"mlp_fc1.lora_up.*non-finite"),
        "zero smooth": (lambda t: t["single_transformer_blocks.0.qkv_proj.smooth_factor"].__setitem__(5, 0.0),
                        r"qkv_proj.smooth_factor.*non-zero"),
        "nvfp4": (lambda t: t.__setitem__("transformer_blocks.0.qkv_proj.wtscale", torch.ones(1)), "NVFP4"),
        "unknown top": (lambda t: t.__setitem__("not_in_model.weight", torch.ones(3)), "not_in_model"),
        "top shape": (lambda t: t.__setitem__("x_embedder.weight", torch.ones(128, 17, dtype=BF)),
                      r"x_embedder.*\(128, 16\).*\(128, 17\)"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_a_bad_checkpoint_raises_and_leaves_the_model_bit_identical(synth, tmp_path, case):
    mutate, match = _mutations()[case]
    tensors = {k: v.clone() for k, v in synth[3].items()}  # some mutations write in place
    mutate(tensors)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    model = _fresh(synth)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(CheckpointError, match=match):
        load_nunchaku(model, path)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds


@pytest.mark.parametrize("meta, match", [
    ({"model_class": "NunchakuZImageTransformer2DModel"}, "model_class"),
    ({"quantization_config": json.dumps({"weight": {"dtype": "fp4_e2m1_all", "group_size": 16}})}, "NVFP4"),
])
def test_a_header_for_another_model_or_precision_is_refused(synth, tmp_path, meta, match):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in synth[3].items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        load_nunchaku(_fresh(synth), path)


def test_an_unreadable_file_and_a_bad_layout_are_refused(synth, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(synth[4].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot open"):
        load_nunchaku(_fresh(synth), path)
    with pytest.raises(ValueError, match="weight_layout"):
        load_nunchaku(_fresh(synth), synth[4], weight_layout="g32")
