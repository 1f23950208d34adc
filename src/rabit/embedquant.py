"""Optional group-wise 8- or 4-bit quantization of the input embedding and the output head.

After 2-bit quantization of the decoder layers, the embedding matrix is most of a small model's file (SmolLM2-135M:
57 of 85 MB in bf16; Gemma 3 270M: 336 of ~430 MB). Symmetric absmax quantization per group of `group_size`
consecutive values of a row, with one fp16 scale per group, stores it in bits + 16 / group_size bits per value.

* ``quantize_groupwise`` / ``dequantize_groupwise``: the math, on tensors.
* ``QuantizedEmbedding``: the lookup dequantizes only the rows it gathers (keeps Gemma's embedding scaling).
* ``QuantizedTiedHead``: an output head tied to a QuantizedEmbedding (no storage of its own).
* ``QuantizedLinear``: an untied output head (dequantized on the fly, in chunks of rows).
* Both heads run ``rabit.kernels.groupwise_linear`` (a native kernel over the codes) for decoding-sized inputs.
* ``quantize_embeddings_``: converts a model in place; ``build_skeleton_`` rebuilds the modules on load from the
  ``embedding_quant`` entry of the quantization_config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
_HEAD_CHUNK_ROWS = 16384   # rows of the head dequantized at once: bounds the transient memory
# For a few input rows (decoding) the dequantized chunk is used once, so it should stay in the CPU's cache: with
# 512 rows a 262,144 x 640 head took ~0.1 s per token instead of ~0.7 (docs/RESULTS.md section 12).
_DECODE_CHUNK_ROWS = 512
_DECODE_MAX_INPUT_ROWS = 64


def _qmax(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"embedding quantization bits must be one of {BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


def check_group_size(cols: int, group_size: int) -> None:
    if group_size < 1 or cols % group_size:
        raise ValueError(f"group size {group_size} does not divide the embedding width {cols}; choose a divisor "
                         f"(e.g. 32 or 64 for most models)")
    if group_size % 2:
        raise ValueError(f"group size must be even (4-bit codes are packed two per byte), got {group_size}")


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of a (rows, cols) matrix per group of `group_size` columns.

    Returns (codes, scales): codes int8 (rows, cols) in [-qmax, qmax] for 8 bits, or uint8 (rows, cols / 2) with
    two 4-bit codes offset by 8 per byte (even column in the low nibble) for 4 bits; scales (rows, cols / group)
    in `scale_dtype`. w ~= codes * scale, error at most scale / 2 per value (plus the scale's rounding).
    """
    qmax = _qmax(bits)
    rows, cols = w.shape
    check_group_size(cols, group_size)
    g = w.detach().float().reshape(rows, cols // group_size, group_size)
    scales = (g.abs().amax(dim=-1) / qmax).to(scale_dtype)
    s = scales.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)   # all-zero groups: codes 0
    codes = torch.round(g / s).clamp_(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:
        u = (codes + 8).to(torch.uint8)
        codes = u[:, 0::2] | (u[:, 1::2] << 4)
    return codes.contiguous(), scales.contiguous()


def dequantize_groupwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) matrix of `quantize_groupwise`'s codes and scales (any leading rows subset)."""
    if bits == 4:
        low = (codes & 0x0F).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        codes = torch.stack([low, high], dim=-1).reshape(codes.shape[0], -1)
    rows, cols = codes.shape
    w = codes.reshape(rows, cols // group_size, group_size).to(torch.float32) * scales.float().unsqueeze(-1)
    return w.reshape(rows, cols).to(dtype)


class _GroupQuantized(nn.Module):
    """Shared storage: buffers ``qweight`` and ``scales``; `dtype` is the dtype outputs are produced in (follows
    ``model.to(dtype)`` like a floating-point parameter would)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, dtype: torch.dtype,
                 scale_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        _qmax(bits)
        check_group_size(cols, group_size)
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        shape = (rows, cols // 2) if bits == 4 else (rows, cols)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8 if bits == 4 else torch.int8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(rows, cols // group_size, dtype=scale_dtype, device=device))

    def _fill(self, w: torch.Tensor) -> None:
        codes, scales = quantize_groupwise(w, self.bits, self.group_size, self.scales.dtype)
        with torch.no_grad():
            self.qweight.copy_(codes)
            self.scales.copy_(scales)

    def dequantized(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        if rows is None:
            rows = slice(None)
        return dequantize_groupwise(self.qweight[rows], self.scales[rows], self.bits, self.group_size, self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix (for code that reads ``.weight``: its dtype, device, or values)."""
        return self.dequantized()

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)


