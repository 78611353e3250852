"""``lowbit-engine bench kernels``: time every kernel against cuBLAS, print a table, write JSON, draw a chart.

Example:
    $ lowbit-engine bench kernels --out bench/results/kernels.json --plot kernels.png     # a GPU run
    $ lowbit-engine bench kernels --from bench/results/kernels-h100-2026-11-23.json --plot k.png   # redraw
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli_common import UserError, check_device, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: every kernel against cuBLAS bf16 and fp8")
    p.add_argument("what", choices=["kernels"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--m", type=positive_int, nargs="+", help="token counts (default 4608 256 16 on a GPU)")
    p.add_argument("--repeat", type=positive_int, default=50)
    p.add_argument("--kernels", nargs="+", help="only kernels whose name contains one of these (the cuBLAS "
                                                "baselines always run on a GPU)")
    p.add_argument("--include-reference", action="store_true", help="also time torch-reference fallbacks")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--plot", help="draw the ratios and the roofline into this PNG (needs matplotlib)")
    p.add_argument("--from", dest="from_json", metavar="JSON",
                   help="do not run: read a report written by --out (e.g. bench/results/*.json)")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    p.set_defaults(func=run)


def _read_report(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--from {path}: no such file (expected a JSON report from `bench kernels --out`)")
    try:
        report = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--from {path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise UserError(f"--from {path}: expected a report with a 'results' list, as `bench kernels --out` writes")
    return report


def run(args: argparse.Namespace) -> int:
    from . import benchmark

    if args.plot:  # before a run of minutes: the chart must be drawable at its end
        from .viz import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as e:
            raise UserError(str(e)) from e
    if args.from_json:
        if args.out or args.m or args.kernels or args.device:
            raise UserError("--from redraws a saved report; it takes no --out, --m, --kernels or --device")
        report = _read_report(args.from_json)
    else:
        device = check_device(args.device)
        if args.plot and not device.startswith("cuda"):
            raise UserError("--plot draws kernels against cuBLAS, which a CPU run does not time; on the CPU, "
                            "redraw a GPU run instead: --from bench/results/kernels-h100-2026-11-23.json --plot FILE")
        shapes = [(m, k, n) for m in args.m for (k, n) in benchmark.FLUX_KN] if args.m else None
        if not device.startswith("cuda"):
            print(f"# {benchmark.CPU_NOTE}")
        report = benchmark.run(device=device, shapes=shapes, repeat=args.repeat,
                               include_reference=args.include_reference, kernels=args.kernels,
                               verbose=args.verbose, progress=True)
    if not args.verbose or args.from_json:
        print(benchmark.format_table(report))
    else:  # --verbose printed the rows as they came: only the run's title line is left to say
        print(benchmark.format_title(report))
    if args.out:
        print(f"wrote {benchmark.save(report, args.out)}")
    if args.plot:
        from .viz import plot_kernels

        try:
            print(f"wrote {plot_kernels(report, args.plot)}")
        except ValueError as e:  # a report without cuBLAS rows: say so in one line
            raise UserError(f"--plot: {e}") from e
    return 0
