"""Shared by the fused-block tests: a model's output eager and under ``torch.compile`` (aot_eager), as
test_fused_blocks.py's ``_fused_compiled_and_eager`` does for FLUX, for any model and inputs."""

from __future__ import annotations

from typing import Any

import torch


def compiled_and_eager(model: torch.nn.Module, inputs: dict[str, Any], fullgraph: bool = False):
    """``(compiled, eager)`` first outputs of ``model(**inputs)`` (its forwards as they are installed)."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(**inputs)[0]
            compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)(**inputs)[0]
    finally:
        torch._dynamo.reset()
    return compiled, eager
