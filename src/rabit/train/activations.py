"""Activations of decoder blocks for the block-wise stage (rabit.train.blockwise): storage (in memory or
memory-mapped), the inputs of every block, and the inputs of a block's linear layers (their metric
H = sum x x^T, or each call's input, in the order the block makes the calls)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .losses import decoder_layers

class ActivationStore:
    """A (n, seq_len, hidden) fp32 array in memory, or memory-mapped from a file when `path` is given."""

    def __init__(self, shape: tuple[int, int, int], path: Path | None = None):
        self.path = path
        numel = shape[0] * shape[1] * shape[2]
        if path is None:
            self.data = torch.empty(shape, dtype=torch.float32)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(numel * 4)
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).view(shape)

    def close(self) -> None:
        self.data = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Stop(Exception):
    """Raised from a hook once a pass has captured what it was run for: the rest of the forward is skipped."""


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int, store: ActivationStore
                         ) -> list[dict]:
    """Fill `store` with the hidden states entering decoder block 0 for every row of `tokens`, and return the
    keyword arguments each block receives for a batch of `batch_size` rows (attention mask, rotary
    embeddings, ...: families differ, e.g. Gemma 3's sliding-window blocks get their own mask)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    kwargs: list[dict | None] = [None] * len(layers)
    first: dict = {}

    def record(i):
        def hook(module, args, kw):
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items()
                             if k not in ("hidden_states", "past_key_value", "past_key_values", "use_cache")}
                kwargs[i]["use_cache"] = False
            if i == 0:
                first["x"] = args[0] if args else kw["hidden_states"]
                if all(k is not None for k in kwargs):
                    raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for j in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[j:j + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            store.data[j:j + batch_size] = first["x"].float().cpu()
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in kwargs):
        raise RuntimeError("could not capture the decoder blocks' arguments")
    return kwargs


def to_device(kw: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else
                tuple(t.to(device) if torch.is_tensor(t) else t for t in v) if isinstance(v, tuple) else v)
            for k, v in kw.items()}


class LayerCovariance:
    """H = sum of x x^T over the inputs of each named linear layer of a block (forward hooks). Layers fed the
    same tensor (q/k/v, gate/up) share one product per batch."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.h: dict[str, torch.Tensor] = {}
        self._batch: dict[int, tuple] = {}
        self.handles = []
        self.enabled = True
        for name in names:
            module = block.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            x = inputs[0]
            # keyed by the tensor object, which is kept alive until next_batch(): a freed tensor's id could
            # otherwise be reused by another layer's input within the same batch
            hit = self._batch.get(id(x))
            if hit is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                with no_autocast(x2):
                    hit = self._batch[id(x)] = (x, x2.T @ x2)
            if name in self.h:
                self.h[name] += hit[1]
            else:
                self.h[name] = hit[1].clone()
        return hook

    def next_batch(self) -> None:
        self._batch.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def no_autocast(x: torch.Tensor):
    """A context in which products are fp32 even inside an autocast region (the stage's forward passes run under
    bf16 autocast; the metrics H = sum x x^T its hooks accumulate must not)."""
    return torch.autocast(x.device.type, enabled=False)


def product_sum(a: torch.Tensor, b: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """a^T b in fp32 for a (tokens, m) and b (tokens, n): the block stage's sums over tokens (H = x^T x, C, T).

    With bf16 the product of the deviations from the batch's means runs in bf16 (fp32 accumulation, rounded once to
    bf16: ~4x faster where the CPU has native bf16) and the means' part, n m_a m_b^T, in fp32. Exact algebra; the
    split keeps the rounding relative to how the tokens vary: the normalized inputs share a mean direction with about
    half their energy (RESULTS.md section 36), and products rounded with it left the centered H of a 576-input
    layer indefinite. The caller sums the batches' products in fp32."""
    with no_autocast(a):
        if not bf16:
            return a.float().T @ b.float()
        a = a.float()
        ma = a.mean(0)
        da = (a - ma).to(torch.bfloat16)
        if b is a:
            mb, db = ma, da
        else:
            b = b.float()
            mb = b.mean(0)
            db = (b - mb).to(torch.bfloat16)
        return torch.addr((da.T @ db).float(), ma, mb, alpha=a.shape[0])


