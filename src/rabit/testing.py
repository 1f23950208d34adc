"""Small offline fixtures for tests and examples (no Hugging Face hub access)."""

from __future__ import annotations

from pathlib import Path

_TINY_TOKENIZER_JSON: str | None = None


def tiny_tokenizer():
    """A small byte-level BPE tokenizer (512 ids) as a ``transformers.PreTrainedTokenizerFast``.

    Trained in-process, deterministically, on the first 32 KB of *Pride and Prejudice* from the
    packaged corpora. Every byte is in the vocabulary, so any text round-trips through
    encode/decode. Special tokens: ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS), ``<pad>``=3,
    matching LlamaConfig's default bos/eos ids; no special tokens are added on encoding.
    ``name_or_path`` is ``"rabit-tiny-tokenizer"``. The trained tokenizer is cached in this module;
    each call returns a new wrapper object (about 2 ms), so callers may modify theirs freely.
    """
    global _TINY_TOKENIZER_JSON
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if _TINY_TOKENIZER_JSON is None:
        path = Path(__file__).resolve().parent / "corpora" / "austen" / "prideprejudice.txt"
        text = path.read_bytes().decode("utf-8")[:32768]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([text], trainer=trainer)
        _TINY_TOKENIZER_JSON = tok.to_str()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_TINY_TOKENIZER_JSON),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="rabit-tiny-tokenizer",
    )
