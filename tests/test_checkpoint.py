"""Checkpoints of quantized modules (lowbit_engine.checkpoint): bit-exact round trips, loading into models
that still hold nn.Linear layers or already hold quantized ones, and errors that leave the model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit_engine import checkpoint
from lowbit_engine.checkpoint import load_checkpoint, save
from lowbit_engine.errors import CheckpointError
from lowbit_engine.nn import SVDQLinear

# ---- helpers ----

# name -> (in_features, out_features, rank, fmt, act_mode, bias, dtype): the quantized layers of the test
# model, covering both formats, every activation mode, rank 0, layers without bias and an fp16 layer.
LAYERS = {
    "blocks.0.attn.to_q": (64, 128, 16, "svdq-int4", "int4", True, torch.bfloat16),
    "blocks.0.attn.to_out": (128, 64, 8, "svdq-w4a8", "int8", False, torch.bfloat16),
    "blocks.1.ff.0": (64, 192, 32, "svdq-w4a8", "fp8", True, torch.float16),
    "blocks.1.ff.2": (192, 64, 0, "svdq-int4", "int4", False, torch.bfloat16),
}


def fill_random(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random values of the right dtype in every tensor (no quantizer needed: the checkpoint stores bytes)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype == torch.uint8 and name in ("wscales", "wzeros"):  # i8q: inside the int8 range, as
                # load_checkpoint's check_buffers demands (s <= 8 keeps z * s and (15 - z) * s <= 127)
                t.copy_(torch.randint(1, 9, t.shape, generator=gen, dtype=torch.uint8) if name == "wscales"
                        else torch.randint(0, 16, t.shape, generator=gen, dtype=torch.uint8))
            elif t.dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
            elif name == "smooth" or name == "wscales":  # positive scales keep a forward finite
                t.copy_(torch.rand(t.shape, generator=gen) * 0.05 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return module


def quantized_layer(name: str, gen: torch.Generator) -> SVDQLinear:
    in_f, out_f, rank, fmt, act_mode, bias, dtype = LAYERS[name]
    return fill_random(SVDQLinear(in_f, out_f, rank=rank, fmt=fmt, act_mode=act_mode, bias=bias, dtype=dtype), gen)


class Block(nn.Module):
    def __init__(self, index: int, make):
        super().__init__()
        if index == 0:
            self.attn = nn.ModuleDict({"to_q": make("blocks.0.attn.to_q"), "to_out": make("blocks.0.attn.to_out")})
        else:
            self.ff = nn.Sequential(make("blocks.1.ff.0"), nn.GELU(), make("blocks.1.ff.2"))
        self.norm = nn.LayerNorm(64)


class TinyModel(nn.Module):
    """Two blocks with four quantizable layers, plus a LayerNorm and a head Linear that stay unquantized."""

    def __init__(self, make):
        super().__init__()
        self.blocks = nn.ModuleList([Block(0, make), Block(1, make)])
        self.head = nn.Linear(64, 10)


def linear_for(name: str) -> nn.Linear:
    in_f, out_f, *_, bias, dtype = LAYERS[name]
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def quantized_model(seed: int = 0) -> TinyModel:
    gen = torch.Generator().manual_seed(seed)
    return TinyModel(lambda name: quantized_layer(name, gen))


def fresh_model() -> TinyModel:
    """As it comes from from_pretrained: nn.Linear layers where the checkpoint has quantized ones."""
    torch.manual_seed(7)
    return TinyModel(linear_for)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def assert_same_forward(a: SVDQLinear, b: SVDQLinear, gen: torch.Generator) -> None:
    """Both layers compute bit-identical outputs (CPU: the C++ reference of the quantizer and the GEMM)."""
    x = torch.randn(3, 5, a.in_features, generator=gen).to(a.dtype)
    ya, yb = a(x), b(x)
    assert ya.isfinite().all() and torch.equal(ya, yb)


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    modules = dict(model.named_modules())
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap: tuple[dict, dict]) -> None:
    modules, state = snap
    now = dict(model.named_modules())
    assert list(now) == list(modules) and all(now[n] is modules[n] for n in now)
    current = model.state_dict()
    assert list(current) == list(state)
    for key, t in state.items():
        assert current[key].dtype == t.dtype and torch.equal(current[key], t), key


def rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    """Copy a checkpoint, editing its metadata (a dict) and tensors (name -> tensor) on the way."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[checkpoint.METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={checkpoint.METADATA_KEY: json.dumps(meta)})
    return dst


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TinyModel, Path]:
    model = quantized_model()
    return model, save(model, tmp_path / "model.safetensors")


@pytest.fixture(params=["fresh", "quantized"])
def target(request) -> TinyModel:
    """A model to load into: still with nn.Linear layers, or already quantized (other values)."""
    return fresh_model() if request.param == "fresh" else quantized_model(seed=99)


# ---- round trips ----


