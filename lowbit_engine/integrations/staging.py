"""Stage changes to a module tree, then commit them or put the tree back exactly as it was.

``engine.load`` changes a transformer in several steps (QKV fusion, calibration hooks, one layer
replacement per quantized linear), and any of them can fail: a user's calibration input, a corrupt
checkpoint, a layer the quantizer refuses. :func:`staged` makes the sequence atomic: the model either ends
with all of the changes or with none of them.

How: every change ``load`` makes is structural. Fusion adds children (``to_qkv``), drops others, sets
``fused_projections`` and attention processors; replacement swaps a child for a new module. None of them
writes into an existing parameter or buffer. So a snapshot of each module's ``__dict__`` (one level deep:
the ``_modules`` / ``_parameters`` / ``_buffers`` / hook dicts are copied, the tensors in them are not) is
enough to undo everything, at no memory cost beyond the dicts. The original layers stay referenced by the
snapshot until the transaction ends, so peak memory is the float model plus the quantized layers built
so far.

The snapshot also records each tensor's version counter (bumped by every in-place write). If a failed
stage wrote into a tensor in place (which the structure snapshot cannot undo), the re-raised exception
carries a note naming the tensors, rather than silently claiming a clean rollback.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> first = model[0]
    >>> try:
    ...     with staged(model):
    ...         model[0] = nn.Identity()
    ...         raise RuntimeError("calibration failed")
    ... except RuntimeError:
    ...     pass
    >>> model[0] is first
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Containers in a module's __dict__ that the staged steps mutate in place; copied one level deep.
_COPIED = (dict, list, set)


def _copy_state(module: nn.Module) -> dict[str, Any]:
    return {k: (type(v)(v) if isinstance(v, _COPIED) else v) for k, v in module.__dict__.items()}


class Transaction:
    """A snapshot of a module tree's structure; :meth:`rollback` restores it, :meth:`commit` drops it."""

    def __init__(self, root: nn.Module):
        self.root = root
        self._saved = [(m, _copy_state(m)) for m in root.modules()]
        self._versions = {name: (t, t._version) for name, t in _named_tensors(root)}

    def rollback(self) -> list[str]:
        """Put every module of the snapshot back; returns the tensors that were written in place (not undone)."""
        for module, state in self._saved:
            module.__dict__.clear()
            module.__dict__.update({k: (type(v)(v) if isinstance(v, _COPIED) else v) for k, v in state.items()})
        return [name for name, (t, version) in self._versions.items() if t._version != version]

    def commit(self) -> None:
        """Keep the changes; the snapshot (and the references it held to replaced layers) is released."""
        self._saved, self._versions = [], {}


def _named_tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from root.named_parameters(remove_duplicate=True)
    yield from root.named_buffers(remove_duplicate=True)


@contextlib.contextmanager
def staged(root: nn.Module) -> Iterator[Transaction]:
    """Run the block's changes to ``root`` as one transaction: on any exception, undo them and re-raise.

    The exception propagates unchanged (with a note only if a tensor was written in place, which a
    rollback cannot undo). KeyboardInterrupt rolls back too.
    """
    tx = Transaction(root)
    try:
        yield tx
    except BaseException as e:
        dirty = tx.rollback()
        if dirty:
            e.add_note(f"lowbit_engine: rolled back the model structure, but these tensors were written in "
                       f"place and keep their new values: {', '.join(dirty[:5])}"
                       f"{' ...' if len(dirty) > 5 else ''}")
        raise
    else:
        tx.commit()


__all__ = ["Transaction", "staged"]
