"""The native causal-attention kernel (rabit.kernels.attention_cpu) against its PyTorch twin on random shapes, odd
lengths included, and its use through transformers' attention registry (rabit.kernels.attention)."""
import math

import pytest
import torch

from rabit.kernels import attention, attention_cpu

from conftest import make_tiny_llama

pytestmark = pytest.mark.skipif(not attention_cpu.is_available(), reason="no C compiler for the native kernel")
ISAS = attention_cpu.available_isas() if attention_cpu.is_available() else ["scalar"]
F32_ISAS = attention_cpu.available_isas(torch.float32) if attention_cpu.is_available() else ["scalar"]
HAS_BF16 = "avx512bf16" in ISAS
USABLE = attention_cpu.is_available() and any(i in attention.KERNEL_ISAS[torch.bfloat16] for i in ISAS)
USABLE_F32 = attention_cpu.is_available() and any(i in attention.KERNEL_ISAS[torch.float32] for i in F32_ISAS)
# (dtype, path) pairs: every path this CPU runs for each input dtype
DTYPE_ISAS = [(torch.bfloat16, i) for i in ISAS] + [(torch.float32, i) for i in F32_ISAS]


def qkv(b, hq, hk, t, d, seed, spread=1.0, layout="bthd", dtype=torch.bfloat16):
    """bf16 (or `dtype`) queries, keys, values; "bthd": (batch, T, heads, head_dim) storage seen as (batch, heads, T,
    head_dim), as transformers' projections hand them over."""
    gen = torch.Generator().manual_seed(seed)

    def one(h):
        x = torch.randn(b, t, h, d, generator=gen) * spread
        return (x.transpose(1, 2) if layout == "bthd" else x.permute(0, 2, 1, 3).contiguous()).to(dtype)
    return one(hq), one(hk), one(hk)


def bf16_tolerance(ref):
    # one bf16 rounding of the output plus P's rounding to bf16 inside: a few units in the last place of bf16
    return dict(rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()) + 1e-3)


def tolerance(ref):
    # fp32: sums in another order and the exp polynomial (~1e-7 relative); bf16 as above
    if ref.dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-6)
    return bf16_tolerance(ref)


@pytest.mark.parametrize("dtype,isa", DTYPE_ISAS)
@pytest.mark.parametrize("b,hq,hk,t,d", [(1, 1, 1, 1, 32), (1, 2, 1, 2, 64), (2, 4, 2, 63, 32), (1, 3, 3, 64, 64),
                                         (1, 6, 2, 65, 64), (2, 2, 1, 130, 128), (1, 2, 2, 200, 256),
                                         (3, 9, 3, 77, 96)])