def test_single_module_round_trip(tmp_path: Path, gen: torch.Generator):
    layer = fill_random(SVDQLinear(128, 64, rank=16), gen)
    path = save(layer, tmp_path / "layer.safetensors")
    loaded = load_checkpoint(path)
    assert type(loaded) is SVDQLinear and loaded.config() == layer.config()
    assert_same_state(loaded, layer)
    assert_same_forward(loaded, layer, gen)


def test_nested_model_round_trip_standalone(saved, gen: torch.Generator):
    model, path = saved
    loaded = load_checkpoint(path)
    assert sorted(loaded) == sorted(LAYERS)
    for name, module in loaded.items():
        assert type(module) is SVDQLinear
        assert module.config() == model.get_submodule(name).config()
        assert_same_state(module, model.get_submodule(name))
        assert_same_forward(module, model.get_submodule(name), gen)
    assert loaded["blocks.0.attn.to_out"].bias is None and loaded["blocks.0.attn.to_q"].bias is not None


def test_load_into_model(saved, target, gen: torch.Generator):
    model, path = saved
    head = target.head
    norms = [b.norm for b in target.blocks]
    quantized_before = {n: target.get_submodule(n) for n in LAYERS}
    assert load_checkpoint(path, target) is target
    for name in LAYERS:
        assert type(target.get_submodule(name)) is SVDQLinear
        if isinstance(quantized_before[name], SVDQLinear):  # copied in, not replaced
            assert target.get_submodule(name) is quantized_before[name]
        assert_same_state(target.get_submodule(name), model.get_submodule(name))
        assert_same_forward(target.get_submodule(name), model.get_submodule(name), gen)
    # What the checkpoint does not hold is left alone.
    assert target.head is head and type(target.head) is nn.Linear
    assert [b.norm for b in target.blocks] == norms


def test_replacement_keeps_train_mode(saved):
    _, path = saved
    model = fresh_model().eval()
    load_checkpoint(path, model)
    assert not model.get_submodule("blocks.1.ff.0").training


def test_metadata_layout(saved):
    """The documented layout: tensor names and the JSON under the 'lowbit_engine' header key."""
    model, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lowbit_engine"])
        keys = set(f.keys())
    assert meta["lowbit_checkpoint_version"] == 1 and isinstance(meta["library_version"], str)
    assert sorted(meta["modules"]) == sorted(LAYERS)
    expected_keys = set()
    for name, entry in meta["modules"].items():
        layer = model.get_submodule(name)
        assert entry["class"] == "SVDQLinear" and entry["config"] == json.loads(json.dumps(layer.config()))
        for state_name, t in layer.state_dict().items():
            record = entry["tensors"][state_name]
            assert record["dtype"] == str(t.dtype).removeprefix("torch.") and record["shape"] == list(t.shape)
            assert len(record["sha256"]) == 64
            expected_keys.add(f"{name}.{state_name}")
    assert keys == expected_keys
    assert "blocks.0.attn.to_out.bias" not in keys and "head.weight" not in keys


def test_save_refuses_model_without_quantized_modules(tmp_path: Path):
    with pytest.raises(ValueError, match="holds no quantized module"):
        save(fresh_model(), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_non_strict_allows_extra_quantized_modules(tmp_path: Path, gen: torch.Generator):
    path = save(nn.Sequential(fill_random(SVDQLinear(64, 64, rank=8), gen)), tmp_path / "one.safetensors")
    model = nn.Sequential(nn.Linear(64, 64), SVDQLinear(64, 64, rank=8))
    extra = model[1]
    load_checkpoint(path, model, strict=False)
    assert type(model[0]) is SVDQLinear and model[1] is extra


# ---- errors: each leaves the model exactly as it was ----


def expect_error(path: Path, model: nn.Module, match: str, **kwargs) -> None:
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, model, **kwargs)
    assert str(path) in str(info.value)
    assert_untouched(model, snap)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, target, tmp_path: Path, fraction: float):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * fraction)])
    expect_error(cut, target, "cannot read the safetensors file")


def test_one_byte_short(saved, target, tmp_path: Path):
    _, path = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1])
    expect_error(cut, target, "cannot read the safetensors file")


def test_garbage_bytes(target, tmp_path: Path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    expect_error(bad, target, "cannot read the safetensors file")
    bad.write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 200)
    expect_error(bad, target, "cannot read the safetensors file")


def test_missing_file(target, tmp_path: Path):
    expect_error(tmp_path / "nowhere.safetensors", target, "cannot read")


