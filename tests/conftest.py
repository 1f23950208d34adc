import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_tiny_llama(vocab_size=96, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=0, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def write_run_files(root, tokenizer, train_chars=20000, eval_chars=6000):
    """A tiny Llama + `tokenizer` folder (root/model) and small local corpora (root/train.txt, root/eval.txt)."""
    from pathlib import Path

    make_tiny_llama(vocab_size=512).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpora = Path(__file__).resolve().parents[1] / "src" / "rabit" / "corpora" / "austen"
    (root / "train.txt").write_text((corpora / "emma.txt").read_text(encoding="utf-8")[:train_chars],
                                    encoding="utf-8")
    (root / "eval.txt").write_text((corpora / "persuasion.txt").read_text(encoding="utf-8")[:eval_chars],
                                   encoding="utf-8")
    return root


@pytest.fixture
def single_thread():
    """One torch thread for the test: tiny models on a shared 2-core machine avoid OpenMP spin-waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
