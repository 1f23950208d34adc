"""The `rabit` command line: one sub-command per module (rabit/cli_<name>.py exposing add_parser and run)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `rabit --help` lists them.
COMMANDS = ["quantize", "ptq", "eval", "generate", "bench", "diagnose", "ablate", "verify"]


def _load(name: str):
    try:
        return importlib.import_module(f"rabit.cli_{name}")
    except ModuleNotFoundError as e:
        if e.name == f"rabit.cli_{name}":
            return None  # that sub-command is not part of this build
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rabit", description="2-bit LLM compression with RaBiT")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = _load(name)
        if mod is not None:
            p = mod.add_parser(sub)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input: one clear line, no traceback (RABIT_DEBUG=1 shows it).
        import os

        if os.environ.get("RABIT_DEBUG"):
            raise
        print(f"rabit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