def test_corrupt_tensor_bytes(saved, target, tmp_path: Path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the header still parses
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    expect_error(bad, target, "sha256")


def test_verify_false_skips_the_checksum(saved, tmp_path: Path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    assert len(load_checkpoint(bad, verify=False)) == len(LAYERS)


def test_plain_safetensors_file(target, tmp_path: Path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    expect_error(plain, target, "not a lowbit-engine checkpoint")


def test_checkpoint_of_other_shapes(tmp_path: Path, target):
    gen = torch.Generator().manual_seed(3)
    other = nn.Module()
    other.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    other.blocks[0].attn = nn.ModuleDict({"to_q": fill_random(SVDQLinear(64, 256, rank=16), gen)})
    path = save(other, tmp_path / "other.safetensors")
    expect_error(path, target, "blocks.0.attn.to_q", strict=False)


def test_unknown_checkpoint_version(saved, target, tmp_path: Path):
    _, path = saved
    bad = rewrite(path, tmp_path / "v99.safetensors", edit_meta=lambda m: m.update(lowbit_checkpoint_version=99))
    expect_error(bad, target, "lowbit_checkpoint_version expected 1, got 99")


def test_unknown_module_format_version(saved, target, tmp_path: Path):
    _, path = saved
    bad = rewrite(path, tmp_path / "fv.safetensors",
                  edit_meta=lambda m: m["modules"]["blocks.1.ff.2"]["config"].update(version=99))
    expect_error(bad, target, "blocks.1.ff.2")
    with pytest.raises(CheckpointError, match="from_config rejected"):
        load_checkpoint(bad)


def test_unknown_class(saved, target, tmp_path: Path):
    _, path = saved
    bad = rewrite(path, tmp_path / "cls.safetensors",
                  edit_meta=lambda m: m["modules"]["blocks.0.attn.to_q"].update({"class": "MysteryLinear"}))
    expect_error(bad, target, "MysteryLinear")


def test_missing_tensor(saved, target, tmp_path: Path):
    _, path = saved
    bad = rewrite(path, tmp_path / "missing.safetensors",
                  edit_tensors=lambda t: t.pop("blocks.1.ff.0.lora_up"))
    expect_error(bad, target, r"'blocks.1.ff.0.lora_up' .* is missing")


def test_wrong_dtype(saved, target, tmp_path: Path):
    _, path = saved

    def to_half(tensors):
        tensors["blocks.0.attn.to_q.wscales"] = tensors["blocks.0.attn.to_q.wscales"].to(torch.float16)

    bad = rewrite(path, tmp_path / "dtype.safetensors", edit_tensors=to_half)
    expect_error(bad, target, "expected bfloat16 .* got float16")


def test_extra_tensor(saved, target, tmp_path: Path):
    _, path = saved
    bad = rewrite(path, tmp_path / "extra.safetensors",
                  edit_tensors=lambda t: t.update({"blocks.0.attn.to_q.secret": torch.zeros(3)}))
    expect_error(bad, target, "unexpected tensors")


def test_target_submodule_missing(saved):
    _, path = saved
    for model in (fresh_model(), quantized_model(seed=5)):
        del model.blocks[1].ff
        expect_error(path, model, "'blocks.1.ff.0'.*there is none")


def test_target_linear_of_other_shape(saved):
    _, path = saved
    model = fresh_model()
    model.blocks[1].ff[2] = nn.Linear(192, 32, bias=False)
    expect_error(path, model, r"'blocks.1.ff.2'.*\(192, 64, False\).*\(192, 32, False\)")
    model.blocks[1].ff[2] = nn.Linear(192, 64, bias=True)  # bias presence must match too
    expect_error(path, model, "'blocks.1.ff.2'")


def test_target_quantized_with_other_config(saved):
    _, path = saved
    model = quantized_model(seed=5)
    model.blocks[0].attn["to_q"] = SVDQLinear(64, 128, rank=8)
    expect_error(path, model, "'blocks.0.attn.to_q'.*another config")


def test_target_of_wrong_type(saved):
    _, path = saved
    model = fresh_model()
    model.blocks[1].ff[0] = nn.Conv1d(64, 192, 1)
    expect_error(path, model, "found Conv1d")


def test_strict_mismatch(saved):
    _, path = saved
    model = quantized_model(seed=5)
    model.extra = SVDQLinear(64, 64, rank=8)
    expect_error(path, model, r"strict: .*\['extra'\]")


def test_failure_after_some_modules_loaded_changes_nothing(saved, target, tmp_path: Path):
    """A bad tensor in the last module must not leave the first modules swapped or overwritten."""
    _, path = saved
    last = sorted(LAYERS)[-1]
    bad = rewrite(path, tmp_path / "late.safetensors",
                  edit_tensors=lambda t: t.update({f"{last}.smooth": torch.zeros(7)}))
    expect_error(bad, target, last)


@pytest.mark.parametrize("outer", ["", "blocks.1"])
def test_nested_quantized_modules_in_metadata(saved, target, tmp_path: Path, outer: str):
    """Quantized modules are leaves: a checkpoint claiming one inside another is refused."""
    _, path = saved

    def nest(meta):
        meta["modules"][outer] = meta["modules"]["blocks.1.ff.0"]

    bad = rewrite(path, tmp_path / "nested.safetensors", edit_meta=nest)
    expect_error(bad, target, f"lies inside the quantized module {outer!r}")
