"""Whether sequences start with BOS: the one decision used by training, calibration, perplexity and generation.

Some models are trained with every sequence starting with BOS and degrade badly without it (Gemma: perplexity
several times higher), others never see BOS (SmolLM2, GPT-2 style tokenizers). The tokenizer knows which: its
own encoding adds BOS or not (``tokenizer("x")``, what ``add_bos_token`` configures). rabit follows that rule
everywhere unless the user overrides it, so training and evaluation never differ silently.
"""
from __future__ import annotations

from dataclasses import dataclass


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when `tokenizer`'s ordinary encoding (special tokens on) starts with its BOS token.

    Decided from what the tokenizer produces, which covers every way of configuring it (``add_bos_token``, a
    post-processor template, a slow SentencePiece tokenizer); a tokenizer without a BOS token never adds one.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    for probe in ("x", "Hello"):
        ids = tokenizer(probe, add_special_tokens=True).input_ids
        if ids:
            return ids[0] == bos
    return bool(getattr(tokenizer, "add_bos_token", False))


@dataclass(frozen=True)
class BosChoice:
    """Whether to prefix BOS (`use`), the id to prefix (`token_id`, None when not used) and who decided
    (`source`: "tokenizer" or "flag")."""
    use: bool
    token_id: int | None
    source: str

    def describe(self) -> str:
        return f"BOS {'on' if self.use else 'off'} ({'from the tokenizer' if self.source == 'tokenizer' else 'set by flag'})"

    def to_dict(self) -> dict:
        return {"use": self.use, "token_id": self.token_id, "source": self.source}


def resolve_bos(tokenizer, override: bool | None = None) -> BosChoice:
    """The BOS decision for `tokenizer`: `override` (a --bos / --no-bos flag) when given, else the
    tokenizer's own rule (tokenizer_adds_bos). Asking for BOS from a tokenizer without one is an error."""
    if override is None:
        use, source = tokenizer_adds_bos(tokenizer), "tokenizer"
    else:
        use, source = bool(override), "flag"
    bos = getattr(tokenizer, "bos_token_id", None)
    if use and bos is None:
        raise ValueError("--bos: the tokenizer has no BOS token")
    return BosChoice(use, int(bos) if use else None, source)


def add_bos_args(parser, what: str = "every sequence (training, calibration, perplexity, generation)") -> None:
    """--bos / --no-bos on an argparse parser (dest "bos", default None: the tokenizer's rule)."""
    import argparse

    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help=f"start {what} with BOS (default: as the tokenizer does when encoding text)")


__all__ = ["tokenizer_adds_bos", "resolve_bos", "BosChoice", "add_bos_args"]
