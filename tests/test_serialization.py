"""Packed format: save_quantized / load_quantized / from_pretrained round trips and bad-input errors."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig, RaBiTLinear, quantize_
from rabit.packed_layer import PackedRaBiTLinear
from rabit.serialization import (bits_per_weight, load_quantized, pack_model_, packed_layers, save_quantized,
                                 size_report)

IDS = torch.tensor([[1, 5, 9, 33, 17, 2, 60, 71, 8, 90, 4, 3]])


def _quantized(tie=False, exclude=None, trained=True, seed=0):
    if tie:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = make_tiny_llama(seed=seed)
    quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0, exclude=exclude))
    if trained:   # a few optimizer steps so that signs and scales differ from their initialization
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            loss = model(IDS, labels=IDS).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_roundtrip_fp32_exact_and_fp16_close(tmp_path):
    model = _quantized()
    ref = _logits(model)
    save_quantized(model, tmp_path / "q32", scale_dtype=torch.float32, dtype=torch.float32)
    # the caller's model is not modified
    assert isinstance(model.model.layers[0].self_attn.q_proj, RaBiTLinear)
    assert torch.equal(_logits(model), ref)
    q32 = load_quantized(tmp_path / "q32")
    assert isinstance(q32.model.layers[0].mlp.down_proj, PackedRaBiTLinear)
    assert len(packed_layers(q32)) == 14 and not q32.training
    torch.testing.assert_close(_logits(q32), ref, rtol=0, atol=2e-5)

    save_quantized(model, tmp_path / "q16")
    q16 = load_quantized(tmp_path / "q16")
    assert q16.model.layers[1].self_attn.o_proj.g.dtype == torch.float16
    err = (_logits(q16) - ref).abs().max().item()
    assert err < 2e-2 * ref.abs().max().item()

    qc = json.loads((tmp_path / "q16" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "rabit" and qc["format_version"] == 1 and qc["num_paths"] == 2
    assert qc["packing"]["layout"] == "tiled16x32" and qc["scale_dtype"] == "float16"
    assert "model.layers.0.self_attn.q_proj" in qc["modules"] and "lm_head" not in qc["modules"]
    assert qc["rabit_config"]["init"] == "svid"
    assert q16.rabit_config.init == "svid"


def test_pack_model_in_place_and_save_packed(tmp_path):
    model = _quantized()
    ref = _logits(model)
    pack_model_(model, scale_dtype=torch.float32)
    assert not any(isinstance(m, RaBiTLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=2e-5)
    save_quantized(model, tmp_path / "p", dtype=torch.float32)   # keeps the packed layers' fp32 scales
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["scale_dtype"] == "float32"
    torch.testing.assert_close(_logits(load_quantized(tmp_path / "p")), ref, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="no RaBiT"):
        save_quantized(make_tiny_llama(), tmp_path / "none")


@pytest.mark.parametrize("exclude", [None, ("embed",)])
def test_tied_embeddings_survive(tmp_path, exclude):
    from transformers import AutoModelForCausalLM

    model = _quantized(tie=True, exclude=exclude, trained=False)
    ref = _logits(model)
    save_quantized(model, tmp_path / "t", scale_dtype=torch.float32, dtype=torch.float32)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    for loaded in (load_quantized(tmp_path / "t"), AutoModelForCausalLM.from_pretrained(tmp_path / "t")):
        torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=2e-5)
        if exclude is None:   # lm_head kept in full precision: still the embedding matrix, stored once
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
            assert cfg["quantization_config"]["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
        else:                 # lm_head quantized: no longer tied
            assert isinstance(loaded.lm_head, PackedRaBiTLinear) and cfg["tie_word_embeddings"] is False


def test_from_pretrained_after_import_rabit(tmp_path):
    """A fresh interpreter: `import rabit` is enough for AutoModelForCausalLM.from_pretrained."""
    model = _quantized(trained=False)
    save_quantized(model, tmp_path / "m", scale_dtype=torch.float32, dtype=torch.float32)
    torch.save(_logits(model), tmp_path / "ref.pt")
    code = (
        "import sys, torch, rabit\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "from rabit.packed_layer import PackedRaBiTLinear\n"
        "assert isinstance(m.model.layers[0].self_attn.q_proj, PackedRaBiTLinear)\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): d = (m(ids).logits - ref).abs().max().item()\n"
        "assert d < 2e-5, d\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_tokenizer_files_and_load_model(tmp_path):
    from rabit.models import load_model
    from rabit.testing import tiny_tokenizer

    model = _quantized(trained=False)
    save_quantized(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    assert (tmp_path / "m" / "tokenizer.json").exists()
    loaded, tok = load_model(str(tmp_path / "m"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, PackedRaBiTLinear)
    assert tok.decode(tok("Mr. Darcy").input_ids) == "Mr. Darcy"


def test_bits_per_weight_and_size_report(tmp_path):
    layer = PackedRaBiTLinear.from_paths(
        [(torch.rand(1024) + 0.1, torch.randint(0, 2, (1024, 2048)).float() * 2 - 1, torch.rand(2048) + 0.1)] * 2)
    assert layer.bits_per_weight() <= 2.1
    model = _quantized(trained=False)
    save_quantized(model, tmp_path / "m")
    rep = size_report(tmp_path / "m")
    # tiny layers: the fp16 scales weigh a lot, 2 + 32 * (out + in) / (out * in)
    assert rep["quantized_weights"] == sum(m.in_features * m.out_features for m in packed_layers(
        load_quantized(tmp_path / "m")).values())
    assert rep["quantized_bits_per_weight"] == pytest.approx(bits_per_weight(model), rel=1e-6)
    assert rep["file_bytes"] < rep["bf16_bytes"]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from rabit.testing import tiny_tokenizer

    path = tmp_path_factory.mktemp("saved") / "m"
    save_quantized(_quantized(trained=False), path, tokenizer=tiny_tokenizer())
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), "quant_method is 'gptq'"),
    (lambda c: c["quantization_config"].update(format_version=99), "format_version 99 is not supported"),
    (lambda c: c["quantization_config"]["packing"].update(layout="rowmajor"), "packing layout 'rowmajor'"),
    (lambda c: c["quantization_config"].update(modules=["model.layers.0.nope"]), "model.layers.0.nope"),
    (lambda c: c["quantization_config"].update(num_paths=3), "model.safetensors.*shape"),
])
def test_bad_config(saved, tmp_path, edit, match):
    path = _copy(saved, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=match) as e:   # the structure checks, without the checksums
        load_quantized(path, verify=False)
    if "no quantization_config" in match or "format_version" in match:
        assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match="config.json") as e:   # with them, whichever check comes first
        load_quantized(path)


def _rewrite_tensors(path, fn):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.g":
                         t["model.layers.0.self_attn.q_proj.g"][:, :-1].contiguous()}),
     r"'model.layers.0.self_attn.q_proj.g' has shape \[2, 31\], expected \[2, 32\]"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.packed":
                         t["model.layers.1.mlp.up_proj.packed"].to(torch.int8)}),
     r"'model.layers.1.mlp.up_proj.packed' has dtype torch.int8, expected torch.uint8"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.h": t["model.layers.1.mlp.up_proj.h"].float()}),
     r"'model.layers.1.mlp.up_proj.h' has dtype torch.float32, expected torch.float16"),
    (lambda t: t.pop("model.norm.weight"), r"missing tensor 'model.norm.weight'"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 64)}),
     r"unexpected tensor 'model.layers.0.mlp.down_proj.weight'"),
])
def test_bad_tensors(saved, tmp_path, edit, match):
    from transformers import AutoModelForCausalLM

    from rabit.integrity import IntegrityError, verification_skipped

    path = _copy(saved, tmp_path)
    _rewrite_tensors(path, edit)
    with pytest.raises(ValueError, match=match) as e:   # the structure checks, without the checksums
        load_quantized(path, verify=False)
    assert "model.safetensors" in str(e.value)
    with pytest.raises(ValueError, match=match), verification_skipped():   # the transformers entry point too
        AutoModelForCausalLM.from_pretrained(path)
    for load in (load_quantized, AutoModelForCausalLM.from_pretrained):   # the rewrite lost the checksums
        with pytest.raises(IntegrityError, match="model.safetensors: its checksum record is missing"):
            load(path)


def test_truncated_and_missing_weights(saved, tmp_path):
    path = _copy(saved, tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_quantized(path)
    f.write_bytes(data[:4])
    with pytest.raises(ValueError, match="model.safetensors.*not a valid safetensors"):
        load_quantized(path)
    f.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found.*pytorch_model.bin"):
        load_quantized(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_quantized(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path / "empty")


def test_cli_error_is_one_line(saved, tmp_path, capsys):
    from rabit.cli import main

    path = _copy(saved, tmp_path)
    _edit_config(path, lambda c: c["quantization_config"].update(format_version=7))
    assert main(["generate", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "format_version 7" in err


def test_added_biases_are_saved_listed_and_decoded(tmp_path):
    # RaBiTConfig.add_bias: quantized layers carry a bias the Llama architecture does not have
    from rabit.generate import StaticDecoder

    model = make_tiny_llama(seed=4)
    quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0, add_bias=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, RaBiTLinear):
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=gen))
    ref = _logits(model.eval())
    save_quantized(model, tmp_path / "q", scale_dtype=torch.float32, dtype=torch.float32)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["bias_modules"] == qc["modules"]
    q = load_quantized(tmp_path / "q")
    assert q.model.layers[1].mlp.down_proj.bias is not None
    torch.testing.assert_close(_logits(q), ref, rtol=0, atol=2e-5)
    dec = StaticDecoder(q, max_len=16)
    torch.testing.assert_close(dec.prefill(IDS, all_logits=True), ref, rtol=0, atol=1e-4)
    # a list naming a module that is not quantized is refused
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    for bad in (["lm_head"], [{"name": "lm_head"}], "model.layers.0.mlp.up_proj"):
        cfg["quantization_config"]["bias_modules"] = bad
        (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="bias_modules must be a list of names from modules"):
            load_quantized(tmp_path / "q", verify=False)
