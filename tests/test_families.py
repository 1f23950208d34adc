"""The static-cache decoder on Qwen 2.5, Mistral and Gemma 3: logits and greedy tokens equal the Hugging Face
forward on tiny random configs, sliding windows shorter than the sequence and soft-capping included (Gemma 2 for
attention scores: transformers' Gemma 3 ignores attn_logit_softcapping)."""
import logging

import pytest
import torch

from rabit.decoder_plan import decoder_plan
from rabit.generate import HFStaticDecoder, StaticDecoder, decode_tokens, make_decoder

T = 24   # longer than every window below, so that the windows matter


def _qwen2(sliding=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=sliding, sliding_window=7, max_window_layers=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():   # random biases (transformers initializes them to zero)
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
    return model


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, sliding_window=6)
    return MistralForCausalLM(cfg)


def _gemma3(softcap=None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2,
                           query_pre_attn_scalar=24, attn_logit_softcapping=softcap,
                           final_logit_softcapping=softcap and 3.0, attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():   # non-trivial norm weights, so that the (1 + w) convention is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                       final_logit_softcapping=3.0, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg)


MODELS = {"qwen2.5": _qwen2, "qwen2.5-sliding": lambda: _qwen2(True), "mistral": _mistral, "gemma3": _gemma3,
          "gemma3-softcap": lambda: _gemma3(softcap=2.0), "gemma2-softcap": _gemma2}


def _build(name, packed=False):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if packed:
        from rabit import RaBiTConfig, quantize_
        from rabit.serialization import pack_model_

        quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0))
        pack_model_(model, scale_dtype=torch.float32)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_matches_hf_forward(name):
    model = _build(name)
    plan, why = decoder_plan(model)
    assert plan is not None, why
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    dec = StaticDecoder(model, max_len=T)
    out = [dec.prefill(ids[:, :9], all_logits=True)] + [dec.step(int(t)) for t in ids[0, 9:]]
    torch.testing.assert_close(torch.cat(out, 1), ref, rtol=0, atol=1e-4)
    dec.reset()   # a prompt in two chunks, the second one crossing the window
    dec.prefill(ids[:, :4])
    torch.testing.assert_close(dec.prefill(ids[:, 4:], all_logits=True), ref[:, 4:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["mistral", "gemma3-softcap", "gemma2-softcap"])
def test_greedy_tokens_match_transformers_generate(name):
    model = _build(name)
    prompt = torch.tensor([[3, 17, 5, 99, 42]])
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    dec = make_decoder(model, 21)
    assert isinstance(dec, StaticDecoder)
    res = decode_tokens(dec, prompt, 16)
    assert res.tokens == hf[0, 5:].tolist()


def test_packed_gemma3_matches_hf_forward():
    model = _build("gemma3", packed=True)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    dec = StaticDecoder(model, max_len=12)
    out = [dec.prefill(ids[:, :3], all_logits=True)] + [dec.step(int(t)) for t in ids[0, 3:]]
    torch.testing.assert_close(torch.cat(out, 1), ref, rtol=0, atol=1e-4)


def test_unsupported_family_falls_back_with_one_notice(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert decoder_plan(model)[0] is None
    with caplog.at_level(logging.WARNING, logger="rabit.generate"):
        decs = [make_decoder(model, 8) for _ in range(3)]
    assert all(isinstance(d, HFStaticDecoder) for d in decs)
    notices = [r for r in caplog.records if "no fast decoder" in r.getMessage()]
    assert len(notices) <= 1 and all("\n" not in r.getMessage() for r in notices)


@pytest.mark.parametrize("name", ["gemma3", "qwen2.5-sliding", "mistral"])
@pytest.mark.parametrize("inputs", ["block", "residual", "fp"])
def test_block_stage_runs_on_every_family(name, inputs):
    # Gemma 3 materializes its attention masks per batch: every pass of the block stage must use whole batches
    # (a real Gemma 3 270M run once failed on a 1-row pass). The refinement must lower each layer's output error.
    from rabit import RaBiTConfig
    from rabit.train import make_student
    from rabit.train.blockwise import BlockConfig, BlockReconstruction

    teacher = _build(name)
    calib = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))
    student = make_student(teacher, RaBiTConfig(), calibration=calib[:4])
    cfg = BlockConfig(samples=8, seq_len=24, batch_size=4, refine_samples=6, refine_inputs=inputs)
    records = BlockReconstruction(teacher, student, calib, cfg, progress=False).run()
    assert len(records) == len(teacher.model.layers)
    assert all(r.refine_ratio < 1 for r in records)
