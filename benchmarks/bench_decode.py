"""End-to-end batch-1 decoding: rabit 2-bit vs fp32 PyTorch vs llama.cpp Q2_K / TQ2_0, on a random Llama.

    python benchmarks/bench_decode.py                       # = rabit bench decode (defaults below)
    python benchmarks/bench_decode.py --engines rabit,fp32 --reps 20 --threads 2
    python benchmarks/bench_decode.py --engines rabit,rabit-fphead,fp32,f16,q2_k,tq2_0 --json out.json

Defaults: hidden 2048, intermediate 5632, 8 layers, 16 heads, 4 KV heads, vocab 49152; prompt 128 tokens,
128 timed new tokens, 2 threads, 20 interleaved runs per engine (median). The llama.cpp engines need the tools
built by benchmarks/build_llama_cpp.sh (third_party/llama.cpp) and make their GGUF files once under
third_party/bench_models (convert_hf_to_gguf.py F16 -> llama-quantize Q2_K / TQ2_0). See docs/INFERENCE.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rabit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
