"""Group-wise 8/4-bit embedding and output-head quantization: the math, the modules, save and load."""
import json

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig, quantize_
from rabit.embedquant import (QuantizedEmbedding, QuantizedLinear, QuantizedTiedHead, dequantize_groupwise,
                              quantize_embeddings_, quantize_groupwise)
from rabit.serialization import load_quantized, save_quantized, size_report

IDS = torch.tensor([[1, 5, 9, 33, 17, 2, 60, 71, 8, 90, 4, 3]])


@pytest.mark.parametrize("bits", [8, 4])
def test_groupwise_roundtrip_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(37, 96) * torch.linspace(0.1, 3, 96)   # odd row count, groups of different ranges
    w[3, :32] = 0                                            # an all-zero group
    codes, scales = quantize_groupwise(w, bits, group_size=32)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == (37, 96 if bits == 8 else 48) and scales.shape == (37, 3)
    back = dequantize_groupwise(codes, scales, bits, 32)
    step = scales.float().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-3 * w.abs()).all()
    assert torch.equal(back[3, :32], torch.zeros(32))
    qmax = 2 ** (bits - 1) - 1
    # the largest value of each group is represented (nearly) exactly
    idx = w.reshape(37, 3, 32).abs().argmax(-1, keepdim=True)
    big = w.reshape(37, 3, 32).gather(-1, idx)
    assert torch.allclose(back.reshape(37, 3, 32).gather(-1, idx), big, rtol=2e-3, atol=0)
    # a subset of rows dequantizes to the same values
    assert torch.equal(dequantize_groupwise(codes[[5, 1]], scales[[5, 1]], bits, 32), back[[5, 1]])
    if bits == 8:
        assert codes.abs().max() == qmax
    else:
        assert int((codes & 0x0F).min()) >= 1 and int((codes >> 4).max()) <= 15   # offset codes 1..15


def test_bad_group_size_and_bits():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_groupwise(torch.randn(4, 96), 8, group_size=40)
    with pytest.raises(ValueError, match="bits"):
        quantize_groupwise(torch.randn(4, 96), 3, group_size=32)


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_embedding_model_saves_and_loads(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden=64, tied=tied)
    quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
    emb_w = model.model.embed_tokens.weight.detach().clone()
    head_w = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        before = model(IDS).logits
    desc = quantize_embeddings_(model, bits=8, group_size=32)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedTiedHead if tied else QuantizedLinear)
    assert desc["tied_head"] is tied
    # the quantized modules compute what a dense model with the dequantized matrices computes
    with torch.no_grad():
        after = model(IDS).logits
        emb_q = model.model.embed_tokens.weight
        torch.testing.assert_close(model.model.embed_tokens(IDS), emb_q[IDS])
        x = torch.randn(3, 64)
        torch.testing.assert_close(model.lm_head(x), x @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)
    assert (emb_q - emb_w).abs().max() <= emb_w.abs().max() / 127
    assert (model.lm_head.weight - head_w).abs().max() <= head_w.abs().max() / 127
    assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()

    save_quantized(model, tmp_path / "m", scale_dtype=torch.float32)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["embedding_quant"]["bits"] == 8 and qc["embedding_quant"]["tied_head"] is tied
    rep = size_report(tmp_path / "m")
    assert rep["components"]["embeddings"] == 96 * 64 + 96 * 2 * 2          # int8 codes + fp16 scales
    assert rep["components"]["head"] == (0 if tied else 96 * 64 + 96 * 2 * 2)
    for loaded in (load_quantized(tmp_path / "m"), AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding)
        assert loaded.model.embed_tokens.scales.dtype == torch.float16
        if tied:
            assert loaded.lm_head.embedding is loaded.model.embed_tokens
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, after, rtol=0, atol=2e-5)


def test_four_bit_and_dtype_follow_the_model(tmp_path):
    model = make_tiny_llama(hidden=64, tied=True)
    quantize_embeddings_(model, bits=4, group_size=32)
    assert model.model.embed_tokens.qweight.shape == (96, 32)
    model.to(torch.bfloat16)
    assert model.model.embed_tokens(IDS).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(IDS).logits.dtype == torch.bfloat16


def test_gemma_embedding_scale_is_kept():
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128)
    model = Gemma3ForCausalLM(cfg).eval()
    ref = model.model.embed_tokens(IDS)
    quantize_embeddings_(model, bits=8, group_size=32)
    out = model.model.embed_tokens(IDS)
    assert ref.abs().max() > 2 * model.model.embed_tokens.weight.abs().max()   # the scale is large (sqrt 64)
    torch.testing.assert_close(out, ref, rtol=0, atol=ref.abs().max().item() / 100)
