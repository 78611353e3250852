"""The ``lowbit-engine`` command: ``info``, ``quantize``, ``demo``, ``bench kernels`` and ``plan``.

Each subcommand lives in its own module (``cli_quantize``, ``cli_demo``, ``cli_bench``, ``plan``) with a
``register(subparsers)`` function; :func:`main` registers them one line each, shows the library's log
(the load report) at INFO, and turns the errors a user makes into one line and exit status 2
(``--debug`` shows the traceback).

Example:
    $ lowbit-engine info
    $ lowbit-engine quantize ./my-flux --fmt svdq-int4 --calib prompts.txt --out ./my-flux-int4
    $ lowbit-engine demo --out pictures/
    $ lowbit-engine bench kernels --plot kernels.png
    $ lowbit-engine plan --model flux-dev --fmt svdq-w4a8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Iterator

from .cli_common import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (usage is one ``--help`` away) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _info(_: argparse.Namespace) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def _register_info(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="print what was built").set_defaults(func=_info)


def _version() -> str:
    from . import __version__

    return f"lowbit-engine {__version__}"


@contextlib.contextmanager
def _show_library_log() -> Iterator[None]:
    """The ``lowbit_engine`` logger at INFO to stdout for the duration of a command, then as it was."""
    log = logging.getLogger("lowbit_engine")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the handler above prints it once; an application's root handler would repeat it
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def build_parser() -> argparse.ArgumentParser:
    from . import cli_bench, cli_demo, cli_quantize, plan

    parser = _Parser(prog="lowbit-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,quantize,demo,bench,plan}")
    _register_info(sub)
    cli_quantize.register(sub)
    cli_demo.register(sub)
    cli_bench.register(sub)
    plan.add_parser(sub)
    for p in sub.choices.values():  # --debug after the subcommand too (SUPPRESS: not reset when absent)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Errors in what was asked (:class:`~lowbit_engine.cli_common.UserError`, and the library's input errors:
    an unknown format, a checkpoint that does not fit, a missing file) print one line to stderr and return 2.
    """
    from .errors import CheckpointError, UnknownFormatError

    args = build_parser().parse_args(argv)
    try:
        with _show_library_log():
            return args.func(args)
    except (UserError, UnknownFormatError, CheckpointError, FileNotFoundError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"lowbit-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
