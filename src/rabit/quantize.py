"""quantize_(model, config, calibration): replace a causal LM's linear layers by RaBiTLinear, in place."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RaBiTConfig
from .layer import RaBiTLinear
from .ops.svid import BinaryPath


@dataclass
class ChannelStats:
    """Per-channel importance statistics of one linear layer, gathered on calibration data.

    in_sq_sum: sum over tokens of x_j^2 (input activations); out_sq_sum: sum over tokens of (dL/dy_i)^2.
    We keep squares so that alpha = 0.5 on the root-mean-square corresponds to alpha = 1 on the mean square;
    `in_stat` / `out_stat` return the RMS ("magnitude") per channel.
    """

    in_sq_sum: torch.Tensor
    out_sq_sum: torch.Tensor
    tokens: int = 0
    grad_tokens: int = 0

    @property
    def in_stat(self) -> torch.Tensor:
        return (self.in_sq_sum / max(self.tokens, 1)).sqrt()

    @property
    def out_stat(self) -> torch.Tensor | None:
        if self.grad_tokens == 0:
            return None
        return (self.out_sq_sum / self.grad_tokens).sqrt()


def find_linear_layers(model: nn.Module, config: RaBiTConfig) -> dict[str, nn.Linear]:
    """The eligible nn.Linear modules by qualified name, excluding config.exclude_patterns.

    User-given patterns must each match at least one module name (a typo would otherwise silently quantize
    a layer the user meant to keep).
    """
    patterns = config.exclude_patterns
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"invalid exclude pattern: {e}") from None
    names = [n for n, _ in model.named_modules() if n]
    if config.exclude is not None:
        for p, rx in zip(patterns, compiled):
            if not any(rx.search(n) for n in names):
                raise ValueError(f"exclude pattern {p!r} matches no module of the model")
    layers = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not any(rx.search(name) for rx in compiled):
            layers[name] = module
    return layers


def collect_channel_stats(model: nn.Module, layers: dict[str, nn.Linear], calibration: torch.Tensor,
                          batch_size: int = 4, gradients: bool = True, progress: bool = False
                          ) -> dict[str, ChannelStats]:
    """Input-activation and output-gradient magnitudes per channel of each layer, with hooks.

    Output gradients come from the model's own next-token loss on the calibration tokens. No parameter
    gradient is computed: the embedding output is made to require grad instead.
    """
    if calibration.ndim != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty (n_samples, seq_len) token tensor, "
                         f"got shape {tuple(calibration.shape)}")
    device = next(model.parameters()).device
    stats = {n: ChannelStats(torch.zeros(m.in_features, device=device), torch.zeros(m.out_features, device=device))
             for n, m in layers.items()}
    handles = []

    def fwd_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, module.in_features)
            st = stats[name]
            st.in_sq_sum += (x * x).sum(0)
            st.tokens += x.shape[0]
            if gradients and output.requires_grad:
                def grad_hook(grad):
                    gr = grad.detach().float().reshape(-1, module.out_features)
                    st.out_sq_sum.add_((gr * gr).sum(0))
                    st.grad_tokens += gr.shape[0]
                output.register_hook(grad_hook)
        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(fwd_hook(name)))
    if gradients:
        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True)))
    was_training = model.training
    model.eval()
    saved_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batches = calibration.split(batch_size)
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            batch = batch.to(device)
            with torch.set_grad_enabled(gradients):
                out = model(input_ids=batch, labels=batch if gradients else None, use_cache=False)
                if gradients:
                    # Sum (not mean) over tokens so that gradient magnitudes do not depend on batch size.
                    (out.loss * batch[:, 1:].numel()).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), saved_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return stats


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: RaBiTConfig | None = None, calibration: torch.Tensor | None = None,
              stats: dict[str, ChannelStats] | None = None, progress: bool = False,
              on_init: Callable[[str, list[BinaryPath]], None] | None = None) -> nn.Module:
    """Replace every eligible nn.Linear of `model` by an initialized RaBiTLinear, in place.

    calibration: (n_samples, seq_len) token ids, needed when config.precondition is set (unless precomputed
    `stats` from collect_channel_stats are passed). on_init(name, paths) is called with each layer's
    initialization paths (e.g. to cache them). Returns the model.
    """
    config = config or RaBiTConfig()
    config.validate()
    layers = find_linear_layers(model, config)
    if not layers:
        raise ValueError("the model has no linear layers to quantize (after applying the exclude patterns "
                         f"{list(config.exclude_patterns)})")
    if config.precondition and stats is None:
        if calibration is None:
            raise ValueError("config.precondition=True needs calibration data: pass calibration=(n, seq_len) "
                             "token ids, or set precondition=False")
        stats = collect_channel_stats(model, layers, calibration, progress=progress)
    for name, linear in tqdm(list(layers.items()), desc="initializing", disable=not progress):
        st = stats.get(name) if (stats is not None and config.precondition) else None
        new = RaBiTLinear.from_linear(linear, config, st.in_stat if st else None, st.out_stat if st else None,
                                      name=name, on_paths=None if on_init is None else partial(on_init, name))
        _set_module(model, name, new)
    setattr(model, "rabit_config", config)
    return model


def rabit_layers(model: nn.Module) -> dict[str, RaBiTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RaBiTLinear)}
