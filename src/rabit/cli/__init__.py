"""The `rabit` command line: one sub-command per module of this package (each exposing add_parser and run)."""
from __future__ import annotations

import argparse
import sys

from . import ablate, bench, diagnose, generate, ptq, quantize, verify
from . import eval as evaluate

# Sub-command modules, in the order `rabit --help` lists them.
COMMANDS = {"quantize": quantize, "ptq": ptq, "eval": evaluate, "generate": generate, "bench": bench,
            "diagnose": diagnose, "ablate": ablate, "verify": verify}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rabit", description="2-bit LLM compression with RaBiT")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMANDS.values():
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Bad input (rabit.errors.INPUT_ERRORS) is one line on stderr and exit status 2
    (RABIT_DEBUG=1 shows its traceback); any other exception propagates with its traceback (status 1)."""
    from ..errors import INPUT_ERRORS

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except INPUT_ERRORS as e:
        import os

        if os.environ.get("RABIT_DEBUG"):
            raise
        print(f"rabit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
