"""`rabit verify PATH`: check a saved model folder, a checkpoint, or a run folder (every checkpoint in it)
against the checksums written with them; prints what is intact and what is not. Exit code 0 if nothing is
damaged, 1 otherwise (with --strict, also when something was saved before checksums existed)."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("verify", help="check saved models and checkpoints against their checksums",
                       description="Check a folder written by rabit.save_quantized, a training checkpoint, or a "
                                   "run folder of `rabit quantize` (every checkpoint, the final state dict and the "
                                   "packed model) against the checksums saved with them. Exit code 0 when "
                                   "everything is intact, 1 when anything is damaged.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="model folder, checkpoint folder or run folder")
    p.add_argument("--strict", action="store_true",
                   help="also fail (exit 1) on folders saved before checksums existed, which cannot be verified")
    return p


def run(args) -> int:
    from ..integrity_checkpoints import verify_path

    status = 0
    for path in args.paths:
        try:
            reports = verify_path(path)
        except (FileNotFoundError, ValueError) as e:
            print(f"NOT CHECKED {path}: {e}", flush=True)
            status = 1
            continue
        for report in reports:
            print(report.summary(), flush=True)
            if not report.ok or (args.strict and not report.verified):
                status = 1
    return status
