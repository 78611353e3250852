"""bench/soak.py: its growth check catches leaks, and a short soak of a quantized tiny FLUX with LoRA swaps
shows none (the 1000-pass run is the benchmark's; its JSON lives in bench/results/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(soak)


def _samples(memory_step: int = 0, table_step: int = 0, n: int = 20) -> list[dict]:
    return [{"pass": i, "memory": {"traced_bytes": 1000 + i * memory_step, "rss_bytes": 1 << 30},
             "tables": {"record.calls": 4 + (i * table_step) // 10}} for i in range(n)]


def test_growth_check_accepts_flat_and_catches_leaks():
    assert soak.growth_failures(_samples(), warmup=2) == []
    # 100 KiB per sample: a leaked activation per pass
    leak = soak.growth_failures(_samples(memory_step=100 << 10), warmup=2)
    assert len(leak) == 1 and leak[0].startswith("traced_bytes:")
    grow = soak.growth_failures(_samples(table_step=1), warmup=2)  # one record entry per 10 passes
    assert grow == ["table record.calls: 4 -> 5"]
    assert "too few samples" in soak.growth_failures(_samples(n=3), warmup=2)[0]


def test_short_soak_is_flat():
    pytest.importorskip("diffusers")
    result = soak.run_soak(passes=8, swap_every=2, sample_every=1, device="cpu", trace=True, calibrate=False)
    assert result["ok"], result["failures"]
    assert result["swaps"] == 3 and len(result["samples"]) == 8
    assert result["samples"][-1]["tables"]["lora.adapters"] == 1