class QuantizedEmbedding(_GroupQuantized):
    """nn.Embedding with group-quantized rows. embed_scale: Gemma's sqrt(hidden) factor (None: 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, group_size, dtype, scale_dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.embed_scale = padding_idx, embed_scale

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       scale_dtype: torch.dtype = torch.float16) -> QuantizedEmbedding:
        scale = getattr(emb, "scalar_embed_scale", None)
        m = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, emb.padding_idx,
                float(scale) if scale is not None else None, emb.weight.dtype, scale_dtype, emb.weight.device)
        m._fill(emb.weight)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = self.dequantized(flat).reshape(*ids.shape, self.embedding_dim)
        return out * self.embed_scale if self.embed_scale is not None else out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""))


def _chunked_linear(x: torch.Tensor, layer: _GroupQuantized, bias: torch.Tensor | None) -> torch.Tensor:
    from .kernels import groupwise_linear   # the kernels import this module's math: import at use

    # decoding: the native kernel reads the codes once, never materializing the dequantized table
    y = groupwise_linear(x, layer.qweight, layer.scales, layer.bits, layer.group_size, bias)
    if y is not None:
        return y
    rows = layer.qweight.shape[0]
    chunk = _DECODE_CHUNK_ROWS if x.numel() // x.shape[-1] <= _DECODE_MAX_INPUT_ROWS else _HEAD_CHUNK_ROWS
    outs = [F.linear(x, layer.dequantized(slice(i, i + chunk)).to(x.dtype)) for i in range(0, rows, chunk)]
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y + bias.to(y.dtype) if bias is not None else y


class QuantizedTiedHead(nn.Module):
    """Output head sharing a QuantizedEmbedding's codes (the tied lm_head): logits = x @ E^T, no own storage."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding   # not a submodule: its tensors are stored once, under its name
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chunked_linear(x, self.embedding, None)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.dequantized()


class QuantizedLinear(_GroupQuantized):
    """An untied output head (out, in) with group-quantized rows; bias (if any) kept in `dtype`."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 bias: bool = False, dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.float16,
                 device=None) -> None:
        super().__init__(out_features, in_features, bits, group_size, dtype, scale_dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                    scale_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
        m = cls(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, lin.weight.dtype,
                scale_dtype, lin.weight.device)
        m._fill(lin.weight)
        if lin.bias is not None:
            with torch.no_grad():
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chunked_linear(x, self, self.bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_embeddings_(model: nn.Module, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE,
                         head: bool = True) -> dict:
    """Quantize `model`'s input embedding (and its output head: tied -> shares the codes; untied nn.Linear ->
    its own codes, if `head`) group-wise to `bits`, in place. A head already quantized by RaBiT is left alone.

    Returns the ``embedding_quant`` description save_quantized records in the quantization_config.
    """
    from .storage import component_modules

    names = component_modules(model)
    if "embeddings" not in names:
        raise ValueError("the model has no input embedding to quantize")
    emb_name, head_name = names["embeddings"], names.get("head")
    emb = model.get_submodule(emb_name)
    if isinstance(emb, QuantizedEmbedding):
        raise ValueError("the embeddings are already quantized")
    out = model.get_output_embeddings() if head_name else None
    tied = out is not None and isinstance(out, nn.Linear) and out.weight is emb.weight
    qemb = QuantizedEmbedding.from_embedding(emb, bits, group_size)
    _set(model, emb_name, qemb)
    desc = {"bits": bits, "group_size": group_size, "scale_dtype": "float16", "embedding": emb_name}
    if tied:
        _set(model, head_name, QuantizedTiedHead(qemb))
        desc["head"], desc["tied_head"] = head_name, True
    elif head and type(out) is nn.Linear:
        _set(model, head_name, QuantizedLinear.from_linear(out, bits, group_size))
        desc["head"], desc["tied_head"] = head_name, False
    config = getattr(model, "config", None)
    if tied and config is not None:
        config.tie_word_embeddings = False   # transformers must not re-tie: the head reads the embedding's codes
    return desc


def validate_embedding_quant(eq, source: str) -> None:
    if not isinstance(eq, dict) or eq.get("bits") not in BITS or not isinstance(eq.get("group_size"), int) \
            or not isinstance(eq.get("embedding"), str):
        raise ValueError(f"{source}: embedding_quant must give bits (one of {BITS}), group_size and embedding")


def build_skeleton_(model: nn.Module, eq: dict, device="meta") -> None:
    """Replace the embedding (and head) named in `eq` by empty quantized modules before the weights load."""
    scale_dtype = getattr(torch, eq.get("scale_dtype", "float16"))
    emb = model.get_submodule(eq["embedding"])
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"embedding_quant names {eq['embedding']!r}, which is not an embedding")
    scale = getattr(emb, "scalar_embed_scale", None)
    qemb = QuantizedEmbedding(emb.num_embeddings, emb.embedding_dim, eq["bits"], eq["group_size"], emb.padding_idx,
                              float(scale) if scale is not None else None, emb.weight.dtype, scale_dtype, device)
    _set(model, eq["embedding"], qemb)
    head = eq.get("head")
    if head:
        old = model.get_submodule(head)
        if eq.get("tied_head"):
            _set(model, head, QuantizedTiedHead(qemb))
        elif isinstance(old, nn.Linear):
            _set(model, head, QuantizedLinear(old.in_features, old.out_features, eq["bits"], eq["group_size"],
                                              old.bias is not None, old.weight.dtype, scale_dtype, device))


def describe(model: nn.Module) -> dict | None:
    """The ``embedding_quant`` entry for `model` (None when its embedding is not quantized)."""
    desc = None
    for name, m in model.named_modules():
        if isinstance(m, QuantizedEmbedding):
            desc = {"bits": m.bits, "group_size": m.group_size, "scale_dtype": str(m.scales.dtype).removeprefix(
                "torch."), "embedding": name}
    if desc is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, QuantizedTiedHead) or (isinstance(m, QuantizedLinear)):
            desc["head"], desc["tied_head"] = name, isinstance(m, QuantizedTiedHead)
    return desc


def fixed_dtype_keys(model: nn.Module) -> set[str]:
    """State-dict keys stored in their own dtype, not the storage dtype of unquantized tensors (the scales)."""
    return {f"{n}.scales" for n, m in model.named_modules() if isinstance(m, _GroupQuantized)}
