"""Residual-stream rotation (rabit.rotation): the rotated model computes the same logits, norms become ones, a tied
head is untied, and what cannot be rotated is refused before anything changes."""
import pytest
import torch

from conftest import make_tiny_llama
from test_families import _gemma3, _mistral, _qwen2
from rabit.rotation import random_orthogonal, rotate_, rotate_residual_, unsupported_reason


def _with_norm_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # non-trivial norm weights (transformers initializes them to ones), so folding matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


BUILDERS = {"llama": make_tiny_llama, "llama-tied": _tied_llama, "qwen2.5-bias": _qwen2, "mistral": _mistral,
            "qwen3": _qwen3}


@pytest.mark.parametrize("d,seed", [(1, 0), (7, 0), (32, 1), (33, 5)])
def test_random_orthogonal(d, seed):
    q = random_orthogonal(d, seed)
    assert q.dtype == torch.float64 and q.shape == (d, d)
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(d, seed))           # reproducible
    if d > 1:
        assert not torch.allclose(q, random_orthogonal(d, seed + 1))


def test_random_orthogonal_rejects_empty():
    with pytest.raises(ValueError, match="positive"):
        random_orthogonal(0, 0)


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rotation_keeps_the_logits(name, values):
    model = _with_norm_weights(BUILDERS[name]())
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rotate_(model, seed=2, values=values, check=False)   # compared here, not by rotate_'s own check
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)   # it did rotate
    for n, p in model.named_parameters():
        if "layernorm" in n or n == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), n                # folded into the layers
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False


def test_rotation_moves_outlier_channels_off_the_axes():
    """The point of the rotation: a weight whose input columns differ 100x in scale has flat columns after it."""
    model = make_tiny_llama(hidden=64, heads=4, kv_heads=2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :4] *= 100.0
    def column_spread(w):
        c = w.norm(dim=0)
        return (c.max() / c.median()).item()
    assert column_spread(model.model.layers[0].mlp.up_proj.weight) > 50
    rotate_(model, seed=0)
    assert column_spread(model.model.layers[0].mlp.up_proj.weight) < 5


def test_rotated_model_saves_and_reloads_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _with_norm_weights(_tied_llama())
    rotate_(model, seed=0)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        expect = model(ids).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expect)


