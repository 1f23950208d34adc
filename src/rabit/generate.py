"""Fast batch-1 text generation with a static KV cache (gpt-fast style), for full-precision and packed models.

Two decoders share one interface (``prefill(ids) -> logits``, ``step(token) -> logits``, ``reset()``):

* ``StaticDecoder``: a lean forward over the model's *own* modules (embeddings, norms, projections, MLP,
  rotary embedding) for the families of ``rabit.decoder_plan`` (Llama, Qwen 2/2.5/3, Mistral with its sliding
  window, Gemma 3 with sliding/global layers, soft-capping and its norm layout). The KV
  cache is one preallocated tensor per layer; decoding attends to the filled prefix only, with the query
  heads of each KV group stacked as rows (no GQA repeat, no mask). Every linear is called as a module, so
  ``nn.Linear``, ``RaBiTLinear`` and ``PackedRaBiTLinear`` all work, and the logits match the Hugging Face
  forward to float rounding. ``compile=True`` switches to fixed-shape attention over the whole cache with a
  position mask and wraps the step in ``torch.compile``.
* ``HFStaticDecoder``: any other causal LM, through ``model(...)`` with transformers' ``StaticCache``
  (``make_decoder`` says so in one log line per reason).

``make_decoder`` picks one; ``generate`` runs prompt -> text (streaming through a callback) and reports
tokens/s; ``decode_tokens`` is the timing core the benchmarks use.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .decoder_plan import decoder_plan

_log = logging.getLogger(__name__)
_NOTICED: set[str] = set()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def lean_supported(model: nn.Module) -> tuple[bool, str]:
    """Whether StaticDecoder can run this model, and why not (see rabit.decoder_plan)."""
    plan, why = decoder_plan(model)
    return plan is not None, why


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's soft-capping of attention scores and final logits); x when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _rms_norm_params(norm: nn.Module):
    """(weight, eps) of the usual RMSNorm modules (weight * x / rms(x)), else None."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm") \
            or w is None or eps is None or w.dim() != 1:
        return None
    return w, float(eps)


def _fast_norm(norm: nn.Module):
    """F.rms_norm for the usual RMSNorm modules (weight * x / rms(x), computed in fp32), else the module itself."""
    params = _rms_norm_params(norm)
    if params is None:
        return norm
    w, eps = params
    shape = (w.shape[0],)

    def rms(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, shape, w, eps)
        return norm(x)

    return rms


def _with_threads(fn, threads: int):
    def call(x):
        torch.set_num_threads(threads)
        try:
            return fn(x)
        finally:
            torch.set_num_threads(1)

    return call


# Packed layers smaller than this many weights decode on one thread: their GEMV is a few microseconds of work, less
# than waking a second OpenMP thread costs when threads sleep between calls (OMP_WAIT_POLICY=passive, which keeps a
# busy machine usable): SmolLM2-135M's layers (576 x 576 to 1536 x 576) decoded at 60-64 tokens/s on one thread each
# against 37-41 on two, and tied with spinning threads (docs/RESULTS.md section 27). 2048 x 2048 gains from threads
# (cache-resident: 22.8 against 38.4 us, section 16); every layer of the decode benchmark's Llama (512 x 2048 and up)
# keeps them.
SERIAL_GEMV_WEIGHTS = 1 << 20


def exact_kernel_compute_bound() -> bool:
    """Whether the native kernel's exact tables are compute-bound on this CPU (AVX2 and scalar paths: one vpermps per
    8 rows x 3 inputs, against a 16-row 4-input lookup with AVX-512)."""
    from .kernels import cpu

    return cpu.is_available() and cpu.isa() in ("avx2", "scalar")


def gemv_threads(mod: nn.Module, threads: int, backend: str = "cpu") -> int:
    """Threads for a packed layer's one-token GEMV in the decode loop: 1 below SERIAL_GEMV_WEIGHTS weights, except
    for the exact tables (backend "cpu") where they are compute-bound: there a 576 x 1536 layer's ~40 us on one
    thread outweighs waking a second, and the demo model decoded 5-15 % faster with threads for every layer, with
    sleeping (passive) and with spinning threads (Zen 3, docs/RESULTS.md section 33)."""
    if backend == "cpu" and exact_kernel_compute_bound():
        return threads
    return 1 if mod.in_features * mod.out_features < SERIAL_GEMV_WEIGHTS else threads


