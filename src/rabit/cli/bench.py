"""`rabit bench {gemv,decode}`: kernel and end-to-end decoding benchmarks (markdown tables of medians).

decode: a Llama with random weights (default: hidden 2048, intermediate 5632, 8 layers, 16 heads, 4 KV heads,
vocab 49152), prompt of `prompt_len` random tokens, then `new_tokens` greedy tokens timed one by one. Engines,
interleaved round by round so that every figure sees the same machine load:

  rabit        every linear of the blocks and lm_head packed 2-bit (PackedRaBiTLinear, native CPU kernel; random
               sign planes and fp16 scales, sharing the fp32 model's embeddings and norms)
  rabit-int8   the same as rabit through the "cpu_int8" backend (int8 lookup tables, table entries rounded per 64
               inputs, like llama.cpp's Q8_K activations; relative error ~5e-3)
  rabit-fphead the same with lm_head kept in fp32
  fp32         the same random model in fp32 PyTorch (nn.Linear)
  (all three run through rabit.generate.StaticDecoder: static KV cache, same Python loop)
  f16 / q2_k / tq2_0   llama.cpp (llama-bench -p 0 -n N -d P -t T) on GGUF files of the same weights, made with
               convert_hf_to_gguf.py + llama-quantize (tools built by benchmarks/build_llama_cpp.sh)

tokens/s of one run = timed tokens / their total time (the first token, produced by the prefill, is not counted);
each figure is the median over `reps` runs (after one warm-up round).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..decode_bench import TORCH_ENGINES   # one list for the CLI and the engine processes

BENCH_SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=4, vocab=49152)
LLAMA_ENGINES = {"f16": "F16", "q2_k": "Q2_K", "tq2_0": "TQ2_0"}
DEFAULT_ENGINES = "rabit,fp32,q2_k,tq2_0"


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmarks: batch-1 GEMV kernel (gemv) or end-to-end decoding (decode)")
    bs = p.add_subparsers(dest="bench", required=True)

    g = bs.add_parser("gemv", help="packed 2-bit GEMV vs fp32 F.linear vs memory copy")
    g.add_argument("--runs", type=int, default=30)
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--k", type=int, default=2, help="number of binary paths")
    g.add_argument("--backend", default="cpu")
    g.add_argument("--shapes", default=None, help="comma-separated OUTxIN (default: the benchmark's own)")
    g.add_argument("--json", default=None, help="also write the rows to this JSON file")

    d = bs.add_parser("decode", help="end-to-end decoding tokens/s: rabit 2-bit vs fp32 PyTorch vs llama.cpp")
    for k, v in BENCH_SHAPE.items():
        d.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--new-tokens", type=int, default=128, help="timed tokens per run")
    d.add_argument("--fp32-new-tokens", type=int, default=32,
                   help="timed tokens per fp32 run (default 32: 20 runs of 128 fp32 tokens alone take ~7 minutes "
                        "on 2 cores; the per-token cost of fp32 decoding is its 1.8 GB of weights, not the context)")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--reps", type=int, default=20, help="runs per engine (median)")
    d.add_argument("--llama-reps", type=int, default=None, help="runs per llama.cpp format (default: --reps)")
    d.add_argument("--engines", default=DEFAULT_ENGINES,
                   help=f"comma list of {', '.join(TORCH_ENGINES + tuple(LLAMA_ENGINES))} (default {DEFAULT_ENGINES})")
    d.add_argument("--compile", action="store_true", help="torch.compile the decoding step of the torch engines")
    d.add_argument("--llama-cpp-dir", default=None,
                   help="llama.cpp folder with src/ and build/bin/ (default: third_party/llama.cpp of the checkout)")
    d.add_argument("--work-dir", default=None, help="where the GGUF files go (default: third_party/bench_models)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--omp-wait-policy", default="engine", choices=["engine", "passive", "active", "inherit"],
                   help="OMP_WAIT_POLICY of each engine's processes: 'engine' (default) gives each engine its best "
                        "(rabit/fp32 ACTIVE, llama.cpp its own default), 'passive'/'active' set it for all, "
                        "'inherit' leaves the environment alone. Every run is its own process, and the "
                        "benchmark's own process runs PASSIVE so that none of its threads spin meanwhile")
    d.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


# ---------------------------------------------------------------------------------------------------- gemv
def _run_gemv(args) -> int:
    from .. import bench

    shapes = getattr(bench, "DEFAULT_SHAPES", None)
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
        except ValueError:
            raise ValueError(f"--shapes must look like 4096x4096,11008x4096, got {args.shapes!r}") from None
    rows = bench.run_gemv_bench(shapes, num_paths=args.k, threads=args.threads, runs=args.runs,
                                warmup=args.warmup, backend=args.backend)
    print(bench.format_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


# -------------------------------------------------------------------------------------------------- models
def make_random_llama(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=4, vocab=49152, seed=0,
                      max_positions=4096):
    """A LlamaForCausalLM with random weights (fp32, eval mode, untied lm_head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, v in dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                        vocab=vocab).items():
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}), heads of kv-heads ({kv_heads})")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def packed_copy(model, quantize_head: bool = True, scale_dtype=None, seed: int = 0):
    """The same architecture with every linear (and lm_head if quantize_head) a PackedRaBiTLinear holding random
    sign planes and scales; the other tensors (embeddings, norms) are shared with `model`, not copied.

    Decoding speed does not depend on the values, and this takes seconds where quantize_ + pack_model_ of a
    1.8 GB fp32 model takes minutes on 2 cores (rabit.quantize_ -> pack_model_ is what a real model goes through).
    """
    import copy

    import torch
    from torch import nn

    from ..packed_layer import PackedRaBiTLinear

    gen = torch.Generator().manual_seed(seed + 1)
    head = model.get_output_embeddings()
    memo = {}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and (quantize_head or mod is not head):
            q = PackedRaBiTLinear(mod.in_features, mod.out_features, num_paths=2, bias=mod.bias is not None,
                                  scale_dtype=scale_dtype or torch.float16)
            with torch.no_grad():
                q.packed.copy_(torch.randint(0, 256, q.packed.shape, dtype=torch.uint8, generator=gen))
                scale = mod.weight.std().item()
                q.g.copy_(torch.rand(q.g.shape, generator=gen) * scale + 0.5 * scale)
                q.h.copy_(torch.rand(q.h.shape, generator=gen) + 0.5)
                q.g[1] *= 0.3
                if mod.bias is not None:
                    q.bias.copy_(mod.bias)
            memo[id(mod)] = q
        else:
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                memo[id(t)] = t
    return copy.deepcopy(model, memo).eval()