def test_gemma_is_refused_unchanged():
    model = _gemma3()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "Gemma3ForCausalLM" in unsupported_reason(model)
    with pytest.raises(ValueError, match="not a supported architecture"):
        rotate_(model)
    with pytest.raises(ValueError, match="not a supported architecture"):
        rotate_residual_(model, random_orthogonal(64, 0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_wrong_rotation_shapes_are_refused():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="hidden size is 32"):
        rotate_residual_(model, random_orthogonal(16, 0))
    with pytest.raises(ValueError, match="head dimension is 8"):
        rotate_residual_(model, random_orthogonal(32, 0), head_q=random_orthogonal(4, 0))


def test_the_check_catches_a_layer_the_rewrite_does_not_know():
    """A norm whose forward is not x * w (here: x * (1 + w), Gemma's form, under a Llama class) changes the logits."""
    model = _with_norm_weights(make_tiny_llama())
    norm = model.model.layers[0].input_layernorm
    orig = type(norm).forward
    norm.forward = lambda x: orig(norm, x) + x * 0.5
    with pytest.raises(RuntimeError, match="changed its logits"):
        rotate_(model, seed=0)


def test_quantize_with_rotation_scores_the_same_teacher_and_saves_a_loadable_model(tmp_path, monkeypatch, capsys):
    import json

    from conftest import write_run_files
    from test_blockwise import quantize_args
    from rabit.cli import main
    from rabit.data import eval_tokens
    from rabit.eval.perplexity import perplexity
    from rabit.models import load_model
    from rabit.testing import tiny_tokenizer

    files = write_run_files(tmp_path / "files", tiny_tokenizer())
    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [str(a) for a in quantize_args(files, out, "--rotate", "--eval-dtype", "float32")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "rotating the residual stream and the attention values (seed 0)" in captured.err
    assert "residual stream rotated with the attention values (seed 0)" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "run.json").read_text())["rotation"] == "residual+values"
    source, tok = load_model(str(files / "model"))
    stream = eval_tokens(tok, str(files / "eval.txt"))
    # the rotated teacher is the same function as the source model
    assert summary["eval"]["fp"] == pytest.approx(perplexity(source, stream, 64, None, 2), rel=1e-4)
    saved, _ = load_model(str(out / "quantized"))
    assert saved.lm_head.weight.data_ptr() != saved.model.embed_tokens.weight.data_ptr()
    for n, p in saved.named_parameters():
        if "layernorm" in n:   # folded at rotation; the distillation trains them from ones
            assert p.shape == (source.config.hidden_size,)
    assert perplexity(saved, stream, 64, None, 2) == pytest.approx(summary["eval"]["final"], rel=2e-2)
    # the rotation is part of the run's identity
    assert main(args + ["--no-rotate-values", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "rotation: 'residual+values' -> 'residual'" in err and "--resume --rotate" in err
    plain = [a for a in args if a != "--rotate"]
    assert main(plain + ["--no-rotate", "--resume"]) == 2
    # unrotated, the job would also precondition (and calibrate for it): the hint names both flags
    hint = capsys.readouterr().err.split("--resume ")[-1].split(";")[0].split()
    assert "--rotate" in hint and "--no-precondition" in hint


def test_the_default_leaves_an_unsupported_model_as_it_is_and_rotate_is_refused_there(tmp_path):
    from rabit.cli import build_parser
    from rabit.cli.options import job_from_args
    from rabit.cli.quantize import load_teacher
    from rabit.testing import tiny_tokenizer

    def parse(*argv):
        return job_from_args(build_parser().parse_args(["quantize", *argv]))

    _gemma3().save_pretrained(tmp_path / "gemma")
    tiny_tokenizer().save_pretrained(tmp_path / "gemma")
    said = []
    spec = parse("--model", str(tmp_path / "gemma"))
    load_teacher(spec, "cpu", said.append)          # the default: no rotation, and a notice saying why
    assert spec.train.optim.scale_lr == 1e-3   # the unrotated model's measured learning rate
    assert spec.rabit.precondition is True     # ... and its initialization, preconditioned by channel importance
    assert spec.rotate is False and spec.rotation == "none" and said == [
        "no rotation of the residual stream: Gemma3ForCausalLM is not a supported architecture for --rotate "
        "(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"]
    with pytest.raises(ValueError, match="Gemma3ForCausalLM is not a supported architecture"):
        load_teacher(parse("--model", str(tmp_path / "gemma"), "--rotate"), "cpu")


def test_a_rotation_is_recorded_once_and_a_bad_record_is_refused_at_load():
    from rabit.rotation import ROTATION_ATTR, check_rotation_record
    from rabit.serialization import validate_quantization_config

    model = make_tiny_llama()
    rotate_(model, seed=4, values=False)
    assert getattr(model, ROTATION_ATTR) == {"seed": 4, "values": False}
    with pytest.raises(ValueError, match="rotated before"):
        rotate_(model, seed=5)
    assert check_rotation_record({"seed": 1, "values": True}) == {"seed": 1, "values": True}
    qc = {"quant_method": "rabit", "format_version": 1, "num_paths": 2, "packing": {"layout": "tiled16x32"},
          "scale_dtype": "float16", "modules": ["a"]}
    validate_quantization_config(qc)
    for bad in ({"seed": "0", "values": True}, {"seed": 0}, {"seed": True, "values": True}, [0, True]):
        with pytest.raises(ValueError, match="rotation: expected"):
            validate_quantization_config({**qc, "rotation": bad})
