"""Where a decoding step of a saved model folder goes: milliseconds per one-token step with the decoder as `rabit
generate` builds it (StaticDecoder), with the native decoding ops (norms, attention) on and off, each whole and with
every packed GEMV replaced by a stub returning zeros (so "stubbed" = head + norms + attention + Python). Medians of
interleaved rounds in one process; 128-token prompt, --new-tokens timed steps.

    OMP_WAIT_POLICY=passive python benchmarks/folder_step_parts.py runs/demo/quantized
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # as rabit generate

import torch  # noqa: E402

from rabit.generate import StaticDecoder  # noqa: E402
from rabit.kernels import cpu  # noqa: E402
from rabit.models import load_model  # noqa: E402
from stub_plan import StubPlan  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("folder")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--rounds", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(args.threads)
model, _ = load_model(args.folder, device="cpu", verify=False)
prompt = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))


def decoder(native: bool, stub: bool) -> StaticDecoder:
    real = cpu.CpuLinearPlan
    if stub:
        cpu.CpuLinearPlan = StubPlan
    try:
        return StaticDecoder(model, 128 + args.new_tokens + 1, native_ops=native)
    finally:
        cpu.CpuLinearPlan = real


def ms_per_step(dec: StaticDecoder) -> float:
    dec.reset()
    dec.prefill(prompt)
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        dec.step(7)
    return (time.perf_counter() - t0) / args.new_tokens * 1e3


cases = {(n, s): decoder(n, s) for n in (True, False) for s in (False, True)}
times = {c: [] for c in cases}
with torch.inference_mode():
    for _ in range(args.rounds):
        for c, dec in cases.items():
            times[c].append(ms_per_step(dec))
print(f"{args.folder}: {args.threads} threads, {args.new_tokens} steps after a 128-token prompt, "
      f"medians of {args.rounds} rounds")
print("| decoding ops | whole step (ms) | GEMVs stubbed (ms) | tokens/s |\n|---|---:|---:|---:|")
for native in (True, False):
    whole, stub = statistics.median(times[(native, False)]), statistics.median(times[(native, True)])
    print(f"| {'native' if native else 'PyTorch'} | {whole:.2f} | {stub:.2f} | {1e3 / whole:.1f} |")
