"""One W4 GEMM call per mode at a FLUX shape, for profilers (ncu / nsys) to attach to.

    ncu --kernel-name regex:gemm_w4 --launch-skip 1 --launch-count 1 python3 bench/profile_gemm_w4.py int4
Modes: int4 (W4A4), int8 / fp8 (W4A8 tokens). Env LOWBIT_GEMM_W4_KERNEL picks mma / wgmma where both apply.
"""

from __future__ import annotations

import sys

import torch

from lowbit_engine import ops
from lowbit_engine.formats import int4


def main(mode: str, M: int = 4608, K: int = 3072, N: int = 3072, rank: int = 32) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
    qw, sw = int4.quantize(torch.randn(N, K, generator=g, device="cuda") * 0.02, scale_dtype=torch.bfloat16)
    down = (torch.randn(rank, K, generator=g, device="cuda") / K**0.5).to(torch.bfloat16)
    up = (torch.randn(N, rank, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    q, s, la = ops.quantize_act(x, torch.ones(K, device="cuda"), down, mode)
    gemm = ops.gemm_w4a4 if mode == "int4" else ops.gemm_w4a8
    for _ in range(2):  # the first call warms up; profile the second (--launch-skip 1)
        gemm(q, s, int4.pack(qw), sw, la, up, None)
    torch.cuda.synchronize()
    print(mode, ops.last_backend("gemm_w4a4" if mode == "int4" else "gemm_w4a8"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "int4")