def _linear_fn(mod: nn.Module, threads: int, serial: bool, compile: bool = False, reuse_output: bool = False):
    """A callable x -> mod(x) for the decode loop, using `threads` threads for the matrix-vector product.

    PackedRaBiTLinear layers whose backend resolves to the native CPU kernel call ``kernels.rabit_linear`` with
    that backend and `threads` (one thread for small layers: gemv_threads); under torch.compile it becomes the
    registered op, so the graph does not break;
    nn.Linear and anything else run under torch.set_num_threads(threads) when the rest of the step runs
    single-threaded (serial=True).
    reuse_output: a native packed layer returns one output tensor, overwritten by its next call
    (CpuLinearPlan.row_fn): only for a step that consumes each output before the layer runs again.
    """
    from . import kernels
    from .packed_layer import PackedRaBiTLinear

    if isinstance(mod, PackedRaBiTLinear) and mod.packed.device.type == "cpu":
        probe = torch.zeros(1, mod.in_features)
        try:
            backend = kernels.select_backend(probe, mod.backend)
        except (ValueError, RuntimeError):
            backend = None
        if backend in ("cpu", "cpu_int8"):
            packed, g, h, bias = mod.packed, mod.g, mod.h, mod.bias
            threads = gemv_threads(mod, threads, backend)
            if compile:   # the registered operator keeps the compiled graph whole
                return lambda x: kernels.rabit_linear(x, packed, g, h, bias, backend=backend, threads=threads)
            # the prepared native call itself: no backend selection or plan lookup per token (~2 us a call)
            plan = kernels.cpu.CpuLinearPlan(packed.detach(), g.detach(), h.detach(),
                                             bias.detach() if bias is not None else None, lut8=backend == "cpu_int8")
            return plan.row_fn(threads, reuse_output)
    if type(mod) is nn.Linear:
        w, b = mod.weight, mod.bias
        fn = lambda x: F.linear(x, w, b)  # noqa: E731
    else:
        fn = mod
    return _with_threads(fn, threads) if serial else fn


def _bf16_head_fn(head: nn.Module, threads: int, serial: bool):
    """The output head as a bf16 GEMV when its fp32 weight holds bf16 values exactly (a packed folder stores the
    embedding, and so a tied head, in bf16; loading widens it to fp32): the same weights at half the bytes per
    token. On a CPU the native kernel (rabit.kernels.bf16_cpu) widens the weights exactly and keeps x in fp32:
    the fp32 head's logits up to the order of the fp32 sums. Without it, oneDNN's bf16 GEMM, which rounds x to bf16
    (relative 2**-9 per element) and accumulates in fp32. None when the head is anything else. A 49152 x 576 head:
    fp32 10.7 ms, oneDNN bf16 3.6-4.2 ms, native 2.0 ms per token (docs/RESULTS.md section 28)."""
    w = getattr(head, "weight", None)
    if type(head) is not nn.Linear or w is None or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    with torch.no_grad():
        wb = w.detach().to(torch.bfloat16)
        if not torch.equal(wb.float(), w):
            return None
    b = head.bias
    from .kernels import bf16_cpu

    native = bf16_cpu.is_available()
    bias = b.detach() if b is not None else None

    def fn(x):
        if native and x.dtype == torch.float32:
            return bf16_cpu.bf16_linear_cpu(x, wb, bias, num_threads=threads)
        y = F.linear(x.to(torch.bfloat16), wb).to(x.dtype)
        return y + b if b is not None else y

    if native:
        return fn

    return _with_threads(fn, threads) if serial else fn