def test_matches_the_reference_on_random_shapes(dtype, isa, b, hq, hk, t, d):
    q, k, v = qkv(b, hq, hk, t, d, seed=t * 131 + d, layout="bthd" if t % 2 else "bhtd", dtype=dtype)
    ref = attention_cpu.causal_attention_reference(q, k, v)
    out = attention_cpu.causal_attention(q, k, v, isa=isa, threads=2)
    assert out.shape == (b, t, hq, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **tolerance(ref))
    # the first query sees only its own key: its output is that key's value, whatever the scores
    kv_head = torch.arange(hq) // (hq // hk)
    torch.testing.assert_close(out[:, 0].float(), v[:, kv_head, 0].float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,isa", DTYPE_ISAS)
def test_the_online_softmax_rescales_when_a_later_key_block_dominates(dtype, isa):
    # scores growing along the keys: every key block raises each query's running maximum, so the rescaling of the
    # sums and outputs carries the result; an error there would weight early blocks e^40 too much
    t, d = 200, 64
    q, k, v = qkv(1, 2, 2, t, d, seed=5, layout="bhtd", dtype=dtype)
    q = torch.ones_like(q)
    k = (torch.linspace(0, 40, t).view(1, 1, t, 1) / d * math.sqrt(d) * torch.ones(1, 2, t, d)).to(dtype)
    ref = attention_cpu.causal_attention_reference(q, k, v)
    out = attention_cpu.causal_attention(q, k, v, isa=isa)
    torch.testing.assert_close(out.float(), ref.float(), **tolerance(ref))


def test_scale_and_out_are_honoured():
    q, k, v = qkv(2, 4, 2, 70, 64, seed=3)
    ref = attention_cpu.causal_attention_reference(q, k, v, scale=0.3)
    out = torch.full((2, 4, 70, 64), float("nan"), dtype=torch.bfloat16).transpose(1, 2)   # strided: (b, t, h, d)
    got = attention_cpu.causal_attention(q, k, v, scale=0.3, out=out)
    assert got is out
    torch.testing.assert_close(out.float(), ref.float(), **bf16_tolerance(ref))
    default = attention_cpu.causal_attention(q, k, v)
    assert not torch.allclose(default.float(), out.float(), atol=1e-2)   # 1/sqrt(64) != 0.3: the scale mattered


@pytest.mark.parametrize("dtype,isa", [(dt, i) for dt, i in DTYPE_ISAS if i != "scalar"]
                         or [pytest.param(None, "none", marks=pytest.mark.skip("no SIMD path here"))])
def test_the_paths_agree_and_threads_change_nothing(dtype, isa):
    q, k, v = qkv(2, 9, 3, 300, 64, seed=11, dtype=dtype)
    scalar = attention_cpu.causal_attention(q, k, v, isa="scalar")
    runs = [attention_cpu.causal_attention(q, k, v, isa=isa, threads=n) for n in (1, 2, 3)]
    torch.testing.assert_close(runs[0].float(), scalar.float(), **tolerance(scalar))
    for r in runs[1:]:
        assert torch.equal(r, runs[0])   # each query block is one task: the thread count changes no bit


@pytest.mark.parametrize("what", ["fp16", "mixed", "head_dim", "lengths", "heads", "isa", "bf16_isa", "out",
                                  "out_dtype"])
def test_bad_input_is_refused(what):
    q, k, v = qkv(1, 4, 2, 16, 64, seed=0)
    kwargs = {}
    if what == "fp16":
        q, k, v = (x.half() for x in (q, k, v))
    elif what == "mixed":
        q = q.float()
    elif what == "bf16_isa":     # AVX-512 BF16 has no fp32 version, on any CPU
        q, k, v = (x.float() for x in (q, k, v))
        kwargs["isa"] = "avx512bf16"
    elif what == "out_dtype":
        kwargs["out"] = torch.empty(1, 16, 4, 64, dtype=torch.float32)
    elif what == "head_dim":
        q, k, v = qkv(1, 4, 2, 16, 48, seed=0)
    elif what == "lengths":
        k, v = k[:, :, :8], v[:, :, :8]
    elif what == "heads":
        q = torch.cat([q, q[:, :1]], dim=1)
    elif what == "isa":
        kwargs["isa"] = "avx9"
    elif what == "out":
        kwargs["out"] = torch.empty(1, 16, 4, 32, dtype=torch.bfloat16)
    assert attention_cpu.supports(q, k, v) == (what in ("isa", "bf16_isa", "out", "out_dtype"))
    with pytest.raises(ValueError):
        attention_cpu.causal_attention(q, k, v, **kwargs)


# ---- through transformers: rabit.kernels.attention ----

def tiny_model():
    return make_tiny_llama(hidden=128, heads=4, kv_heads=2, intermediate=128, layers=2, seed=0).eval()


def logits(model, ids, autocast=True, mask=None):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def counting(monkeypatch):
    calls = []
    real = attention_cpu.causal_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)
    monkeypatch.setattr(attention_cpu, "causal_attention", spy)
    return calls


@pytest.mark.skipif(not USABLE, reason="the CPU runs none of the kernel's fast paths")
def test_a_model_under_bf16_autocast_runs_the_kernel_and_matches_sdpa(monkeypatch):
    model, ids = tiny_model(), torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = logits(model, ids)
        calls = counting(monkeypatch)
        with attention.fast_attention():
            got = logits(model, ids)
    assert len(calls) == 2   # one per layer
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


@pytest.mark.skipif(not USABLE_F32, reason="the CPU runs none of the kernel's fp32 fast paths")
def test_an_fp32_model_runs_the_fp32_kernel_and_matches_sdpa(monkeypatch):
    # the passes of a CPU without native bf16: no autocast, fp32 all through
    model, ids = tiny_model(), torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = logits(model, ids, autocast=False)
        calls = counting(monkeypatch)
        with attention.fast_attention():
            got = logits(model, ids, autocast=False)
    assert len(calls) == 2
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not torch.equal(got, ref)   # another kernel did run: sums in another order


def test_sdpa_runs_where_the_kernel_does_not_apply(monkeypatch):
    model, ids = tiny_model(), torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[1, :5] = 0
    with torch.no_grad():
        ref = {"mask": logits(model, ids, mask=pad), "fp32 mask": logits(model, ids, autocast=False, mask=pad)}
    ref_grad = logits(model, ids)
    calls = counting(monkeypatch)
    with attention.fast_attention():
        with torch.no_grad():
            got = {"mask": logits(model, ids, mask=pad), "fp32 mask": logits(model, ids, autocast=False, mask=pad)}
        got_grad = logits(model, ids)   # parameters need gradients: the student in training
        got_grad.sum().backward()       # and the gradient flows, through torch's kernel
    assert calls == []
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert torch.equal(got_grad, ref_grad)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.skipif(not USABLE, reason="the CPU runs none of the kernel's fast paths")
def test_the_environment_variable_turns_the_kernel_off(monkeypatch):
    model, ids = tiny_model(), torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(2))
    calls = counting(monkeypatch)
    monkeypatch.setenv(attention.ENV_VAR, "torch")
    with torch.no_grad(), attention.fast_attention():
        logits(model, ids)
    assert calls == []
    monkeypatch.delenv(attention.ENV_VAR)
    with torch.no_grad(), attention.fast_attention():
        logits(model, ids)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype,setting", DTYPE_ISAS)
