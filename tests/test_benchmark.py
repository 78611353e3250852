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
        assert r["ratio_vs_bf16"] == pytest.approx(rows["torch_matmul_bf16"]["median_ms"] / r["median_ms"])
    assert "CPU run" in report["note"]


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


def test_cli_info_and_demo(capsys):
    assert cli.main(["info"]) == 0
    assert '"cpu_reference": true' in capsys.readouterr().out
    pytest.importorskip("transformers", reason="the demo's FluxPipeline needs transformers")
    assert cli.main(["demo", "--device", "cpu", "--steps", "2", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "tiny FLUX pipeline" in text and "quantized svdq-int4: 28 layers" in text
    assert "fidelity vs bf16: relative L2" in text and "quantize_act=cpu" in text and "gemm_w4a4=cpu" in text


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