# --------------------------------------------------------------------------------------------- llama.cpp
def repo_root() -> Path:
    """The checkout this package runs from (the folder holding pyproject.toml above src/rabit/cli/), or the
    working directory for an installed copy: where third_party/ lives."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists() and (parent / "src" / "rabit").is_dir():
            return parent
    return Path.cwd()


def llama_cpp_tools(llama_dir: Path) -> dict:
    bin_dir = llama_dir / "build" / "bin"
    tools = {n: bin_dir / n for n in ("llama-bench", "llama-quantize")}
    missing = [str(p) for p in tools.values() if not p.exists()]
    conv = llama_dir / "src" / "convert_hf_to_gguf.py"
    if missing or not conv.exists():
        raise FileNotFoundError(
            f"llama.cpp tools not found ({', '.join(missing) or conv}); build them with "
            f"`bash benchmarks/build_llama_cpp.sh` (about 6 minutes) or pass --llama-cpp-dir")
    tools["convert"] = conv
    return tools


def _bench_tokenizer_folder(vocab: int) -> Path:
    """A tokenizer that llama.cpp's converter recognizes, with at most `vocab` tokens (SmolLM2's: 49152)."""
    from ..models import default_model_folder

    folder = default_model_folder()
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = list(tok.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in tok.get("added_tokens", [])]
    n = max(ids) + 1 if ids else 0
    if n > vocab:
        raise ValueError(f"the llama.cpp comparison uses SmolLM2's tokenizer ({n} tokens): --vocab must be >= {n}")
    return folder


def prepare_gguf(model, shape: dict, seed: int, formats: list[str], llama_dir: Path, work_dir: Path,
                 log=print) -> dict[str, Path]:
    """GGUF files (F16 and the requested quantizations) of `model`, cached under work_dir by shape and seed."""
    tools = llama_cpp_tools(llama_dir)
    tag = "llama_" + "_".join(f"{k}{v}" for k, v in shape.items()) + f"_seed{seed}"
    d = work_dir / tag
    d.mkdir(parents=True, exist_ok=True)
    f16 = d / "model-F16.gguf"
    if not f16.exists():
        hf = d / "hf"
        if not (hf / "model.safetensors").exists() or not (hf / "tokenizer.json").exists():
            tokdir = _bench_tokenizer_folder(shape["vocab"])
            log(f"saving the random fp32 model to {hf}")
            tmp = d / "hf.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tokdir / name).exists():
                    shutil.copy(tokdir / name, tmp / name)
            shutil.rmtree(hf, ignore_errors=True)
            os.replace(tmp, hf)
        paths = [str(llama_dir / "src" / "gguf-py")]
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            # the converter imports sentencepiece before noticing there is no tokenizer.model (our tokenizer is
            # BPE, tokenizer.json): a stub module is enough
            stub = work_dir / "stubs"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "sentencepiece.py").write_text(
                "class SentencePieceProcessor:\n"
                "    def __init__(self, *a, **k):\n"
                "        raise ImportError('sentencepiece is not installed (stub)')\n")
            paths.append(str(stub))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        log("converting to GGUF F16 (convert_hf_to_gguf.py)")
        r = subprocess.run([sys.executable, str(tools["convert"]), str(hf), "--outtype", "f16",
                            "--outfile", str(f16) + ".tmp"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
        os.replace(str(f16) + ".tmp", f16)
        shutil.rmtree(hf, ignore_errors=True)
    out = {"F16": f16}
    for fmt in formats:
        if fmt == "F16":
            continue
        q = d / f"model-{fmt}.gguf"
        if not q.exists():
            log(f"llama-quantize -> {fmt}")
            r = subprocess.run([str(tools["llama-quantize"]), str(f16), str(q) + ".tmp", fmt],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"llama-quantize {fmt} failed:\n{r.stderr[-3000:]}")
            os.replace(str(q) + ".tmp", q)
        out[fmt] = q
    return out


def _llama_bench_flags(bench: Path) -> str:
    r = subprocess.run([str(bench), "--help"], capture_output=True, text=True)
    return r.stdout + r.stderr


def llama_bench_once(bench: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int,
                     flags_text: str, env: dict | None = None, extra_args=()) -> float:
    """tokens/s of one llama-bench generation run of `new_tokens` after a `prompt_len`-token context.

    Raises decode_bench.EngineFailed when llama-bench fails or crashes."""
    from ..decode_bench import EngineFailed, run_engine_process

    cmd = [str(bench), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", "1",
           "-o", "json"]
    if "--n-depth" in flags_text or "-d," in flags_text:
        cmd += ["-d", str(prompt_len)]
    cmd += [str(a) for a in extra_args]
    # keep llama-bench's warm-up run: it pages the mmapped weights in, as each torch engine process warms up
    out = run_engine_process(cmd, dict(os.environ) if env is None else env)
    try:
        rows = json.loads(out[out.index("["):])
        row = [x for x in rows if x.get("n_gen", 0) > 0][0]
    except (ValueError, IndexError) as e:
        raise EngineFailed(f"unreadable llama-bench output: {out[-500:]!r}") from e
    samples = row.get("samples_ts") or [row["avg_ts"]]
    return float(samples[0])


REPACK_OFF = ("--repack", "0")


def llama_bench_with_fallback(bench: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int,
                              flags_text: str, env: dict | None, extra_args: list, log=print) -> float:
    """llama_bench_once with `extra_args` (a list the caller keeps per engine). When llama-bench dies of SIGILL and
    has --repack, it runs again with --repack 0, which is added to extra_args for the engine's later runs: llama.cpp's
    repacked CPU paths can execute instructions a machine's OS does not allow (on a 2-core Intel Xeon VM with AMX,
    Q4_1 died there while TQ2_0, which has no such path, ran; docs/RESULTS.md section 38)."""
    from ..decode_bench import EngineFailed

    try:
        return llama_bench_once(bench, gguf, prompt_len, new_tokens, threads, flags_text, env, extra_args)
    except EngineFailed as e:
        if "SIGILL" not in str(e) or "--repack" not in flags_text or REPACK_OFF[0] in extra_args:
            raise
        log(f"  {Path(gguf).name}: llama-bench died of SIGILL in its repacked CPU path; again with --repack 0, "
            f"and so from now on")
        extra_args.extend(REPACK_OFF)
        return llama_bench_once(bench, gguf, prompt_len, new_tokens, threads, flags_text, env, extra_args)


# ------------------------------------------------------------------------------------------------- decode
def _torch_run(decoder, prompt, timed: int) -> float:
    from ..generate import decode_tokens

    res = decode_tokens(decoder, prompt, timed + 1)   # the first token comes from the prefill, untimed
    return len(res.step_times) / res.decode_s


def run_decode_bench(shape: dict | None = None, prompt_len: int = 128, new_tokens: int = 128,
                     fp32_new_tokens: int | None = None, threads: int = 2, reps: int = 20,
                     llama_reps: int | None = None, engines=DEFAULT_ENGINES, compile: bool = False,
                     llama_cpp_dir: str | None = None, work_dir: str | None = None, seed: int = 0,
                     log=print, omp_wait_policy: str = "engine") -> dict:
    """Interleaved end-to-end decoding benchmark, every run in its own process (rabit.decode_bench); returns
    {"rows": [...], "failed": {engine: reason}, "config": {...}}. An engine that fails is dropped from later
    rounds and reported; the others go on."""
    from ..decode_bench import EngineFailed, engine_env, torch_engine_once

    shape = dict(BENCH_SHAPE if shape is None else shape)
    names = [e.strip().lower() for e in (engines.split(",") if isinstance(engines, str) else engines) if e.strip()]
    for e in names:
        if e not in TORCH_ENGINES and e not in LLAMA_ENGINES:
            raise ValueError(f"unknown engine {e!r}; choose from {', '.join(TORCH_ENGINES + tuple(LLAMA_ENGINES))}")
    if reps < 1 or prompt_len < 1 or new_tokens < 1 or threads < 1:
        raise ValueError("--reps, --prompt-len, --new-tokens and --threads must be >= 1")
    llama_reps = reps if llama_reps is None else llama_reps
    fp32_new = fp32_new_tokens or new_tokens
    t0 = time.time()
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"] or min(shape.values()) < 1:
        raise ValueError(f"bad model shape {shape}: sizes must be >= 1, hidden a multiple of heads, heads of "
                         "kv-heads")
    info = {}
    gguf = {}
    llama_names = [n for n in names if n in LLAMA_ENGINES]
    if llama_names:
        import torch

        torch.set_num_threads(threads)
        root = repo_root()
        llama_dir = Path(llama_cpp_dir) if llama_cpp_dir else root / "third_party" / "llama.cpp"
        wd = Path(work_dir) if work_dir else root / "third_party" / "bench_models"
        log(f"building a random Llama {shape} for the GGUF files ...")
        base = make_random_llama(**shape, seed=seed, max_positions=max(4096, prompt_len + new_tokens + 8))
        files = prepare_gguf(base, shape, seed, [LLAMA_ENGINES[n] for n in llama_names], llama_dir, wd, log)
        del base
        gguf = {n: files[LLAMA_ENGINES[n]] for n in llama_names}
        bench_bin = llama_cpp_tools(llama_dir)["llama-bench"]
        flags_text = _llama_bench_flags(bench_bin)
        for n in llama_names:
            info[n] = {"file_bytes": gguf[n].stat().st_size}
    for n in names:
        if n in TORCH_ENGINES:
            info[n] = {"bits_per_weight": _bits_per_weight(shape, n)}
    envs = {n: engine_env(n, omp_wait_policy) for n in names}
    for n in names:
        info[n]["omp_wait_policy"] = envs[n].get("OMP_WAIT_POLICY", "unset")

    llama_args: dict[str, list] = {}

    def once(n: str) -> float:
        if n in TORCH_ENGINES:
            spec = {"engine": n, "shape": shape, "seed": seed, "prompt_len": prompt_len, "threads": threads,
                    "new_tokens": fp32_new if n == "fp32" else new_tokens, "compile": compile}
            return torch_engine_once(spec, envs[n])
        args = llama_args.setdefault(n, [])
        value = llama_bench_with_fallback(bench_bin, gguf[n], prompt_len, new_tokens, threads, flags_text, envs[n],
                                          args, log)
        if args:
            info[n]["llama_args"] = " ".join(args)
        return value

    log(f"setup {time.time() - t0:.0f} s; {max(reps, llama_reps)} interleaved rounds, one process per run ...")
    samples = {n: [] for n in names}
    failed: dict[str, str] = {}
    for r in range(max(reps, llama_reps)):
        for n in names:
            if n in failed or r >= (llama_reps if n in LLAMA_ENGINES else reps):
                continue
            try:
                samples[n].append(once(n))
            except EngineFailed as e:
                failed[n] = str(e)
                log(f"  {n} FAILED (dropped from the benchmark): {e}")
        log(f"  round {r + 1}: " + ", ".join(f"{n} {samples[n][-1]:.1f}" for n in names if samples[n]
                                             and n not in failed))
    rows = []
    for n in names:
        s = sorted(samples[n])
        if n in failed or not s:
            continue
        rows.append({"engine": n, "median_tok_s": statistics.median(s), "min": s[0], "max": s[-1], "runs": len(s),
                     "timed_tokens": fp32_new if n == "fp32" else new_tokens, **info.get(n, {})})
    ref = next((r["median_tok_s"] for r in rows if r["engine"] == "fp32"), None)
    for row in rows:
        row["speedup_vs_fp32"] = row["median_tok_s"] / ref if ref else None
    return {"rows": rows, "failed": failed,
            "config": {"shape": shape, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "fp32_new_tokens": fp32_new, "threads": threads, "reps": reps, "llama_reps": llama_reps,
                       "compile": compile, "seed": seed, "omp_wait_policy": omp_wait_policy,
                       "load_average": os.getloadavg(), "seconds": time.time() - t0}}


def _bits_per_weight(shape: dict, engine: str) -> float:
    """Bits per weight of the quantized layers of a torch engine (as serialization.bits_per_weight counts)."""
    if engine == "fp32":
        return 32.0
    import torch

    from ..packed_layer import PackedRaBiTLinear
    from ..serialization import bits_per_weight

    d, f, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * d // shape["heads"]
    dims = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    layers = [PackedRaBiTLinear(i, o, 2, device="meta") for o, i in dims * shape["layers"]]
    if engine != "rabit-fphead":
        layers.append(PackedRaBiTLinear(d, v, 2, device="meta"))
    return bits_per_weight(torch.nn.ModuleList(layers))


ENGINE_LABELS = {"rabit": "rabit 2-bit (blocks + lm_head packed)",
                 "rabit-int8": "rabit 2-bit, int8 lookup tables (cpu_int8)",
                 "rabit-fphead": "rabit 2-bit, fp32 lm_head",
                 "fp32": "PyTorch fp32", "f16": "llama.cpp F16", "q2_k": "llama.cpp Q2_K",
                 "tq2_0": "llama.cpp TQ2_0"}


def format_decode_table(result: dict) -> str:
    lines = ["| engine | tokens/s (median) | min - max | runs | vs fp32 | size |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        size = (f"{r['bits_per_weight']:.3f} bits/weight (quantized layers)" if "bits_per_weight" in r
                and r["engine"] != "fp32" else
                f"{r['file_bytes'] / 2**20:.0f} MiB GGUF" if "file_bytes" in r else "fp32")
        sp = f"{r['speedup_vs_fp32']:.2f}x" if r.get("speedup_vs_fp32") else "-"
        lines.append(f"| {ENGINE_LABELS.get(r['engine'], r['engine'])} | {r['median_tok_s']:.1f} | "
                     f"{r['min']:.1f} - {r['max']:.1f} | {r['runs']} x {r['timed_tokens']} tok | {sp} | {size} |")
    for engine, why in result.get("failed", {}).items():
        lines.append(f"| {ENGINE_LABELS.get(engine, engine)} | FAILED: {why.splitlines()[0][:120]} | | | | |")
    c = result["config"]
    lines.append("")
    lines.append(f"Llama {c['shape']}, prompt {c['prompt_len']} tokens, {c['threads']} threads, "
                 f"compile={c['compile']}, OMP_WAIT_POLICY: "
                 + ", ".join(f"{r['engine']} {r.get('omp_wait_policy', 'unset')}" for r in result["rows"])
                 + "".join(f"; {r['engine']} with llama-bench {r['llama_args']}" for r in result["rows"]
                           if r.get("llama_args"))
                 + f"; interleaved rounds, one process per run; total {c['seconds']:.0f} s.")
    return "\n".join(lines)


_DECODE_OPTS = ["hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "prompt_len", "new_tokens",
                "fp32_new_tokens", "threads", "reps", "llama_reps", "engines", "llama_cpp_dir", "work_dir", "seed",
                "json"]


def _run_decode(args) -> int:
    llama = any(e.strip().lower() in LLAMA_ENGINES for e in args.engines.split(","))
    if llama and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # This process builds the GGUF files with torch; libgomp reads OMP_WAIT_POLICY once, when torch loads
        # it: re-run this orchestrating process PASSIVE, so that its OpenMP threads sleep while llama.cpp runs
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RABIT_BENCH_CALLER_OMP_WAIT_POLICY=os.environ.get(
            "OMP_WAIT_POLICY", ""))
        return subprocess.run([sys.executable, "-m", "rabit", "bench", "decode", *_decode_argv(args)],
                              env=env).returncode
    shape = {k: getattr(args, k) for k in BENCH_SHAPE}
    outer = os.environ.get("RABIT_BENCH_CALLER_OMP_WAIT_POLICY")
    if args.omp_wait_policy == "inherit" and outer is not None:
        os.environ["OMP_WAIT_POLICY"] = outer  # the engines inherit the caller's setting, not our PASSIVE
        if not outer:
            del os.environ["OMP_WAIT_POLICY"]
    result = run_decode_bench(shape, args.prompt_len, args.new_tokens, args.fp32_new_tokens, args.threads,
                              args.reps, args.llama_reps, args.engines, args.compile, args.llama_cpp_dir,
                              args.work_dir, args.seed, log=lambda s: print(s, file=sys.stderr, flush=True),
                              omp_wait_policy=args.omp_wait_policy)
    print(format_decode_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


def _decode_argv(args) -> list[str]:
    argv = []
    for k in _DECODE_OPTS:
        v = getattr(args, k)
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    if args.compile:
        argv.append("--compile")
    return argv + ["--omp-wait-policy", args.omp_wait_policy]


def run(args) -> int:
    if args.bench == "gemv":
        return _run_gemv(args)
    return _run_decode(args)
