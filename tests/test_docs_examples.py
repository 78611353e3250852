"""Every ```python block of README.md and docs/*.md: checked for undefined names, and run.

Convention: an HTML comment on the line right above the fence marks a block that cannot run here,
``<!-- example: needs-gpu -->`` (a CUDA GPU) or ``<!-- example: needs-model -->`` (a downloaded model or
file); both may be given (``<!-- example: needs-model needs-gpu -->``). A marked block is still compiled
and must define every name it uses (imports included); it runs where it can (a needs-gpu block on a GPU).
Every other block runs in a fresh namespace in an empty folder, so it may write files.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*example:\s*(?P<tags>[\w\- ]+?)\s*-->")
TAGS = {"needs-gpu", "needs-model"}


def _blocks() -> list[tuple[str, int, str, set[str]]]:
    """(file name, line of the fence, code, tags) of every python block."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i
                i += 1
                body = []
                while lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                m = MARKER.fullmatch(lines[start - 1].strip()) if start else None
                tags = set(m["tags"].split()) if m else set()
                found.append((doc.name, start + 1, "\n".join(body) + "\n", tags))
            i += 1
    return found


BLOCKS = _blocks()


def _undefined_names(code: str) -> set[str]:
    """Names a block loads that it never binds (imports, assignments, defs, arguments, loop targets)."""
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound


def test_the_docs_have_examples_and_markers_are_known():
    assert len(BLOCKS) >= 10, [b[:2] for b in BLOCKS]
    for name, line, _, tags in BLOCKS:
        assert tags <= TAGS, f"{name}:{line}: unknown example tags {tags - TAGS}; known: {sorted(TAGS)}"
    assert _undefined_names("import torch\nx = torch.ones(1)\nprint(x, y)\n") == {"y"}  # the check can fail


@pytest.mark.parametrize("name,line,code,tags", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_doc_example(name, line, code, tags, tmp_path, monkeypatch):
    missing = _undefined_names(code)
    assert not missing, f"{name}:{line}: the example uses names it never defines or imports: {sorted(missing)}"
    compile(code, f"{name}:{line}", "exec")
    if "needs-model" in tags:
        pytest.skip("needs a downloaded model or file (checked: it compiles and defines its names)")
    if "needs-gpu" in tags and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (checked: it compiles and defines its names)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__doc_example__"})