def _mlp_fn(mlp: nn.Module, threads: int, serial: bool, compile: bool = False, native: bool = False,
            reuse_output: bool = False):
    """down(act(gate(x)) * up(x)) with fast linears, for the usual gated MLP; else the module itself.
    native: silu(gate) * up as one native pass (decode_ops_cpu.silu_mul) when the activation is SiLU, written over
    the gate's output: one dispatch and no allocation instead of three ops (docs/RESULTS.md section 33)."""
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(p is None for p in parts) or type(mlp).__name__ not in ("LlamaMLP", "MistralMLP", "Qwen2MLP",
                                                                     "Qwen3MLP"):
        return _with_threads(mlp, threads) if serial else mlp
    gate, up, down = (_linear_fn(p, threads, serial, compile, reuse_output) for p in parts[:3])
    act = parts[3]
    if native and type(act).__name__ in ("SiLU", "SiLUActivation"):
        from .kernels.decode_ops_cpu import silu_mul

        def native_mlp(x):
            a = gate(x)
            return down(silu_mul(a, up(x), out=a))   # in place: a is this step's own (or a reused) buffer

        return native_mlp
    return lambda x: down(act(gate(x)) * up(x))


def _model_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype


class StaticDecoder:
    """gpt-fast style decoding over a Llama-family Hugging Face model, batch 1, static KV cache.

    max_len: prompt + new tokens capacity. compile: torch.compile the one-token step (fixed shapes).
    cuda_graph: on a CUDA device, record the fixed-shape one-token step once as a CUDA graph and replay it per
    token: batch-1 decoding launches hundreds of small kernels per token, and launching them from Python costs
    more than the weights take to read (the graph replays them without the Python and launch overhead).
    bf16_head: the one-token steps compute an fp32 output head whose weights are exactly bf16 values (a tied
    head loaded from a packed folder) as a bf16 GEMV: half the bytes, its input rounded to bf16.
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False, dtype: torch.dtype | None = None,
                 threads: int | None = None, serial_small_ops: bool = True, bf16_head: bool = True,
                 cuda_graph: bool = False, native_ops: bool | None = None):
        self.plan, why = decoder_plan(model)
        if self.plan is None:
            raise ValueError(f"StaticDecoder does not support this model: {why}")
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.max_len = int(max_len)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv
        self.dtype = dtype or _model_dtype(model)
        self.device = model.get_input_embeddings().weight.device
        self.scaling = [getattr(l.self_attn, "scaling", self.head_dim ** -0.5) for l in self.layers]
        self.q_norms = [getattr(l.self_attn, "q_norm", None) for l in self.layers]
        self.k_norms = [getattr(l.self_attn, "k_norm", None) for l in self.layers]
        shape = (1, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        half = self.head_dim // 2
        tables = {}   # per rotary table (Gemma 3: one for sliding, one for global layers)
        with torch.no_grad():
            pos = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            for rt in set(self.plan.rope_types):
                cos, sin = self.inner.rotary_emb(probe, pos, *([rt] if rt else []))
                cos, sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()   # (max_len, D)
                # rotate_half(x) * sin == x.roll(half) * sin_signed: one op instead of two slices, a neg and a cat
                tables[rt] = (cos, sin, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).contiguous())
        self.cos, self.sin, self.sin_signed = ([tables[rt][j] for rt in self.plan.rope_types] for j in range(3))
        self.half = half
        self.windows = list(self.plan.windows)
        self.softcap, self.final_softcap = self.plan.attn_softcap, self.plan.final_softcap
        sandwich = self.plan.sandwich_norms
        self.in_norms = [_fast_norm(l.input_layernorm) for l in self.layers]
        # Llama: post_attention_layernorm is the pre-MLP norm; Gemma: it normalizes the attention output and
        # pre/post_feedforward_layernorm wrap the MLP
        self.post_norms = [_fast_norm(l.pre_feedforward_layernorm if sandwich else l.post_attention_layernorm)
                           for l in self.layers]
        self.attn_out_norms = [_fast_norm(l.post_attention_layernorm) if sandwich else None for l in self.layers]
        self.mlp_out_norms = [_fast_norm(l.post_feedforward_layernorm) if sandwich else None for l in self.layers]
        self.final_norm = _fast_norm(self.inner.norm)
        self.pos = 0
        # Batch-1 decoding: the elementwise ops, norms and the attention over the cache are tiny, and waking
        # OpenMP threads for them costs more than it saves (badly so on a busy machine); only the GEMVs use
        # `threads` (default: torch.get_num_threads() at construction).
        self.threads = threads or torch.get_num_threads()
        # (torch.compile traces one graph per step: no thread switching there, and the native kernel is called
        # through its registered operator, rabit::packed_linear, so that it does not break the graph)
        self.compiled = bool(compile)
        if compile and cuda_graph:
            raise ValueError("choose compile or cuda_graph, not both")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, not {self.device}")
        self.cuda_graph = bool(cuda_graph)
        self._native = self._native_ops_plan(native_ops)
        self.serial = bool(serial_small_ops) and self.threads > 1 and self.device.type == "cpu" and not compile
        # the native step consumes each layer output before that layer runs again: outputs can be reused
        reuse = self._native is not None
        self.lin = [{n: _linear_fn(getattr(l.self_attn, n + "_proj"), self.threads, self.serial, compile, reuse)
                     for n in ("q", "k", "v", "o")} for l in self.layers]
        self.mlp = [_mlp_fn(l.mlp, self.threads, self.serial, compile, native=reuse, reuse_output=reuse)
                    for l in self.layers]
        # bf16_head: one-token steps read a bf16-valued fp32 head as bf16 (see _bf16_head_fn); prefill stays fp32
        head_fast = _bf16_head_fn(self.model.lm_head, self.threads, self.serial) if bf16_head and not compile else None
        self.head = head_fast or _linear_fn(self.model.lm_head, self.threads, self.serial, compile)
        self._step_fn = self._step_masked
        self._graph = None
        if compile or cuda_graph:
            self._arange = torch.arange(self.max_len, device=self.device)
        if compile:
            self._step_fn = torch.compile(self._step_masked, dynamic=False)

    def _native_ops_plan(self, wanted: bool | None):
        """The one-token step's norms and attention as native calls (rabit.kernels.decode_ops_cpu), when the model
        allows: fp32 on the CPU, a Llama-like layout with plain RMSNorms, no score soft-capping, not compiled. They
        replace ~20 small PyTorch ops per layer, whose dispatch cost more than the GEMVs of a small model
        (docs/RESULTS.md section 28). wanted: None = when possible, False = never, True = required (ValueError
        when not possible). Returns the step's calls prepared per call site (decode_ops_cpu.add_rms_norm_fn /
        attend_one_fn): (the norms: layer 0's input norm, its pre-MLP norm, layer 1's..., the final norm; the
        layers' attentions), or None."""
        if wanted is False:
            return None
        from .kernels import decode_ops_cpu

        why = None
        if self.device.type != "cpu" or self.dtype != torch.float32:
            why = f"needs fp32 on the CPU, not {self.dtype} on {self.device}"
        elif self.compiled or self.cuda_graph:
            why = "not with torch.compile or CUDA graphs"
        elif self.plan.sandwich_norms or self.softcap is not None:
            why = f"the {self.plan.family} layout (sandwich norms or soft-capped scores)"
        params = []
        if why is None:
            for l in self.layers:
                params += [_rms_norm_params(l.input_layernorm), _rms_norm_params(l.post_attention_layernorm)]
            params.append(_rms_norm_params(self.inner.norm))
            if any(p is None or p[0].dtype != torch.float32 for p in params):
                why = "norms other than fp32 RMSNorm"
        if why is None and not decode_ops_cpu.is_available():
            why = "the native library does not build here"
        if why is not None:
            if wanted:
                raise ValueError(f"native decoding ops unavailable: {why}")
            return None
        return ([decode_ops_cpu.add_rms_norm_fn(w.detach().contiguous(), eps) for w, eps in params],
                [decode_ops_cpu.attend_one_fn(self.k_cache[i][0], self.v_cache[i][0], self.cos[i], self.sin_signed[i],
                                              self.scaling[i], self.n_heads, self.threads)
                 for i in range(len(self.layers))])

    def reset(self) -> None:
        self.pos = 0

    # --------------------------------------------------------------------------------------------- internals
    def _decode_one(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """One token at position `pos`: the hot loop, with as few tensor ops as possible."""
        impl = self._decode_one_impl if self._native is None else self._decode_one_native
        if not self.serial:
            return impl(ids, pos)
        torch.set_num_threads(1)
        try:
            return impl(ids, pos)
        finally:
            torch.set_num_threads(self.threads)

    def _decode_one_native(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """_decode_one_impl with each layer's residual adds, norms and attention as native calls (Llama layout)."""
        norms, attend = self._native
        x = self.inner.embed_tokens(ids).to(self.dtype, copy=True)     # (1, 1, hidden): our own copy, the
        H, KV, D = self.n_heads, self.n_kv, self.head_dim               # residual stream, updated in place
        end = pos + 1
        m = None
        for i in range(len(self.layers)):
            lin = self.lin[i]
            h = norms[2 * i](x, m)                                       # x += previous MLP output; norm
            q, k, v = lin["q"](h), lin["k"](h), lin["v"](h)
            if self.q_norms[i] is not None:
                q = self.q_norms[i](q.view(H, D)).contiguous()
                k = self.k_norms[i](k.view(KV, D)).contiguous()
            lo = max(0, end - self.windows[i]) if self.windows[i] else 0
            o = attend[i](q, k, v, pos, lo)
            h = norms[2 * i + 1](x, lin["o"](o.view(1, 1, H * D)))      # x += attention; norm
            m = self.mlp[i](h)
        return _softcap(self.head(norms[-1](x, m)), self.final_softcap)

    def _decode_one_impl(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        end = pos + 1
        x = self.inner.embed_tokens(ids).to(self.dtype)          # (1, 1, hidden)
        H, KV, G, D, half = self.n_heads, self.n_kv, self.groups, self.head_dim, self.half
        for i in range(len(self.layers)):
            cos, sin = self.cos[i][pos], self.sin_signed[i][pos]
            lo = max(0, end - self.windows[i]) if self.windows[i] else 0
            lin = self.lin[i]
            h = self.in_norms[i](x)
            q = lin["q"](h).view(H, D)
            k = lin["k"](h).view(KV, D)
            v = lin["v"](h).view(KV, D)
            if self.q_norms[i] is not None:
                q = self.q_norms[i](q)
                k = self.k_norms[i](k)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            kc, vc = self.k_cache[i][0], self.v_cache[i][0]        # (KV, max_len, D)
            kc[:, pos] = k
            vc[:, pos] = v
            scores = torch.matmul(q.view(KV, G, D), kc[:, lo:end].transpose(1, 2))   # (KV, G, end - lo)
            scores = _softcap(scores.mul_(self.scaling[i]), self.softcap)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            o = torch.matmul(probs, vc[:, lo:end])                 # (KV, G, D)
            x = self._residual_block(i, x, lin["o"](o.view(1, 1, H * D)))
        return _softcap(self.head(self.final_norm(x)), self.final_softcap)

    def _residual_block(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """x + attention output, then + MLP, with the family's norms."""
        if self.attn_out_norms[i] is not None:
            attn_out = self.attn_out_norms[i](attn_out)
        x = x + attn_out
        m = self.mlp[i](self.post_norms[i](x))
        return x + (self.mlp_out_norms[i](m) if self.mlp_out_norms[i] is not None else m)

    def _prefill_attention(self, i: int, q, keys, values, start: int, T: int) -> torch.Tensor:
        """Attention of T queries at positions start.. over the cached keys 0..start+T (T = 1: over the keys of
        its window, already sliced by the caller); (1, T, H * D)."""
        end = start + T
        W = self.windows[i]
        mask = None
        if T > 1 and (start > 0 or (W and end > W)):
            qpos = torch.arange(start, end, device=self.device)[:, None]
            kpos = torch.arange(end, device=self.device)[None]
            mask = kpos <= qpos
            if W:
                mask &= kpos > qpos - W
        if self.softcap is None:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scaling[i], enable_gqa=self.groups > 1)
        else:   # soft-capped scores: SDPA cannot, compute them
            if self.groups > 1:
                keys, values = keys.repeat_interleave(self.groups, 1), values.repeat_interleave(self.groups, 1)
            scores = _softcap(torch.matmul(q, keys.transpose(-1, -2)) * self.scaling[i], self.softcap)
            if mask is None and T > 1:
                mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype), values)
        return o.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim)

    def _qkv(self, i: int, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        T = h.shape[1]
        attn = layer.self_attn
        q = attn.q_proj(h).view(1, T, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(1, T, self.n_kv, self.head_dim)
        v = attn.v_proj(h).view(1, T, self.n_kv, self.head_dim)
        if self.q_norms[i] is not None:
            q = self.q_norms[i](q)
            k = self.k_norms[i](k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (1, heads, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _forward(self, ids: torch.Tensor, start: int, last_only: bool) -> torch.Tensor:
        T = ids.shape[1]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the decoder's max_len {self.max_len}")
        x = self.inner.embed_tokens(ids).to(self.dtype)
        for i, layer in enumerate(self.layers):
            h = self.in_norms[i](x)
            q, k, v = self._qkv(i, layer, h, self.cos[i][start:end], self.sin[i][start:end])
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            lo = max(0, end - self.windows[i]) if self.windows[i] and T == 1 else 0
            keys, values = kc[:, :, lo:end], vc[:, :, lo:end]
            if T == 1 and self.softcap is None:
                # (1, kv, groups, D): all query heads of one KV head attend at the same position, no mask needed
                qg = q.reshape(1, self.n_kv, self.groups, self.head_dim)
                o = F.scaled_dot_product_attention(qg, keys, values, scale=self.scaling[i])
                o = o.reshape(1, 1, self.n_heads * self.head_dim)
            else:
                o = self._prefill_attention(i, q, keys, values, start, T)
            x = self._residual_block(i, x, layer.self_attn.o_proj(o))
        if last_only:
            x = x[:, -1:]
        return _softcap(self.model.lm_head(self.final_norm(x)), self.final_softcap)

    def _step_masked(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token at position `pos` (0-d long tensor) with fixed shapes (for torch.compile): attends to the
        whole cache with a mask."""
        x = self.inner.embed_tokens(ids).to(self.dtype)
        idx = pos.view(1)
        past = self._arange <= pos
        valid = {W: (past & (self._arange > pos - W) if W else past).view(1, 1, self.max_len)
                 for W in set(self.windows)}
        H, KV, G, D, half = self.n_heads, self.n_kv, self.groups, self.head_dim, self.half
        for i in range(len(self.layers)):
            cos = self.cos[i].index_select(0, idx)
            sin = self.sin_signed[i].index_select(0, idx)
            lin = self.lin[i]
            h = self.in_norms[i](x)
            q = lin["q"](h).view(H, D)
            k = lin["k"](h).view(KV, D)
            v = lin["v"](h).view(KV, D)
            if self.q_norms[i] is not None:
                q = self.q_norms[i](q)
                k = self.k_norms[i](k)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            kc, vc = self.k_cache[i][0], self.v_cache[i][0]
            kc.index_copy_(1, idx, k.view(KV, 1, D))
            vc.index_copy_(1, idx, v.view(KV, 1, D))
            scores = _softcap(torch.matmul(q.view(KV, G, D), kc.transpose(1, 2)) * self.scaling[i], self.softcap)
            scores = scores.masked_fill(~valid[self.windows[i]], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            o = torch.matmul(probs, vc)
            x = self._residual_block(i, x, lin["o"](o.view(1, 1, H * D)))
        return _softcap(self.head(self.final_norm(x)), self.final_softcap)

    def _graph_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """_step_masked replayed from a CUDA graph (recorded on the first call) over static input buffers."""
        if self._graph is None:
            self._g_ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._g_pos = torch.zeros((), dtype=torch.long, device=self.device)
            self._g_ids.copy_(ids)
            self._g_pos.fill_(pos)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture (kernel compilation, allocator pools)
                for _ in range(2):
                    self._step_masked(self._g_ids, self._g_pos)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._g_out = self._step_masked(self._g_ids, self._g_pos)
            self._graph = graph
        self._g_ids.copy_(ids)
        self._g_pos.fill_(pos)
        self._graph.replay()
        return self._g_out.clone()  # the next replay overwrites the graph's output buffer

    # ------------------------------------------------------------------------------------------------- API
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed prompt tokens (1, T) after the current position; returns logits (1, T or 1, vocab)."""
        ids = ids.to(self.device).view(1, -1)
        out = self._forward(ids, self.pos, last_only=not all_logits)
        self.pos += ids.shape[1]
        return out

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token; returns its logits (1, 1, vocab)."""
        if self.pos >= self.max_len:
            raise ValueError(f"the KV cache is full ({self.max_len} tokens)")
        ids = torch.as_tensor(token, device=self.device).view(1, 1)
        if self.cuda_graph:
            out = self._graph_step(ids, self.pos)
        elif self.compiled:
            out = self._step_fn(ids, torch.tensor(self.pos, device=self.device))
        else:
            out = self._decode_one(ids, self.pos)
        self.pos += 1
        return out


class HFStaticDecoder:
    """Generic fallback: the model's own forward with transformers' StaticCache."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False):
        from transformers import StaticCache

        self.model = model
        self.max_len = int(max_len)
        self.device = model.get_input_embeddings().weight.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.pos = 0
        self.compiled = bool(compile)
        self._fwd = torch.compile(model.forward, dynamic=False) if compile else model.forward
        # transformers >= 5.2x renames past_key_values to cache (and warns on every call with the old name)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reset(self) -> None:
        with torch.inference_mode():
            self.cache.reset()
        self.pos = 0

    def _run(self, ids: torch.Tensor, fwd) -> torch.Tensor:
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds the decoder's max_len {self.max_len}")
        cache_position = torch.arange(self.pos, self.pos + T, device=self.device)
        out = fwd(input_ids=ids, **{self._cache_kw: self.cache}, cache_position=cache_position,
                  position_ids=cache_position[None], use_cache=True)
        self.pos += T
        return out.logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        logits = self._run(ids.to(self.device).view(1, -1), self.model.forward)
        return logits if all_logits else logits[:, -1:]

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        return self._run(torch.as_tensor(token, device=self.device).view(1, 1), self._fwd)


def make_decoder(model: nn.Module, max_len: int, compile: bool = False, lean: bool | None = None,
                 cuda_graph: bool = False):
    """StaticDecoder for the families of rabit.decoder_plan (lean=None/True), else HFStaticDecoder (with one log
    line per reason the first time). cuda_graph: StaticDecoder's CUDA-graph replay of the one-token step."""
    if lean is None:
        lean, why = lean_supported(model)
        if not lean and why not in _NOTICED:
            _NOTICED.add(why)
            _log.warning("rabit: no fast decoder for this model (%s); using transformers' generic path", why)
    if lean:
        return StaticDecoder(model, max_len, compile=compile, cuda_graph=cuda_graph)
    if cuda_graph:
        raise ValueError("cuda_graph needs the lean StaticDecoder, which does not support this model")
    return HFStaticDecoder(model, max_len, compile=compile)


# ------------------------------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> int:
    """Next token id from (..., vocab) logits (last position): greedy when temperature <= 0."""
    logits = logits.reshape(-1, logits.shape[-1])[-1].float()
    if temperature is None or temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p   # keep the smallest prefix with mass >= top_p
        logits = logits.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The last position's logits (vocab,) with every token id in `seen` made less likely (CTRL's rule, as in
    transformers and llama.cpp's repeat penalty): a positive logit divided by `penalty`, a negative one multiplied.
    penalty 1 leaves them as they are."""
    out = logits.reshape(-1, logits.shape[-1])[-1].float()
    if penalty == 1.0 or seen.numel() == 0:
        return out
    out = out.clone()
    seen = seen.to(out.device)
    picked = out[seen]
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def _check_sampling(max_new_tokens: int, temperature: float, top_k, top_p, repetition_penalty: float = 1.0) -> None:
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass
class DecodeResult:
    tokens: list[int]                 # generated ids (without the prompt)
    prompt_tokens: int
    prefill_s: float
    decode_s: float                   # time for the tokens after the first one
    step_times: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: generated tokens after the first (whose time is the prefill) per second."""
        n = len(self.step_times)
        return n / self.decode_s if self.decode_s > 0 and n else float("nan")


def decode_tokens(decoder, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                  generator: torch.Generator | None = None,
                  on_token: Callable[[int], None] | None = None, repetition_penalty: float = 1.0) -> DecodeResult:
    """Prefill `input_ids` (1, T), then generate up to `max_new_tokens`. The decoder is reset first.

    The first new token comes from the prefill logits; each further one costs one `step`, timed individually.
    repetition_penalty > 1 discourages every token of the prompt and of the text so far (apply_repetition_penalty).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    ids = torch.as_tensor(input_ids).view(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (0 tokens)")
    seen = torch.zeros(0, dtype=torch.long)
    if repetition_penalty != 1.0:
        seen = torch.unique(ids[0])

    def pick(logits: torch.Tensor) -> int:
        nonlocal seen
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample(logits, temperature, top_k, top_p, generator)
        if repetition_penalty != 1.0 and not bool((seen == tok).any()):
            seen = torch.cat([seen, torch.tensor([tok])])
        return tok

    eos = set()
    if eos_token_id is not None:
        eos = set(eos_token_id) if isinstance(eos_token_id, (list, tuple, set)) else {int(eos_token_id)}
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.prefill(ids)
    out: list[int] = []
    steps: list[float] = []
    prefill_s = 0.0
    if max_new_tokens > 0:
        tok = pick(logits)
        prefill_s = time.perf_counter() - t0
        out.append(tok)
        if on_token:
            on_token(tok)
        while len(out) < max_new_tokens and tok not in eos:
            t = time.perf_counter()
            logits = decoder.step(tok)
            tok = pick(logits)
            steps.append(time.perf_counter() - t)
            out.append(tok)
            if on_token:
                on_token(tok)
    else:
        prefill_s = time.perf_counter() - t0
    return DecodeResult(out, ids.shape[1], prefill_s, sum(steps), steps)


class TextStreamer:
    """Incremental detokenization: calls `write(text)` with each new printable piece."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):       # an incomplete UTF-8 sequence: wait for the next token
            return
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)


@dataclass
class GenerationResult:
    text: str
    result: DecodeResult

    @property
    def tokens_per_s(self) -> float:
        return self.result.tokens_per_s


def encode_prompt(tokenizer, prompt: str, chat: bool = False, add_bos: bool | None = None) -> torch.Tensor:
    """Prompt ids [1, n]. Plain prompts start with BOS as rabit.bos.resolve_bos decides (the tokenizer's rule
    unless `add_bos`), the same rule training and perplexity follow; chat templates write their own."""
    from .bos import resolve_bos

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return torch.as_tensor(ids).view(1, -1)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = resolve_bos(tokenizer, add_bos).token_id
    if bos is not None or (not ids and tokenizer.bos_token_id is not None):   # never an empty prompt
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor([ids], dtype=torch.long)


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stream: Callable[[str], None] | None = None, compile: bool = False, chat: bool = False,
             stop_at_eos: bool = True, decoder=None, add_bos: bool | None = None,
             repetition_penalty: float = 1.0) -> GenerationResult:
    """Generate text for `prompt` (greedy unless temperature > 0), streaming pieces to `stream` if given.
    add_bos: None follows the tokenizer's rule (see encode_prompt). repetition_penalty: see decode_tokens."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    ids = encode_prompt(tokenizer, prompt, chat, add_bos)
    if decoder is None:
        decoder = make_decoder(model, ids.shape[1] + max_new_tokens, compile=compile)
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    streamer = TextStreamer(tokenizer, stream) if stream else None
    res = decode_tokens(decoder, ids, max_new_tokens, temperature, top_k, top_p,
                        eos_token_id=tokenizer.eos_token_id if stop_at_eos else None, generator=gen,
                        on_token=streamer, repetition_penalty=repetition_penalty)
    if streamer:
        streamer.flush()
    text = tokenizer.decode(res.tokens, skip_special_tokens=True)
    return GenerationResult(text, res)


__all__ = ["StaticDecoder", "HFStaticDecoder", "make_decoder", "lean_supported", "sample", "decode_tokens",
           "apply_repetition_penalty",
           "DecodeResult", "generate", "GenerationResult", "TextStreamer", "encode_prompt"]