def test_the_environment_variable_picks_a_path(monkeypatch, dtype, setting):
    model, ids = tiny_model(), torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(2))
    picked = []
    real = attention_cpu.causal_attention

    def spy(*a, **k):
        picked.append(k.get("isa"))
        return real(*a, **k)
    monkeypatch.setattr(attention_cpu, "causal_attention", spy)
    monkeypatch.setenv(attention.ENV_VAR, setting)
    bf16 = dtype == torch.bfloat16   # bf16 under autocast; fp32 without, as CPUs without native bf16 run
    with torch.no_grad():
        ref = logits(model, ids, autocast=bf16)
        with attention.fast_attention():
            got = logits(model, ids, autocast=bf16)
    assert picked == [setting] * 2
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    monkeypatch.setenv(attention.ENV_VAR, "auto")
    assert attention.kernel_isa() == next((i for i in attention.KERNEL_ISAS[torch.bfloat16] if i in ISAS), None)
    assert attention.kernel_isa(torch.float32) == next(
        (i for i in attention.KERNEL_ISAS[torch.float32] if i in F32_ISAS), None)
    assert attention.kernel_isa(torch.float16) is None


@pytest.mark.skipif(not HAS_BF16, reason="the CPU does not run the AVX-512 BF16 path")
def test_a_bf16_only_path_leaves_fp32_models_to_sdpa(monkeypatch):
    model, ids = tiny_model(), torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv(attention.ENV_VAR, "avx512bf16")
    assert attention.kernel_isa(torch.float32) is None and attention.kernel_isa() == "avx512bf16"
    with torch.no_grad():
        ref = logits(model, ids, autocast=False)
        calls = counting(monkeypatch)
        with attention.fast_attention():
            got = logits(model, ids, autocast=False)   # fp32: torch's kernel, bitwise
            assert calls == []
            logits(model, ids)                         # under bf16 autocast the path applies
    assert torch.equal(got, ref) and len(calls) == 2


@pytest.mark.parametrize("setting", ["avx9", "sdpa", "avx512", *(["avx512bf16"] if not HAS_BF16 else [])])
def test_a_bad_environment_variable_is_refused(monkeypatch, setting):
    monkeypatch.setenv(attention.ENV_VAR, setting)
    with pytest.raises(ValueError, match=attention.ENV_VAR):
        attention.kernel_isa()


def test_the_registry_is_restored_after_nested_use():
    from transformers.modeling_utils import AttentionInterface
    before = AttentionInterface._global_mapping["sdpa"]
    with attention.fast_attention():
        with attention.fast_attention():
            assert AttentionInterface._global_mapping["sdpa"] is attention.attention_forward
        assert AttentionInterface._global_mapping["sdpa"] is attention.attention_forward
    assert AttentionInterface._global_mapping["sdpa"] is before
    with pytest.raises(KeyError), attention.fast_attention():
        raise KeyError("an error inside")
    assert AttentionInterface._global_mapping["sdpa"] is before


@pytest.mark.skipif(not USABLE, reason="the CPU runs none of the kernel's fast paths")
def test_distillation_runs_the_teacher_on_the_kernel_and_the_student_on_sdpa(monkeypatch):
    from rabit.train.losses import batch_distillation_loss
    teacher, student = tiny_model(), make_tiny_llama(hidden=128, heads=4, kv_heads=2, intermediate=128, layers=2,
                                                     seed=1)
    ids = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(3))

    def loss(grad):
        return batch_distillation_loss(teacher, student, ids, 0.0, 1.0, 64, autocast=True, need_grad=grad).total
    monkeypatch.setenv(attention.ENV_VAR, "torch")
    ref = loss(True)
    monkeypatch.delenv(attention.ENV_VAR)
    calls = counting(monkeypatch)
    got = loss(True)
    assert calls == [(2, 4, 100, 32)] * 2       # the teacher's two layers; the student needs gradients: SDPA
    got.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert abs(got.item() - ref.item()) < 0.02 * abs(ref.item())
    calls.clear()
    with torch.no_grad():
        loss(False)                             # evaluation: both models on the kernel
    assert len(calls) == 4
