"""The benchmark harness and the CLI on the CPU: CI exercises the same code a GPU run uses."""

from __future__ import annotations

import json
import os

import pytest

from lowbit_engine import benchmark, cli

EXPECTED_KERNELS = {"torch_matmul_bf16", "quantize_act_int4_r32", "quantize_act_int8_r32", "gemm_w4a4_r32",
                    "gemm_w4a8_r32", "gemm_w4a8fp8_r32",
                    "svdq_w4a4_linear_r32", "svdq_w4a8_linear_r32", "svdq_w4a8fp8_linear_r32", "fp8_linear_dynamic", "nvfp4_linear_fp8",
                    "mxfp4_linear_fp8", "nvfp4_linear_bf16_weight_only",
                    # the promotion-free layouts (the expand / gemm8 / CUDA-quantizer rows exist on a GPU only)
                    "gemm_w4a8_f8l_r32", "gemm_w4a8_i8q_r32", "svdq_w4a8_f8l_linear_r32", "svdq_w4a8_i8q_linear_r32",
                    # fc1 as an exit producer (fused) and its unfused chain
                    "exit_f8l_gelu_r32", "exit_i8q_gelu_r32", "exit_f8l_gelu_r32_unfused", "exit_i8q_gelu_r32_unfused",
                    "w4a16_linear_weight_only"}
FLOAT_KERNELS = {"fp8_linear_dynamic", "nvfp4_linear_fp8", "mxfp4_linear_fp8", "nvfp4_linear_bf16_weight_only"}


def test_cpu_run_reports_every_kernel_with_its_backend():
    report = benchmark.run(device="cpu", shapes=[(17, 128, 64)], repeat=2)
    assert {"gpu", "commit", "torch", "build_info", "results", "timestamp"} <= set(report)
    rows = {r["kernel"]: r for r in report["results"]}
    assert set(rows) == EXPECTED_KERNELS
    assert rows["gemm_w4a4_r32"]["backend"] == "cpu"
    assert rows["gemm_w4a8_r32"]["backend"] == "cpu"
    assert rows["gemm_w4a8fp8_r32"]["backend"] == "cpu"
    assert rows["svdq_w4a4_linear_r32"]["backend"] == "cpu"  # both ops of the composite ran on the C++ ref
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        # the float formats have no CPU kernel: their rows say they ran the torch reference
        assert r["fallback"] == (r["kernel"] in FLOAT_KERNELS)
        if r["kernel"] != "torch_matmul_bf16":
            assert (r["backend"] == "torch") == r["fallback"]
        # nothing is ranked against the CPU's torch matmul: it is no stand-in for cuBLAS
        assert r["ratio_vs_bf16"] is None and r["ratio_vs_fp8"] is None
    assert "CPU run" in report["note"] and "reference timings" in report["note"]


def test_kernel_filter_and_table():
    report = benchmark.run(device="cpu", shapes=[(1, 64, 64)], repeat=1, kernels=["quantize"])
    assert {r["kernel"] for r in report["results"]} == {"quantize_act_int4_r32", "quantize_act_int8_r32"}
    table = benchmark.format_table(report)
    assert "quantize_act_int4_r32" in table and "TFLOP/s" in table


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert cli.main(["bench", "kernels", "--device", "cpu", "--repeat", "1", "--kernels", "gemm", "--out",
                     str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] and {r["kernel"] for r in data["results"]} == {
        "gemm_w4a4_r32", "gemm_w4a8_r32", "gemm_w4a8fp8_r32", "gemm_w4a8_f8l_r32", "gemm_w4a8_i8q_r32"}
    assert "wrote" in capsys.readouterr().out


def test_cli_info_and_demo(capsys, tmp_path):
    assert cli.main(["info"]) == 0
    assert '"cpu_reference": true' in capsys.readouterr().out
    pytest.importorskip("transformers", reason="the demo's FluxPipeline needs transformers")
    from PIL import Image

    out = tmp_path / "pictures"
    assert cli.main(["demo", "--device", "cpu", "--steps", "2", "--size", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny FLUX pipeline" in text and "quantized svdq-int4: 28 layers" in text  # the report, logged
    assert "fidelity vs bf16: relative L2" in text and "PSNR" in text
    assert "quantize_act=cpu" in text and "gemm_w4a4=cpu" in text
    png = out / "demo-svdq-int4-r32.png"
    assert f"wrote {png}" in text
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        # 32x32 images scaled 8x to 256-pixel panels: 3 panels + 4 gaps of 8; 2 title lines, labels, the note
        assert im.format == "PNG" and im.size == (3 * 256 + 4 * 8, 8 + 2 * 16 + 16 + 256 + 16 + 8)
        pixels = im.convert("RGB")
        bf16_panel = pixels.crop((8, 56, 8 + 256, 56 + 256))
        assert len(set(bf16_panel.getdata())) > 100  # the image itself is in the panel, not a blank


def test_with_env_sets_variables_for_the_call_and_restores_them(monkeypatch):
    from lowbit_engine.benchmark import _with_env

    monkeypatch.setenv("LOWBIT_GEMM_W4_KERNEL", "mma")
    monkeypatch.delenv("LOWBIT_GEMM_W4_SM90_SCHEDULE", raising=False)
    seen = {}

    def fn(i):
        seen[i] = (os.environ.get("LOWBIT_GEMM_W4_KERNEL"), os.environ.get("LOWBIT_GEMM_W4_SM90_SCHEDULE"))
        if i == 1:
            raise RuntimeError("kernel failed")
        return i

    wrapped = _with_env(fn, LOWBIT_GEMM_W4_KERNEL="wgmma", LOWBIT_GEMM_W4_SM90_SCHEDULE="split")
    assert wrapped(0) == 0 and seen[0] == ("wgmma", "split")
    with pytest.raises(RuntimeError):
        wrapped(1)
    assert seen[1] == ("wgmma", "split")
    assert os.environ["LOWBIT_GEMM_W4_KERNEL"] == "mma"  # the caller's value is back
    assert "LOWBIT_GEMM_W4_SM90_SCHEDULE" not in os.environ  # and an unset one stays unset