def flat_input(cache: dict[int, tuple], x: torch.Tensor) -> torch.Tensor:
    """x as (tokens, in) fp32, one copy per tensor for the layers fed the same input (q/k/v, gate/up). The cache
    keeps x itself alive in the entry, so that its id cannot be reused by another tensor meanwhile."""
    hit = cache.get(id(x))
    if hit is None:
        hit = cache[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).float())
    return hit[1]


def run_capturing(block: nn.Module, kw: dict, x: torch.Tensor, names: list[str], on_input) -> None:
    """block(x, **kw) with forward pre-hooks on the named layers: on_input(name, x2d) for each call (x2d the
    layer's input as (tokens, in) fp32, one copy for layers fed the same tensor). The pass stops as soon as
    every named layer has been seen: the rest of the block is not needed."""
    seen: set[str] = set()
    flat: dict[int, tuple] = {}

    def make(name):
        def pre(module, args):
            on_input(name, flat_input(flat, args[0]))
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop
        return pre

    handles = [block.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    try:
        block(x, **kw)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def module_returns_layer(block: nn.Module, kw: dict, x: torch.Tensor, parent_name: str, name: str) -> int | None:
    """Whether the block's module parent_name returns its layer `name`'s output as it is: alone (then 0), or first
    in a tuple whose other items are None (then their count), as an attention module returns its output
    projection's result (Llama, Qwen, Mistral, Gemma, with SDPA). None otherwise, or when the layer is not called
    once per pass. Checked on x by object identity: the parent adds nothing after the layer."""
    parent, layer = block.get_submodule(parent_name), block.get_submodule(name)
    seen: dict[str, list] = {"layer": [], "parent": []}
    handles = [layer.register_forward_hook(lambda m, a, out: seen["layer"].append(out)),
               parent.register_forward_hook(lambda m, a, out: seen["parent"].append(out))]
    try:
        block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    if len(seen["layer"]) != 1 or len(seen["parent"]) != 1:
        return None
    out, last = seen["parent"][0], seen["layer"][0]
    if out is last:
        return 0
    if isinstance(out, tuple) and out and out[0] is last and all(item is None for item in out[1:]):
        return len(out) - 1
    return None


class forward_from_layer:
    """A context (re-entrant, entered once per batch) within which parent(...) skips everything before its last
    layer and returns layer(inputs[key["j"]]) (followed by `rest` Nones, module_returns_layer's count): the block's
    passes over the same rows reuse what that part computed before, e.g. attention when only the output projection
    has changed since."""

    def __init__(self, parent: nn.Module, layer: nn.Module, rest: int, inputs: dict, key: dict):
        self.parent, self.layer, self.rest, self.inputs, self.key = parent, layer, rest, inputs, key

    def _forward(self, *args, **kwargs):
        out = self.layer(self.inputs[self.key["j"]])
        return (out,) + (None,) * self.rest if self.rest else out

    def __enter__(self):
        # a forward set on the instance (e.g. accelerate's hooks wrap it there) comes back on exit
        self._saved = self.parent.__dict__.get("forward")
        self.parent.forward = self._forward

    def __exit__(self, *exc):
        if self._saved is None:
            del self.parent.forward
        else:
            self.parent.forward = self._saved
        return False


def layer_groups(block: nn.Module, kw: dict, x: torch.Tensor, names: list[str]) -> list[list[str]]:
    """The named layers in the order the block calls them, grouped by shared input (q/k/v, gate/up)."""
    calls: list[tuple[str, int]] = []
    run_capturing(block, kw, x, names, lambda name, x2: calls.append((name, id(x2))))
    groups: list[list[str]] = []
    last = None
    for name, key in calls:
        if groups and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups
