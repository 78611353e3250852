"""Fidelity gates of the promotion-free weight layouts (bench/fidelity.py, ``evaluate_layouts``).

On the synthetic FLUX-shaped layer (K = N = 3072, outlier channels, heavy-tailed weights; SVDQuant r32,
256 held-out tokens, the module forward through the ops) the layer-output SQNR of:

- F8L with fp8 tokens must not fall more than 0.2 dB below today's g64 with fp8 tokens;
- I8Q with int8 tokens must gain at least 0.8 dB over g64 with int8 tokens;
- a g64 layer converted to F8L (an old checkpoint loaded onto Hopper) must stay within 0.3 dB of g64.

Measured when written: g64 29.90 / 29.98 dB (fp8 / int8 tokens), F8L 30.27, I8Q 32.58, g64 -> F8L 29.76.
One SVDQuant run per layout on 2 CPU cores: this is the slow test of the suite (about a minute).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fidelity import evaluate_layouts  # noqa: E402

F8L_MAX_LOSS_DB = 0.2
I8Q_MIN_GAIN_DB = 0.8
CONVERTED_F8L_MAX_LOSS_DB = 0.3


@pytest.fixture(scope="module")
def rows() -> dict[str, float]:
    torch.manual_seed(0)  # as bench/fidelity.py: the heavy-tail sampler draws from the global generator
    with torch.no_grad():
        return {r["method"]: r["sqnr_db"] for r in evaluate_layouts(3072, 3072, 256, verbose=False)}


@pytest.mark.slow
def test_f8l_keeps_the_g64_fidelity(rows):
    assert rows["f8l (fp8 tokens)"] >= rows["g64 (fp8 tokens)"] - F8L_MAX_LOSS_DB, rows


@pytest.mark.slow
def test_i8q_gains_over_g64(rows):
    assert rows["i8q (int8 tokens)"] >= rows["g64 (int8 tokens)"] + I8Q_MIN_GAIN_DB, rows


@pytest.mark.slow
def test_old_checkpoints_convert_to_f8l_nearly_for_free(rows):
    assert rows["g64 converted to f8l (fp8 tokens)"] >= rows["g64 (fp8 tokens)"] - CONVERTED_F8L_MAX_LOSS_DB, rows
