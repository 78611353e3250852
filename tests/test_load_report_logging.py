"""The load report goes through logging (logger ``lowbit_engine``), not print; and saving one layer works."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

import lowbit_engine
from lowbit_engine.integrations.diffusers import sidecar_path


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(torch.bfloat16)


def test_report_is_logged_at_info_not_printed(capsys, caplog):
    calib = [{"input": torch.randn(16, 64, dtype=torch.bfloat16)}]
    with caplog.at_level(logging.INFO, logger="lowbit_engine"):
        model = lowbit_engine.load(_model(), "svdq-int4", rank=8, calib=calib, progress=True)
    assert "quantized svdq-int4: 2 layers" not in capsys.readouterr().out  # a library does not print
    records = [r for r in caplog.records if r.name.startswith("lowbit_engine") and r.levelno == logging.INFO]
    assert len(records) == 1 and "quantized svdq-int4: 2 layers" in records[0].getMessage()
    assert model._lowbit_report is lowbit_engine.last_report()  # the object stays available
    assert model._lowbit_report.num_quantized == 2


def test_progress_false_logs_nothing(caplog):
    with caplog.at_level(logging.DEBUG, logger="lowbit_engine"):
        lowbit_engine.load(_model(), "fp8", progress=False)
    assert not [r for r in caplog.records if r.name.startswith("lowbit_engine")]


def test_save_of_a_single_layer_writes_its_sidecar(tmp_path):
    # README's "Quantizing a layer": layer.config is a method on quantized layers, a dict on diffusers models
    layer = lowbit_engine.SVDQLinear(128, 64, rank=16)
    path = lowbit_engine.save(layer, tmp_path / "layer.safetensors")
    record = json.loads(sidecar_path(path).read_text())
    assert record["architecture"] == "SVDQLinear" and record["config"] == json.loads(json.dumps(layer.config()))
    again = lowbit_engine.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values()))
