"""Static-cache decoding: logits match the Hugging Face forward; sampling; the generate / bench CLIs."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from rabit.kernels import bf16_cpu
from rabit.generate import (HFStaticDecoder, StaticDecoder, TextStreamer, decode_tokens, generate, lean_supported,
                            make_decoder, sample)

IDS = torch.tensor([[1, 5, 9, 33, 17, 2, 60, 71, 8, 90, 4, 3]])


def _packed_tiny(scale_dtype=torch.float32, vocab_size=96):
    from rabit import RaBiTConfig, quantize_
    from rabit.serialization import pack_model_

    model = make_tiny_llama(vocab_size=vocab_size)
    quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
    return pack_model_(model.eval(), scale_dtype=scale_dtype)


def _incremental(decoder, ids, split):
    outs = [decoder.prefill(ids[:, :split], all_logits=True)]
    for t in ids[0, split:]:
        outs.append(decoder.step(int(t)))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cls", [StaticDecoder, HFStaticDecoder])
def test_decoder_logits_match_hf_forward(cls, packed):
    model = _packed_tiny() if packed else make_tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
    dec = cls(model, max_len=16)
    torch.testing.assert_close(_incremental(dec, IDS, 5), ref, rtol=0, atol=1e-4)
    dec.reset()   # reuse after reset, prompt given in two chunks
    dec.prefill(IDS[:, :3])
    torch.testing.assert_close(dec.prefill(IDS[:, 3:], all_logits=True), ref[:, 3:], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="max_len"):
        dec.prefill(torch.ones(1, 8, dtype=torch.long))


def test_cuda_graph_option_is_refused_where_it_cannot_run():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="CUDA device"):
        StaticDecoder(model, max_len=16, cuda_graph=True)
    with pytest.raises(ValueError, match="not both"):
        StaticDecoder(model, max_len=16, compile=True, cuda_graph=True)


def test_decoder_with_int8_lookup_tables():
    """backend cpu_int8: the one-token steps use the int8 tables (close to, not equal to, the exact steps); the
    prefill of several tokens stays exact."""
    from rabit.serialization import packed_layers

    model = _packed_tiny()
    with torch.no_grad():
        ref = model(IDS).logits
    for m in packed_layers(model).values():
        m.backend = "cpu_int8"
    out = _incremental(StaticDecoder(model, max_len=16), IDS, 5)
    torch.testing.assert_close(out[:, :5], ref[:, :5], rtol=0, atol=1e-4)
    steps = (out[:, 5:] - ref[:, 5:]).abs().max().item()
    assert 1e-5 < steps < 0.05 * ref[:, 5:].abs().max().item()


def test_bf16_valued_head_decodes_as_bf16():
    """An fp32 head holding bf16 values (a packed folder's tied embedding) runs as a bf16 GEMV in the one-token
    steps, close to the fp32 head; any other head (and bf16_head=False) keeps the fp32 path, bit for bit."""
    from rabit.generate import _bf16_head_fn

    model = make_tiny_llama()
    assert _bf16_head_fn(model.lm_head, 1, False) is None                 # random fp32 values: not bf16
    with torch.no_grad():
        ref = model(IDS).logits
        exact = _incremental(StaticDecoder(model, max_len=16, bf16_head=True), IDS, 5)
        torch.testing.assert_close(exact, ref, rtol=0, atol=1e-4)
        model.lm_head.weight.copy_(model.lm_head.weight.to(torch.bfloat16).float())
        ref = model(IDS).logits
        assert _bf16_head_fn(model.lm_head, 1, False) is not None
        fast = _incremental(StaticDecoder(model, max_len=16), IDS, 5)
        slow = _incremental(StaticDecoder(model, max_len=16, bf16_head=False), IDS, 5)
    torch.testing.assert_close(slow, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast[:, :5], ref[:, :5], rtol=0, atol=1e-4)   # the prefill keeps the fp32 head
    steps = (fast[:, 5:] - ref[:, 5:]).abs().max().item()
    if bf16_cpu.is_available():   # the native kernel keeps x in fp32: the fp32 head's logits up to summation order
        assert steps < 1e-5 * ref.abs().max().item()
    else:                         # oneDNN rounds x to bf16
        assert 0 < steps < 2e-2 * ref.abs().max().item()


def test_bf16_head_without_the_native_kernel_rounds_its_input(monkeypatch):
    """The fallback (no C compiler): oneDNN's bf16 GEMM, x rounded to bf16, still close to the fp32 head."""
    from rabit.generate import _bf16_head_fn

    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.to(torch.bfloat16).float())
        monkeypatch.setattr(bf16_cpu, "is_available", lambda: False)
        fn = _bf16_head_fn(model.lm_head, 1, False)
        x = torch.randn(1, 1, model.config.hidden_size)
        ref = model.lm_head(x)
        y = fn(x)
    torch.testing.assert_close(y, F.linear(x.to(torch.bfloat16), model.lm_head.weight.to(torch.bfloat16)).float())
    assert 0 < (y - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


def test_greedy_generation_matches_transformers_generate():
    from rabit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = make_tiny_llama(vocab_size=512)
    prompt = "It is a truth universally acknowledged"
    res = generate(model, tok, prompt, max_new_tokens=12, stop_at_eos=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert res.result.tokens == hf[0, ids.shape[1]:].tolist()
    assert res.text == tok.decode(res.result.tokens, skip_special_tokens=True)
    assert len(res.result.step_times) == 11 and res.tokens_per_s > 0
    assert lean_supported(model)[0] and isinstance(make_decoder(model, 8), StaticDecoder)


def test_repetition_penalty():
    from rabit.generate import apply_repetition_penalty

    logits = torch.tensor([[[0.5, 3.0, -1.0, 2.5]]])
    out = apply_repetition_penalty(logits, torch.tensor([1, 2]), 2.0)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5, -2.0, 2.5]))
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([1, 2]), 1.0), logits[0, 0])
    assert sample(out) == 3  # token 1 was the best before it was seen
    # in decoding: a tiny model whose greedy text repeats tokens stops repeating them under a strong penalty
    model = make_tiny_llama()
    dec = StaticDecoder(model, 48)
    plain = decode_tokens(dec, IDS[:, :4], 24).tokens
    assert len(set(plain)) < len(plain)
    penalized = decode_tokens(dec, IDS[:, :4], 24, repetition_penalty=1e6).tokens
    assert penalized != plain and len(set(penalized)) > len(set(plain))
    assert decode_tokens(dec, IDS[:, :4], 24, repetition_penalty=1.0).tokens == plain
    with pytest.raises(ValueError, match="repetition_penalty"):
        decode_tokens(dec, IDS[:, :4], 4, repetition_penalty=0.0)


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    assert sample(logits) == 1
    assert sample(logits, temperature=1.0, top_k=1) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g) for _ in range(50)}
    assert draws == {1, 3}
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(20)}
    assert draws == {1}
    model = make_tiny_llama()
    dec = StaticDecoder(model, 24)
    a = decode_tokens(dec, IDS[:, :4], 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    b = decode_tokens(dec, IDS[:, :4], 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    assert a.tokens == b.tokens and len(a.tokens) == 8
    # EOS: greedy decoding with the token first generated at step j as EOS stops right after it
    greedy = decode_tokens(dec, IDS[:, :4], 8).tokens
    j = max(greedy.index(t) for t in greedy)
    assert len(greedy) == 8
    assert decode_tokens(dec, IDS[:, :4], 8, eos_token_id=greedy[j]).tokens == greedy[:j + 1]
    assert decode_tokens(dec, IDS[:, :4], 8, eos_token_id=[-1, greedy[j]]).tokens == greedy[:j + 1]
    assert decode_tokens(dec, IDS[:, :4], 8, eos_token_id=-1).tokens == greedy
    with pytest.raises(ValueError, match="temperature"):
        decode_tokens(dec, IDS[:, :4], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        decode_tokens(dec, IDS[:, :4], 4, temperature=1, top_p=1.5)


def test_streamer_waits_for_complete_characters():
    from rabit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok("café — naïve").input_ids
    pieces = []
    s = TextStreamer(tok, pieces.append)
    for i in ids:
        s(i)
    s.flush()
    assert "".join(pieces) == "café — naïve" and not any("\ufffd" in p for p in pieces)


def test_generate_cli_on_saved_packed_model(tmp_path, capsys):
    from rabit.cli import main
    from rabit.serialization import save_quantized
    from rabit.testing import tiny_tokenizer

    model = _packed_tiny(torch.float16, vocab_size=512)   # the tiny tokenizer's vocabulary
    save_quantized(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    assert main(["generate", str(tmp_path / "m"), "--prompt", "Elizabeth", "--max-new-tokens", "6",
                 "--threads", "1", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Elizabeth") and "tokens/s" in out.err and "2-bit rabit" in out.err
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_bench_decode_cli_tiny(capsys):
    from rabit.cli import main

    rc = main(["bench", "decode", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "4",
               "--kv-heads", "2", "--vocab", "256", "--prompt-len", "4", "--new-tokens", "3", "--reps", "2",
               "--engines", "rabit,rabit-int8,fp32", "--threads", "1", "--omp-wait-policy", "inherit"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| rabit 2-bit" in out and "| PyTorch fp32 |" in out and "2 x 3 tok" in out
    assert "| rabit 2-bit, int8 lookup tables (cpu_int8) |" in out
    assert main(["bench", "decode", "--engines", "nope", "--layers", "1"]) == 2


def test_bench_decode_reports_a_failing_engine_and_runs_the_others(monkeypatch):
    from rabit import decode_bench
    from rabit.cli.bench import format_decode_table, run_decode_bench

    calls = []

    def fake_once(spec, env, timeout=None):
        calls.append((spec["engine"], env.get("OMP_WAIT_POLICY")))
        if spec["engine"] == "fp32":
            raise decode_bench.EngineFailed("killed by SIGSEGV: fake")
        return 10.0 + len(calls)

    monkeypatch.setattr(decode_bench, "torch_engine_once", fake_once)
    res = run_decode_bench(dict(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256), 4, 3,
                           reps=3, engines="fp32,rabit", log=lambda s: None)
    assert res["failed"] == {"fp32": "killed by SIGSEGV: fake"}
    assert [r["engine"] for r in res["rows"]] == ["rabit"] and res["rows"][0]["runs"] == 3
    assert calls == [("fp32", "ACTIVE")] + [("rabit", "ACTIVE")] * 3  # a failed engine is not retried
    assert "FAILED: killed by SIGSEGV" in format_decode_table(res)


def test_engine_process_crash_and_environment():
    import signal
    import sys

    import pytest

    from rabit.decode_bench import EngineFailed, engine_env, run_engine_process

    with pytest.raises(EngineFailed, match="killed by SIGSEGV"):
        run_engine_process([sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"], {})
    with pytest.raises(EngineFailed, match="exit status 3"):
        run_engine_process([sys.executable, "-c", "raise SystemExit(3)"], {})
    base = {"OMP_WAIT_POLICY": "PASSIVE", "X": "1"}
    assert engine_env("rabit", "engine", base)["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_WAIT_POLICY" not in engine_env("tq2_0", "engine", base)  # llama.cpp keeps its own default
    assert engine_env("tq2_0", "active", base)["OMP_WAIT_POLICY"] == "ACTIVE"
    assert engine_env("rabit", "inherit", base) == base
    assert engine_env("rabit", "engine", base)["THP_MEM_ALLOC_ENABLE"] == "1"     # torch engines: huge pages
    assert "THP_MEM_ALLOC_ENABLE" not in engine_env("tq2_0", "engine", base)
    assert engine_env("rabit", "engine", {**base, "THP_MEM_ALLOC_ENABLE": "0"})["THP_MEM_ALLOC_ENABLE"] == "0"
    with pytest.raises(ValueError):
        engine_env("rabit", "spin", base)


def test_llama_bench_dying_of_sigill_runs_again_without_repacking(tmp_path):
    # a stand-in llama-bench: dies of SIGILL unless it is given --repack 0, as llama.cpp's repacked Q4_1 path did on
    # an Intel Xeon VM with AMX
    import stat
    import sys

    import pytest

    from rabit.cli.bench import llama_bench_with_fallback
    from rabit.decode_bench import EngineFailed

    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\n" + '''import json, os, signal, sys
open(os.environ["CALLS"], "a").write(" ".join(sys.argv[1:]) + "\\n")
if "--repack" not in sys.argv or sys.argv[sys.argv.index("--repack") + 1] != "0":
    os.kill(os.getpid(), signal.SIGILL)
print(json.dumps([{"n_gen": 128, "avg_ts": 61.5, "samples_ts": [61.5]}]))
''')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    env = {"CALLS": str(calls), "PATH": "/usr/bin:/bin"}
    args, logged = [], []
    got = llama_bench_with_fallback(fake, tmp_path / "m.gguf", 128, 128, 2, "--repack <0|1> -d, --n-depth", env,
                                    args, logged.append)
    assert got == 61.5 and args == ["--repack", "0"] and "SIGILL" in logged[0]
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "--repack" not in lines[0] and lines[1].endswith("--repack 0")
    assert "-d 128" in lines[0]
    assert llama_bench_with_fallback(fake, tmp_path / "m.gguf", 128, 128, 2, "--repack", env, args) == 61.5
    assert len(calls.read_text().splitlines()) == 3          # later runs go straight to --repack 0
    # a llama-bench without --repack, or a crash of another kind: reported, not retried
    with pytest.raises(EngineFailed, match="SIGILL"):
        llama_bench_with_fallback(fake, tmp_path / "m.gguf", 128, 128, 2, "-d, --n-depth", env, [])
    assert len(calls.read_text().splitlines()) == 4


def test_bench_finds_the_checkouts_llama_cpp_folder():
    # the default --llama-cpp-dir is third_party/ of the checkout, the folder build_llama_cpp.sh writes to
    from pathlib import Path

    from rabit.cli.bench import repo_root

    root = repo_root()
    assert (root / "benchmarks" / "build_llama_cpp.sh").is_file()
    assert root == Path(__file__).resolve().parents[1]


def test_small_packed_layers_decode_on_one_thread(monkeypatch):
    """The decode loop gives a packed GEMV one thread below generate.SERIAL_GEMV_WEIGHTS weights (waking a sleeping
    second thread costs more than such a layer's work), `threads` above it, and `threads` to every layer whose exact
    tables are compute-bound (AVX2); the tokens' logits do not change."""
    from rabit import generate as gen
    from rabit.kernels import cpu

    if not cpu.is_available():
        pytest.skip("native CPU kernel not built (tests/test_kernels.py says whether that is allowed)")
    model = _packed_tiny()
    calls = []
    real = cpu.CpuLinearPlan.row_fn     # the decode loop's prepared one-row calls, with their thread count
    monkeypatch.setattr(cpu.CpuLinearPlan, "row_fn", lambda self, num_threads, reuse_output=False:
                        calls.append(num_threads) or real(self, num_threads, reuse_output))

    def decode():
        calls.clear()
        dec = StaticDecoder(model, max_len=16, threads=2)
        return _incremental(dec, IDS, 5)

    monkeypatch.setattr(gen, "exact_kernel_compute_bound", lambda: False)   # as with AVX-512
    small = decode()
    assert len(calls) == 7 * 2 and set(calls) == {1}   # 7 layers x 2 blocks
    monkeypatch.setattr(gen, "exact_kernel_compute_bound", lambda: True)    # as with AVX2: every layer threaded
    torch.testing.assert_close(decode(), small, rtol=0, atol=1e-6)
    assert len(calls) == 7 * 2 and set(calls) == {2}
    monkeypatch.setattr(gen, "exact_kernel_compute_bound", lambda: False)
    monkeypatch.setattr(gen, "SERIAL_GEMV_WEIGHTS", 0)
    threaded = decode()
    assert len(calls) == 7 * 2 and set(calls) == {2}
    torch.testing.assert_close(small, threaded, rtol=0, atol=1e-6)
    lin = next(m for m in model.modules() if hasattr(m, "packed"))
    assert gen.gemv_threads(lin, 4) == 4 and lin.in_features * lin.out_features > 0
    monkeypatch.setattr(gen, "SERIAL_GEMV_WEIGHTS", lin.in_features * lin.out_features + 1)
    assert gen.gemv_threads(lin, 4) == 1
    monkeypatch.setattr(gen, "exact_kernel_compute_bound", lambda: True)
    assert gen.gemv_threads(lin, 4) == 4 and gen.gemv_threads(lin, 4, "cpu_int8") == 1   # int8 tables: not bound
