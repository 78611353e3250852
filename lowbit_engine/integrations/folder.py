"""A quantized pipeline as one folder, in the project's current checkpoint format; loads back with one call.

The folder ``lowbit-engine quantize`` writes holds:

- the pipeline as diffusers saves it (``save_pretrained``, bf16), written *before* quantization: the
  current checkpoint holds only the quantized layers, so the rest of the model (and the config the
  transformer is rebuilt from) comes from here;
- ``transformer.lowbit.safetensors`` (+ ``.json`` sidecar): :func:`lowbit_engine.save` of the quantized
  transformer;
- ``lowbit_engine.json``: the format and rank to load with, and where the model came from.

So the folder still carries the bf16 transformer weights on disk; the diffusers-native format (issue 17)
replaces both writers (:func:`stage_base`, :func:`write_quantized`) and :func:`load_quantized`.

Example:
    >>> import os, tempfile, torch
    >>> from lowbit_engine.integrations import folder
    >>> folder.load_quantized(os.path.join(tempfile.mkdtemp(), "missing"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...missing: not a lowbit-engine quantized folder (no lowbit_engine.json; expected a folder written by `lowbit-engine quantize --out`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

MANIFEST = "lowbit_engine.json"
CHECKPOINT = "transformer.lowbit.safetensors"
FOLDER_VERSION = 1


def stage_base(pipe: Any, folder: str | os.PathLike[str]) -> None:
    """Write the (not yet quantized) pipeline into ``folder``: the bf16 components the checkpoint lacks."""
    pipe.save_pretrained(str(folder))


def write_quantized(pipe: Any, folder: str | os.PathLike[str], *, fmt: str, source: str) -> Path:
    """Add the quantized transformer of ``pipe`` and the manifest to a folder :func:`stage_base` wrote."""
    from .diffusers import save, sidecar_path

    folder = Path(folder)
    path = save(pipe, folder / CHECKPOINT)
    ranks = json.loads(sidecar_path(path).read_text())["ranks"]
    manifest = {"lowbit_folder_version": FOLDER_VERSION, "format": fmt, "rank": ranks[0], "checkpoint": CHECKPOINT,
                "source": source}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def load_quantized(folder: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                   progress: bool = False) -> Any:
    """The quantized pipeline of a folder written by ``lowbit-engine quantize --out``, on ``device``.

    One call: diffusers loads the pipeline from the folder in bf16, then :func:`lowbit_engine.load` puts
    the saved quantized layers in (fusing Q/K/V as they were saved; no calibration).

    Raises FileNotFoundError if ``folder`` holds no manifest, CheckpointError if its checkpoint does not fit.
    """
    import diffusers

    from ..errors import CheckpointError
    from .diffusers import load

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder}: not a lowbit-engine quantized folder (no {MANIFEST}; expected a folder "
                                "written by `lowbit-engine quantize --out`)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("lowbit_folder_version") != FOLDER_VERSION:
        raise CheckpointError(f"{manifest_path}: lowbit_folder_version expected {FOLDER_VERSION}, "
                              f"got {manifest.get('lowbit_folder_version')!r}")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    load(pipe, manifest["format"], rank=manifest["rank"], checkpoint=folder / manifest["checkpoint"],
         progress=progress)
    return pipe.to(device)
