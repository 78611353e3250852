"""The ``lowbit-engine`` command on the CPU: the errors a user sees, ``quantize --out``, ``bench --plot``.

(``demo``, which needs a whole quantization of the tiny FLUX, is tested with the benchmark CLI in
test_benchmark.py; its PNG is checked there.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lowbit_engine import benchmark, cli

ROOT = Path(__file__).resolve().parent.parent
H100_JSON = ROOT / "bench/results/kernels-h100-2026-11-23.json"


def _one_line_error(capsys, argv: list[str], after_loading: bool = False) -> str:
    """Run argv, expect exit status 2 and exactly one line on stderr, no traceback; return that line.

    ``after_loading``: diffusers logged while it loaded the pipeline; only the last line is ours.
    """
    capsys.readouterr()  # what the test itself printed before
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    lines = err.strip().splitlines()
    assert (after_loading or len(lines) == 1) and "Traceback" not in err, err
    assert lines[-1].startswith("lowbit-engine"), err
    return lines[-1]


def test_missing_model_path_is_one_line(capsys):
    line = _one_line_error(capsys, ["demo", "--model", "/nonexistent"])
    assert "model path /nonexistent does not exist" in line and "model_index.json" in line


def test_folder_that_is_no_pipeline_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, ["quantize", str(tmp_path), "--out", str(tmp_path / "q")])
    assert "is not a diffusers pipeline folder" in line


def test_unknown_format_fails_before_anything_is_built(capsys, monkeypatch):
    from lowbit_engine.integrations import tiny

    def must_not_run(*a, **k):
        raise AssertionError("the pipeline was built before the format was checked")

    monkeypatch.setattr(tiny, "tiny_flux_pipeline", must_not_run)
    line = _one_line_error(capsys, ["demo", "--fmt", "int3"])
    assert "unknown format 'int3'" in line and "svdq-int4" in line  # what came, and what was expected


def test_bad_flag_is_one_line(capsys):
    assert "unrecognized arguments: --bogus" in _one_line_error(capsys, ["demo", "--bogus"])
    assert "argument --rank: expected a positive integer, got 0" in _one_line_error(capsys, ["demo", "--rank", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    line = _one_line_error(capsys, ["demo", "--device", "cuda"])
    assert "no CUDA device is available" in line and "--device cpu" in line


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["demo", "--model", "/nonexistent", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lowbit-engine demo: error: model path")
    assert cli.main(["--debug", "demo", "--model", "/nonexistent"]) == 2  # before the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_version(capsys):
    import lowbit_engine

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit-engine {lowbit_engine.__version__}"


def test_quantize_out_must_be_new_and_calib_file_must_exist(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/model_index.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    line = _one_line_error(capsys, ["quantize", str(tmp_path / "src"), "--out", str(tmp_path / "full")])
    assert "already exists and is not an empty folder" in line
    line = _one_line_error(capsys, ["quantize", str(tmp_path / "src"), "--calib", str(tmp_path / "none.txt"),
                                    "--out", str(tmp_path / "q")])
    assert "none.txt: no such file" in line
    line = _one_line_error(capsys, ["quantize", str(tmp_path / "src"), "--calib", "p.txt", "--calib-prompts", "2",
                                    "--out", str(tmp_path / "q")])
    assert "not allowed with argument" in line


# ---- quantize --out: the folder loads back with one call, with equal outputs -------------------------


def test_quantize_folder_loads_back_with_equal_outputs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers", reason="FluxPipeline needs transformers")
    from lowbit_engine import cli_quantize
    from lowbit_engine.integrations.folder import load_pipeline
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline_with_text
    from lowbit_engine.nn import FP8Linear

    src, out = tmp_path / "tiny-flux", tmp_path / "tiny-flux-fp8"
    tiny_flux_pipeline_with_text(seed=0).save_pretrained(src)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\na red fox in the snow\n\na city street at night\n")
    kept = {}
    real = cli_quantize.quantize_to_folder
    monkeypatch.setattr(cli_quantize, "quantize_to_folder", lambda *a, **k: kept.setdefault("pipe", real(*a, **k)))
    # fp8: the fastest format to quantize on a loaded CPU; the folder mechanics are the format's business
    assert cli.main(["quantize", str(src), "--fmt", "fp8", "--calib", str(prompts), "--steps", "2", "--size", "32",
                     "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 prompt(s) x 2 steps" in text
    assert "quantized fp8: 28 layers" in text  # the load report, through the lowbit_engine logger
    assert re.search(r"size: transformer in memory [\d.]+ MiB \(bf16\) -> [\d.]+ MiB \(fp8\)", text)
    assert not out.with_name(out.name + ".partial").exists()

    again = load_pipeline(out)
    assert sum(isinstance(m, FP8Linear) for m in again.transformer.modules()) == 28
    call = dict(prompt="a red fox", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                output_type="pt")
    with torch.no_grad():
        want = kept["pipe"](**call, generator=torch.Generator().manual_seed(0)).images
        got = again(**call, generator=torch.Generator().manual_seed(0)).images
        bf16 = tiny_flux_pipeline_with_text(seed=0)(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, want)
    assert not torch.equal(got, bf16)  # it is the quantized model that came back, not the bf16 one


def test_quantize_of_a_folder_diffusers_cannot_load_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers", reason="FluxPipeline needs transformers")
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, _ = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "src")
    index = json.loads((tmp_path / "src/model_index.json").read_text())
    assert index["text_encoder"] == [None, None]
    line = _one_line_error(capsys, ["quantize", str(tmp_path / "src"), "--out", str(tmp_path / "q")], True)
    # diffusers' own refusal to load a FluxPipeline without its text encoders, as one line
    assert "cannot load the pipeline" in line and "were passed" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


# ---- bench ------------------------------------------------------------------------------------------


def test_plot_redraws_a_committed_gpu_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "k.png"
    assert cli.main(["bench", "kernels", "--from", str(H100_JSON), "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1600, 1500)


def test_plot_ranks_only_whole_gemms_against_cublas():
    from lowbit_engine.viz import _does_the_gemm

    rows = {(r["kernel"], r["M"], r["K"], r["N"]): r for r in json.loads(H100_JSON.read_text())["results"]}
    assert _does_the_gemm(rows[("gemm_w4a4_r32", 4608, 3072, 3072)])
    assert _does_the_gemm(rows[("svdq_w4a4_linear_r32", 16, 3072, 3072)])
    assert not _does_the_gemm(rows[("quantize_act_int4_r32", 4608, 3072, 3072)])


def test_plot_refuses_a_cpu_run(capsys, tmp_path):
    line = _one_line_error(capsys, ["bench", "kernels", "--device", "cpu", "--plot", str(tmp_path / "x.png")])
    assert "CPU run" in line and "--from" in line
    cpu = tmp_path / "cpu.json"
    benchmark.save(benchmark.run(device="cpu", shapes=[(1, 64, 64)], repeat=1, kernels=["gemm_w4a4"]), cpu)
    pytest.importorskip("matplotlib")
    line = _one_line_error(capsys, ["bench", "kernels", "--from", str(cpu), "--plot", str(tmp_path / "x.png")])
    assert "no cuBLAS rows" in line


def test_cpu_bench_says_reference_timings_ranks_nothing_and_prints_one_table(capsys):
    assert cli.main(["bench", "kernels", "--device", "cpu", "--repeat", "1", "--kernels", "gemm_w4a",
                     "quantize_act_int4", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "reference timings" in out and "not a representative baseline" in out
    lines = out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("kernel ")]
    assert len(headers) == 1  # --verbose streams the rows; the table is not printed a second time
    rows = [line for line in lines[headers[0] + 1:] if line and not line.startswith("#")]
    assert {r.split()[0] for r in rows} == {"quantize_act_int4_r32", "gemm_w4a4_r32", "gemm_w4a8_r32",
                                            "gemm_w4a8fp8_r32", "gemm_w4a8_f8l_r32", "gemm_w4a8_i8q_r32"}
    header = lines[headers[0]]
    for r in rows:  # every column starts where its header does, whatever the kernel name's length
        assert r.index(" cpu ") + 1 == header.index("backend")
        assert r.split()[-2:] == ["-", "-"]  # no ratio against the CPU's torch matmul


def test_table_columns_fit_long_names():
    rows = [dict(kernel=k, backend=b, M=1, K=64, N=64, median_ms=1.0, tflops=1.0, gbps=1.0, ratio_vs_bf16=None,
                 ratio_vs_fp8=None, note="") for k, b in (("k", "cpu"), ("a_kernel_name_" * 4, "cuda+triton+torch"))]
    table = benchmark.format_table({"gpu": "x", "commit": "c", "torch": "t", "results": rows}).splitlines()
    m_col = table[1].index(" M ") + 1  # the M column is right-aligned under its header
    assert [line[m_col] for line in table[2:]] == ["1", "1"]
    assert table[1].index("backend") == table[3].index("cuda+triton+torch")
