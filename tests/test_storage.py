"""16-bit storage of the unquantized tensors of a saved model, and the size report per component."""
import copy
import json

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig, RaBiTLinear, quantize_
from rabit.serialization import load_quantized, read_safetensors_header, save_quantized, size_report
from rabit.storage import checkpoint_dtype, format_size_report, storage_dtype

IDS = torch.tensor([[1, 5, 9, 33, 17, 2, 60, 71, 8, 90, 4, 3]])


def _quantized(vocab_size=96):
    model = make_tiny_llama(vocab_size=vocab_size)
    return quantize_(model, RaBiTConfig(precondition=False, init="svid", isvid_rounds=0)).eval()


def _rounded(model, dtype):
    """A copy of `model` whose unquantized float tensors went through `dtype` (what a 16-bit file holds)."""
    ref = copy.deepcopy(model)
    quantized = tuple(n + "." for n, m in ref.named_modules() if isinstance(m, RaBiTLinear))
    with torch.no_grad():
        for name, t in ref.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not name.startswith(quantized):
                t.copy_(t.to(dtype).to(t.dtype))
    return ref


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_default_storage_is_bf16_and_reload_matches_rounded_model(tmp_path):
    model = _quantized()
    save_quantized(model, tmp_path / "m", scale_dtype=torch.float32)
    header = read_safetensors_header(tmp_path / "m" / "model.safetensors")
    assert header["model.embed_tokens.weight"][0] == torch.bfloat16
    assert header["lm_head.weight"][0] == torch.bfloat16
    assert header["model.norm.weight"][0] == torch.bfloat16
    assert header["model.layers.0.self_attn.q_proj.g"][0] == torch.float32   # scales: scale_dtype
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["quantization_config"]["storage_dtype"] == "bfloat16"

    loaded = load_quantized(tmp_path / "m")
    assert loaded.model.embed_tokens.weight.dtype == torch.float32   # computes in the dtype it was saved from
    rounded = _logits(_rounded(model, torch.bfloat16))
    torch.testing.assert_close(_logits(loaded), rounded, rtol=0, atol=2e-5)
    # and the rounding is visible: the exact fp32 model differs by more than the tolerance
    assert (_logits(model) - rounded).abs().max() > 1e-4


def test_keep_fp32_is_exact_and_twice_the_unquantized_bytes(tmp_path):
    model = _quantized(vocab_size=512)
    save_quantized(model, tmp_path / "bf16", scale_dtype=torch.float32)
    save_quantized(model, tmp_path / "fp32", scale_dtype=torch.float32, dtype=torch.float32)
    torch.testing.assert_close(_logits(load_quantized(tmp_path / "fp32")), _logits(model), rtol=0, atol=2e-5)
    small, big = size_report(tmp_path / "bf16"), size_report(tmp_path / "fp32")
    for comp in ("embeddings", "head", "other"):
        assert big["components"][comp] == 2 * small["components"][comp] > 0
    assert big["components"]["quantized_layers"] == small["components"]["quantized_layers"] > 0
    # the components are the whole file but for the safetensors header
    header_bytes = small["file_bytes"] - sum(small["components"].values())
    assert 0 < header_bytes < 20_000
    assert small["components"]["embeddings"] == 512 * 32 * 2
    assert small["storage_dtype"] == "bfloat16" and big["storage_dtype"] == "float32"
    line = format_size_report(small)
    assert "embeddings 0.0 MB" in line and "quantized layers" in line and "bfloat16" in line


def test_source_dtype_wins_when_16_bit(tmp_path):
    model = _quantized()
    assert storage_dtype(model) == torch.bfloat16          # fp32 model, no source recorded
    model.rabit_source_dtype = torch.float16                # what load_model records for an fp16 checkpoint
    assert storage_dtype(model) == torch.float16
    save_quantized(model, tmp_path / "m")
    assert size_report(tmp_path / "m")["storage_dtype"] == "float16"
    model.rabit_source_dtype = torch.float32                # an fp32 checkpoint: still 16 bits
    assert storage_dtype(model) == torch.bfloat16


def test_load_model_records_the_checkpoint_dtype(tmp_path):
    from rabit.models import load_model
    from rabit.testing import tiny_tokenizer

    model = make_tiny_llama(vocab_size=512).to(torch.float16)
    model.config.dtype = torch.float16
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    assert checkpoint_dtype(tmp_path / "src") == torch.float16
    loaded, _ = load_model(str(tmp_path / "src"))
    assert next(loaded.parameters()).dtype == torch.float32 and loaded.rabit_source_dtype == torch.float16
    assert checkpoint_dtype(tmp_path / "missing") is None


def test_bad_storage_dtype_in_config(tmp_path):
    save_quantized(_quantized(), tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["storage_dtype"] = "float8"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="storage_dtype"):
        load_quantized(tmp_path / "m")
