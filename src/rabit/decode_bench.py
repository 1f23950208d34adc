"""Engine runs of `rabit bench decode`, each in its own process with that engine's own settings.

Why separate processes: every engine here uses OpenMP (torch, the rabit kernel, llama.cpp), and libgomp reads
OMP_WAIT_POLICY once, when it loads. With ACTIVE, idle OpenMP threads spin; a Python process that has run torch
code keeps such threads alive, and llama.cpp started as its child then competes with them for the same cores
(measured on a 2-core Intel machine: llama.cpp TQ2_0 at 58 tokens/s alone, 23-46 as a child of the old
in-process benchmark). So the benchmark's own process runs with OMP_WAIT_POLICY=PASSIVE (its threads sleep)
and only orchestrates; each timed run is a fresh process (`python -m rabit.decode_bench SPEC`, or llama-bench)
with the engine's environment; an engine that fails or crashes is reported and dropped from later rounds,
without stopping the others.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

TORCH_ENGINES = ("rabit", "rabit-int8", "rabit-fphead", "fp32")
# OMP_WAIT_POLICY per engine under --omp-wait-policy engine (the default). The torch engines were measured
# fastest with ACTIVE when running alone (74-76 vs 56-62 tokens/s, Intel, 2 cores); llama.cpp keeps its own
# default (the variable is removed from its environment).
ENGINE_WAIT_POLICY = {e: "ACTIVE" for e in TORCH_ENGINES}
WAIT_POLICIES = ("engine", "passive", "active", "inherit")
THP_ENV = "THP_MEM_ALLOC_ENABLE"   # PyTorch's CPU allocator: madvise(MADV_HUGEPAGE) on large allocations


class EngineFailed(RuntimeError):
    """One engine run failed (non-zero exit, signal, unreadable output)."""


def engine_env(engine: str, policy: str, base: dict | None = None) -> dict:
    """The environment of one run of `engine` under --omp-wait-policy `policy`. The torch engines also allocate
    their large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1, unless set): the GEMVs of a decoding
    step stream 115 MB, and 2 MB pages took them 3-7% faster (docs/RESULTS.md section 16)."""
    if policy not in WAIT_POLICIES:
        raise ValueError(f"unknown OMP wait policy {policy!r}; choose from {', '.join(WAIT_POLICIES)}")
    env = dict(os.environ if base is None else base)
    if policy == "inherit":
        return env
    if engine in TORCH_ENGINES:
        env.setdefault(THP_ENV, "1")
    if policy == "engine":
        want = ENGINE_WAIT_POLICY.get(engine)
    else:
        want = policy.upper()
    if want is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = want
    return env


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run_engine_process(cmd: list[str], env: dict, timeout: float | None = None) -> str:
    """stdout of one engine run; EngineFailed (with the exit reason and stderr's tail) when it fails."""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    except OSError as e:
        raise EngineFailed(f"cannot start {cmd[0]}: {e}") from None
    if r.returncode != 0:
        raise EngineFailed(f"{describe_exit(r.returncode)}: {' '.join(cmd)}\n{r.stderr[-1500:]}")
    return r.stdout


def torch_engine_cmd(spec: dict) -> list[str]:
    return [sys.executable, "-m", "rabit.decode_bench", json.dumps(spec)]


def torch_engine_once(spec: dict, env: dict, timeout: float | None = None) -> float:
    """tokens/s of one run of a torch engine (spec: see worker) in a fresh process."""
    out = run_engine_process(torch_engine_cmd(spec), env, timeout)
    try:
        return float(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
    except (ValueError, KeyError, IndexError) as e:
        raise EngineFailed(f"unreadable output of {spec['engine']}: {out[-500:]!r}") from e


def worker(spec: dict) -> dict:
    """Build the engine's model (deterministic from the seed), warm up, time one run: {"tokens_per_s": ...}."""
    import torch

    from .cli.bench import _torch_run, make_random_llama, packed_copy
    from .generate import StaticDecoder
    from .serialization import packed_layers

    torch.set_num_threads(spec["threads"])
    shape, engine = spec["shape"], spec["engine"]
    base = make_random_llama(**shape, seed=spec["seed"],
                             max_positions=max(4096, spec["prompt_len"] + spec["new_tokens"] + 8))
    if engine == "fp32":
        model = base
    elif engine in ("rabit", "rabit-int8", "rabit-fphead"):
        model = packed_copy(base, quantize_head=engine != "rabit-fphead")
        del base
        if engine == "rabit-int8":
            for mod in packed_layers(model).values():
                mod.backend = "cpu_int8"
    else:
        raise ValueError(f"unknown torch engine {engine!r}")
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt = torch.randint(3, shape["vocab"], (1, spec["prompt_len"]), generator=gen)
    decoder = StaticDecoder(model, spec["prompt_len"] + spec["new_tokens"] + 2, compile=spec.get("compile", False))
    _torch_run(decoder, prompt, min(8, spec["new_tokens"]))  # warm-up (and torch.compile)
    return {"engine": engine, "tokens_per_s": _torch_run(decoder, prompt, spec["new_tokens"]),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
