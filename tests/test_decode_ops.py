"""The native ops of a one-token decoding step (``rabit.kernels.decode_ops_cpu``: residual add + RMSNorm, and one
token's rotary attention over the KV cache) against the PyTorch code they replace, and the decoder that uses them
against the same decoder without them, family by family."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from rabit.generate import StaticDecoder
from rabit.kernels import decode_ops_cpu
from test_families import _build

needs_ops = pytest.mark.skipif(not decode_ops_cpu.is_available(), reason="the decoding ops do not build here")


@needs_ops
@pytest.mark.parametrize("n", [1, 7, 33, 576, 2049])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(n, with_residual):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(1, 1, n, generator=gen) * 30   # a large-valued residual stream
    a = torch.randn(1, 1, n, generator=gen) if with_residual else None
    w = torch.randn(n, generator=gen)
    x0 = x.clone()
    y = decode_ops_cpu.add_rms_norm(x, a, w, 1e-5)
    xs = x0 + a if with_residual else x0
    torch.testing.assert_close(x, xs, rtol=0, atol=0)                 # the residual stream, updated in place
    torch.testing.assert_close(y, F.rms_norm(xs, (n,), w, 1e-5), rtol=2e-6, atol=2e-6 * float(w.abs().max()))


def _attention_reference(q, k, v, kc, vc, pos, lo, cos, sin_signed, scale):
    """The PyTorch one-token attention of StaticDecoder._decode_one_impl."""
    KV, _, D = kc.shape
    H = q.shape[0]
    half = D // 2
    q = q * cos + q.roll(half, -1) * sin_signed
    k = k * cos + k.roll(half, -1) * sin_signed
    kc[:, pos] = k
    vc[:, pos] = v
    scores = torch.matmul(q.view(KV, H // KV, D), kc[:, lo:pos + 1].transpose(1, 2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), vc[:, lo:pos + 1]).reshape(H, D)


@needs_ops
@pytest.mark.parametrize("H,KV,D", [(1, 1, 2), (4, 2, 6), (9, 3, 64), (8, 8, 80), (4, 1, 34)])
@pytest.mark.parametrize("pos,lo", [(0, 0), (5, 0), (37, 30), (63, 0)])
def test_attend_one_matches_torch(H, KV, D, pos, lo):
    gen = torch.Generator().manual_seed(H * 100 + D + pos)
    max_len = 64
    q, k, v = torch.randn(H, D, generator=gen), torch.randn(KV, D, generator=gen), torch.randn(KV, D, generator=gen)
    kc = torch.randn(KV, max_len, D, generator=gen) * 3      # earlier positions: whatever the cache holds
    vc = torch.randn(KV, max_len, D, generator=gen)
    ang = torch.rand(D // 2, generator=gen) * 6
    cos = torch.cat([ang.cos(), ang.cos()])
    sin_signed = torch.cat([-ang.sin(), ang.sin()])
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = _attention_reference(q, k, v, kc_ref, vc_ref, pos, lo, cos, sin_signed, D ** -0.5)
    o = decode_ops_cpu.attend_one(q, k, v, kc, vc, pos, lo, cos, sin_signed, D ** -0.5)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-6, atol=1e-6)   # the rotated key written at pos, nothing else
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


@needs_ops
@pytest.mark.parametrize("H,KV,D,pos", [(16, 4, 128, 200), (9, 3, 64, 300), (6, 3, 34, 511)])
def test_attend_one_threads_split_kv_heads_with_the_same_result(H, KV, D, pos):
    """A long cache (above the one-thread limit): KV heads on 2 and 3 threads give the one-thread result bit for bit,
    and the PyTorch attention's to rounding."""
    gen = torch.Generator().manual_seed(pos)
    max_len = 512
    q, k, v = torch.randn(H, D, generator=gen), torch.randn(KV, D, generator=gen), torch.randn(KV, D, generator=gen)
    kc, vc = torch.randn(KV, max_len, D, generator=gen), torch.randn(KV, max_len, D, generator=gen)
    ang = torch.rand(D // 2, generator=gen) * 6
    cos, sin_signed = torch.cat([ang.cos(), ang.cos()]), torch.cat([-ang.sin(), ang.sin()])
    assert 2 * KV * (pos + 1) * D >= 1 << 15                        # the C side's ATTEND_PARALLEL_FLOATS
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = _attention_reference(q, k, v, kc_ref, vc_ref, pos, 3, cos, sin_signed, D ** -0.5)
    outs = [decode_ops_cpu.attend_one(q, k, v, kc, vc, pos, 3, cos, sin_signed, D ** -0.5, threads=t)
            for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-6, atol=1e-6)


@needs_ops
@pytest.mark.parametrize("n", [1, 7, 64, 1537, 5632])
def test_silu_mul_matches_torch(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(1, 1, n, generator=gen) * 6
    a.view(-1)[: min(n, 4)] = torch.tensor([-1000.0, 90.0, 0.0, -89.0])[: min(n, 4)]   # far tails, 0
    b = torch.randn(1, 1, n, generator=gen)
    y = decode_ops_cpu.silu_mul(a, b)
    torch.testing.assert_close(y, F.silu(a) * b, rtol=2e-6, atol=1e-7)
    assert y.shape == a.shape
    a2 = a.clone()
    assert decode_ops_cpu.silu_mul(a2, b, out=a2).data_ptr() == a2.data_ptr()   # in place, as the decoder calls it
    assert torch.equal(a2, y)
    with pytest.raises(ValueError, match="same-sized"):
        decode_ops_cpu.silu_mul(a, b[..., :-1] if n > 1 else torch.zeros(2))


@needs_ops
def test_prepared_calls_match_the_checked_ones():
    """add_rms_norm_fn / attend_one_fn (the decoder's per-site calls): the checked functions' bits, one output tensor
    returned by every call; other inputs (strided, float64, a position past the cache) go through the checked
    functions, which refuse them."""
    gen = torch.Generator().manual_seed(7)
    n, H, KV, D, max_len = 96, 6, 2, 16, 40
    w = torch.randn(n, generator=gen)
    norm = decode_ops_cpu.add_rms_norm_fn(w, 1e-6)
    x, r = torch.randn(1, 1, n, generator=gen), torch.randn(1, n, generator=gen)
    x2 = x.clone()
    y = norm(x, r)
    assert torch.equal(y, decode_ops_cpu.add_rms_norm(x2, r, w, 1e-6)) and torch.equal(x, x2)
    assert norm(x, None).data_ptr() == y.data_ptr()                    # the same output, overwritten
    with pytest.raises(ValueError, match="contiguous fp32"):
        norm(x, torch.randn(1, 2 * n, generator=gen)[:, ::2])           # through the checked call
    kc, vc = torch.randn(KV, max_len, D, generator=gen), torch.randn(KV, max_len, D, generator=gen)
    ang = torch.rand(max_len, D // 2, generator=gen) * 6
    cos, sin_signed = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([-ang.sin(), ang.sin()], 1)
    attend = decode_ops_cpu.attend_one_fn(kc, vc, cos, sin_signed, D ** -0.5, H, threads=2)
    kc2, vc2 = kc.clone(), vc.clone()
    q, k, v = torch.randn(H, D, generator=gen), torch.randn(KV, D, generator=gen), torch.randn(KV, D, generator=gen)
    for pos, lo in [(0, 0), (17, 3), (39, 0)]:
        o = attend(q, k, v, pos, lo)
        ref = decode_ops_cpu.attend_one(q, k, v, kc2, vc2, pos, lo, cos[pos], sin_signed[pos], D ** -0.5)
        assert torch.equal(o, ref) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert attend(q, k, v, 5, 0).data_ptr() == o.data_ptr()
    with pytest.raises(ValueError, match="contiguous fp32"):
        attend(q.double(), k, v, 5, 0)                                  # through the checked call
    with pytest.raises(ValueError, match="bad attention arguments"):
        attend(q, k, v, max_len, 0)
    with pytest.raises(ValueError, match="bad attention tables"):
        decode_ops_cpu.attend_one_fn(kc, vc, cos[:10], sin_signed[:10], 1.0, H)


@needs_ops
def test_attend_one_softmax_underflow_and_bad_arguments():
    """Scores 100 apart: the far ones get weight 0 (as torch's softmax), not NaN; out-of-range positions raise."""
    D, max_len = 4, 8
    q = torch.tensor([[10.0, 0, 0, 0]])
    kc = torch.zeros(1, max_len, D)
    kc[0, 0, 0] = -10.0                                              # score -100 against 0 for position 1
    vc = torch.zeros(1, max_len, D)
    vc[0, 0] = 1.0
    ones, zeros = torch.ones(D), torch.zeros(D)
    o = decode_ops_cpu.attend_one(q, torch.zeros(1, D), torch.full((1, D), 2.0), kc, vc, 1, 0, ones, zeros, 1.0)
    torch.testing.assert_close(o, torch.full((1, D), 2.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="bad attention arguments"):
        decode_ops_cpu.attend_one(q, torch.zeros(1, D), torch.zeros(1, D), kc, vc, max_len, 0, ones, zeros, 1.0)
    with pytest.raises(ValueError, match="contiguous fp32"):
        decode_ops_cpu.attend_one(q.double(), torch.zeros(1, D), torch.zeros(1, D), kc, vc, 1, 0, ones, zeros, 1.0)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():   # q/k norms that do something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.5)
    return model.eval()


def _steps(dec, ids, n):
    out = [dec.prefill(ids)[0, -1]]
    for t in range(n):
        out.append(dec.step(int(ids[0, t % ids.shape[1]]))[0, -1])
    return torch.stack(out)


@needs_ops
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2.5", "qwen2.5-sliding", "mistral", "llama-packed"])
def test_decoder_with_native_ops_matches_it_without(name):
    """Native norms and attention in the one-token steps, windows, q/k norms, biases and packed layers included:
    the logits of 20 steps agree with the PyTorch ops' to fp32 rounding."""
    torch.manual_seed(0)
    if name.startswith("llama"):
        model = make_tiny_llama()
        if name == "llama-packed":
            from rabit import RaBiTConfig, quantize_
            from rabit.serialization import pack_model_

            quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
            pack_model_(model, scale_dtype=torch.float32)
    elif name == "qwen3":
        model = _qwen3()
    else:
        model = _build(name)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        native = StaticDecoder(model, max_len=32, native_ops=True)
        plain = StaticDecoder(model, max_len=32, native_ops=False)
        assert native._native is not None and plain._native is None
        a, b = _steps(native, ids, 20), _steps(plain, ids, 20)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@needs_ops
def test_native_ops_only_where_they_apply():
    """Gemma's sandwich norms and soft-capping keep the PyTorch ops: automatically, or with an error when asked."""
    model = _build("gemma3")
    assert StaticDecoder(model, max_len=16)._native is None
    with pytest.raises(ValueError, match="native decoding ops unavailable"):
        StaticDecoder(model, max_len=16, native_ops=True)
    assert StaticDecoder(make_tiny_llama(), max_len=16)._native is not None
    assert StaticDecoder(make_tiny_llama().to(torch.bfloat16), max_len=16)._native is None


@needs_ops
def test_step_logits_shape_with_a_packed_head():
    """A packed output head goes through the prepared one-row call too: step() still returns (1, 1, vocab), the
    same logits with and without the native ops."""
    from rabit.cli.bench import make_random_llama, packed_copy

    model = packed_copy(make_random_llama(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128, seed=0,
                                          max_positions=64), quantize_head=True)
    outs = []
    with torch.inference_mode():
        for native in (True, False):
            dec = StaticDecoder(model, 16, native_ops=native)
            dec.prefill(torch.tensor([[3, 4, 5]]))
            outs.append(torch.stack([dec.step(t) for t in (7, 9, 11)]))
    assert outs[0].shape == (3, 1, 1, 128)
    assert not torch.equal(outs[0][0], outs[0][2])   # each step's own logits, not one reused buffer
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5 * float(outs[1].abs().max()))
