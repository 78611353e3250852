"""bench/e2e_flux.py in its smoke mode (tiny FLUX on the CPU): the same code the GPU run uses, end to end.

The script is not a package module, so it is imported from its path. One smoke run (a few seconds) is
shared by the tests below.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "e2e_flux.py"
ENGINE = ("svdq-int4", "svdq-w4a8", "svdq-w4a8-fused")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("e2e_flux", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[ModuleType, dict[str, Any], Path]:
    e2e = _load_script()
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    # every MLP exit on its static scale, whatever it costs on random weights: the fused path must run
    report = e2e.run(["--smoke", "--out", str(out), "--exit-max-loss-db", "99"])
    return e2e, report, out


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["variant"]: r for r in report["rows"]}


def test_json_written_with_run_metadata(smoke):
    _, report, out = smoke
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    for key in ("gpu", "commit", "torch", "diffusers", "build_info", "config", "rows", "targets", "reference"):
        assert key in data, key
    assert data["smoke"] and "not performance" in data["note"]
    assert data["config"]["image_tokens"] == 64 and data["config"]["text_tokens"] == 8


def test_every_variant_has_a_row(smoke):
    e2e, report, _ = smoke
    assert set(_rows(report)) == set(e2e.VARIANTS)


def test_bf16_eager_and_engine_rows_have_numbers(smoke):
    _, report, _ = smoke
    rows = _rows(report)
    eager = rows["bf16-eager"]
    assert eager["status"] == "ok" and eager["ms_per_step"] > 0 and eager["speedup_vs_bf16_eager"] == 1.0
    for fmt in ENGINE:
        r = rows[fmt]
        assert r["status"] == "ok", r["error"]
        assert r["ms_per_step"] > 0 and r["quant_s"] > 0
        assert r["speedup_vs_bf16_eager"] == pytest.approx(eager["ms_per_step"] / r["ms_per_step"])
        assert 0 < r["weight_ratio_vs_bf16"] < 1
        assert r["weight_gib"] < eager["weight_gib"]
        assert math.isfinite(r["rel_l2_vs_bf16"]) and 0 < r["rel_l2_vs_bf16"] < 0.5
        # The engine's ops ran on the C++ reference, not the torch fallback.
        assert r["backends"] and all(b == ["cpu"] for b in r["backends"].values()), r["backends"]
        assert r["fallback"] is False


def test_fused_variant_runs_the_fused_ops(smoke):
    _, report, _ = smoke
    r = _rows(report)["svdq-w4a8-fused"]
    assert {"norm_modulate_quantize", "gemm_w4a8_exit"} <= set(r["backends"]), r["backends"]
    # 2 MLP fc2s + 1 proj_out + the double block's 2 attention output projections
    assert "blocks fused, 5/5 exit linears on static scales" in r["note"]


def test_unavailable_variants_are_reported_as_such(smoke):
    e2e, report, _ = smoke
    rows = _rows(report)
    for v in ("bf16-compile", "svdq-int4-compile", "svdq-w4a8-compile", "svdq-w4a8-fused-compile",
              "svdq-w4a8-fused-cudagraph", "torchao-fp8-compile"):
        if v.startswith("torchao") and e2e._torchao_fp8() is None:
            continue  # "not installed" wins over "skipped": checked below
        assert rows[v]["status"] == "skipped" and "--compile" in rows[v]["note"]
        assert rows[v]["ms_per_step"] is None
    if e2e._torchao_fp8() is None:
        for v in ("torchao-fp8", "torchao-fp8-compile"):
            assert rows[v]["status"] == "not installed" and rows[v]["ms_per_step"] is None
    else:  # installed: on the CPU it either runs or records why it could not
        assert rows["torchao-fp8"]["status"] in ("ok", "error")


def test_table_names_targets_and_rows(smoke):
    e2e, report, _ = smoke
    table = e2e.format_table(report)
    assert ">= 1.5x bf16 eager" in table and "182 ms/step" in table
    for v in e2e.VARIANTS:
        assert v in table


def test_variant_subset_and_failures_become_rows(tmp_path, monkeypatch):
    e2e = _load_script()

    def broken(self, model, fmt):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(e2e.Runner, "_quantize_engine", broken)
    report = e2e.run(["--smoke", "--variants", "svdq-int4", "--out", str(tmp_path / "e.json")])
    rows = _rows(report)
    assert set(rows) == {"bf16-eager", "svdq-int4"}  # bf16-eager always runs: baseline and reference
    assert rows["bf16-eager"]["status"] == "ok"
    assert rows["svdq-int4"]["status"] == "error" and "out of memory" in rows["svdq-int4"]["error"]


def test_profile_splits_the_step_time(tmp_path):
    e2e = _load_script()
    report = e2e.run(["--smoke", "--variants", "svdq-w4a8", "--profile", "--out", str(tmp_path / "p.json")])
    for name in ("bf16-eager", "svdq-w4a8"):
        split = _rows(report)[name]["time_split_ms"]
        assert set(split) == {"gemm_ms", "attention_ms", "other_ms"}
        assert split["gemm_ms"] > 0 and split["attention_ms"] > 0 and split["other_ms"] > 0, split
