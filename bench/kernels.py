"""Kernel microbenchmarks: every lowbit kernel vs cuBLAS bf16 and fp8 on FLUX.1 shapes.

Usage:
    python bench/kernels.py [--m 4608 256 16] [--out bench/results/kernels-<gpu>.json]

Same as ``lowbit-engine bench kernels``; see lowbit_engine/benchmark.py for what is timed and how.
"""

from __future__ import annotations

import sys

from lowbit_engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
