"""SASS census of the persistent sm_90a 8-bit GEMM (csrc/cuda/gemm8_sm90.cu), offline: no GPU needed.

Compiles the source for sm_90a (nvcc -cubin), disassembles it (cuobjdump -sass; Triton's wheel ships one),
finds each kernel's main loop -- the innermost backward branch whose body holds 8-bit wgmma (QGMMA /
IGMMA) instructions -- and counts its instructions by opcode: MMAs per loop trip (one trip = one
128-deep K stage), and the non-MMA instructions per MMA that the consumer warps issue beside them. The
issue-slot budget (docs/kernels.md): a QGMMA.64x128x32 keeps one SM's tensor cores busy for about 64 issue
cycles of its warpgroup, so the conversion work must stay well under that per MMA.

    python bench/sass_census_gemm8.py                 # table on stdout
    python bench/sass_census_gemm8.py --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "gemm8_sm90.cu"
MMA = re.compile(r"^(QGMMA|IGMMA|HGMMA|WGMMA)")
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
NAMES = {"Gemm8WeightsE0ELi128": "fp8 (gate), 128 tokens", "Gemm8WeightsE1ELi128": "F8L, 128 tokens",
         "Gemm8WeightsE1ELi32": "F8L, 32 tokens (split K)"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise SystemExit(f"sass_census_gemm8: no {name} (install triton or the CUDA toolkit)")


def disassemble() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "gemm8.cubin"
        subprocess.run([_tool("nvcc"), "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}", "-DLOWBIT_HAVE_SM90A",
                        "-gencode=arch=compute_90a,code=sm_90a", "-cubin", str(SRC), "-o", str(cubin)], check=True)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    out: dict[str, list[tuple[int, str, str]]] = {}
    name = None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            out[name] = []
            continue
        m = LINE.search(line)
        if m and name is not None:
            out[name].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def main_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The K-stage loop: the shortest backward-branch body that holds 8-bit MMAs (QGMMA / IGMMA). The unit
    loop around it also holds the epilogue's HGMMAs (the low-rank branch) and is not counted."""
    best: list[tuple[int, str, str]] = []
    for addr, op, args in ins:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for i in ins if target <= i[0] <= addr]
        if any(i[1].startswith(("QGMMA", "IGMMA")) for i in body) and (not best or len(body) < len(best)):
            best = body
    return best


def census(sass: str) -> list[dict]:
    rows = []
    for fname, ins in functions(sass).items():
        label = next((v for k, v in NAMES.items() if k in fname), None)
        if label is None:
            continue
        body = main_loop(ins)
        ops = collections.Counter(op.split(".")[0] for _, op, _ in body)
        mma = {op: n for op, n in collections.Counter(op for _, op, _ in body if MMA.match(op)).items()}
        n_mma = sum(mma.values())
        other = len(body) - n_mma
        rows.append({
            "kernel": label, "function": fname, "loop_instructions": len(body), "mma": mma,
            "mma_per_trip": n_mma, "non_mma_per_mma": round(other / n_mma, 2) if n_mma else None,
            "by_opcode": dict(ops.most_common()),
            "spill": sum(n for op, n in ops.items() if op in ("STL", "LDL")),
            "warpgroup_sync": ops.get("WARPGROUP", 0) + ops.get("WARPSYNC", 0),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the census as JSON here")
    args = ap.parse_args()
    rows = census(disassemble())
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["by_opcode"].items())[:14])
        print(f"{r['kernel']}: main loop {r['loop_instructions']} instructions, MMAs {r['mma']}, "
              f"{r['non_mma_per_mma']} non-MMA per MMA, local memory {r['spill']}\n    {top}")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": str(SRC.relative_to(ROOT)), "census": rows}, indent=1))


if __name__ == "__main__":
    main()
