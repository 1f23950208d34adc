"""RaBiTLinear: the trainable k-path binary linear layer (coupled, independent or frozen)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import RaBiTConfig
from .ops import binarize, decompose, path_matrix, preconditioned_decompose, straight_through, ste_mask
from .ops.coupled import coupled_linear, coupled_weight
from .ops.svid import BinaryPath, coupled_signs, reconstruct


class RaBiTLinear(nn.Module):
    """A linear layer whose weight is sum_i g_i * B_i * h_i with B_i in {-1,+1}.

    Parameters (all fp32):
      scale_out[i] (out,) and scale_in[i] (in,): g_i and h_i, trained with ordinary gradients.
      coupled mode: `latent` (out x in), one shared latent weight; the signs are derived from it each forward.
      independent / frozen: `latents[i]` (out x in), one per path, B_i = sign(latents[i]).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 config: RaBiTConfig | None = None, device=None) -> None:
        super().__init__()
        self.config = config or RaBiTConfig()
        self.in_features, self.out_features = in_features, out_features
        k = self.num_paths = self.config.num_paths
        self.mode = self.config.mode
        kw = dict(device=device, dtype=torch.float32)
        self.scale_out = nn.ParameterList([nn.Parameter(torch.ones(out_features, **kw)) for _ in range(k)])
        self.scale_in = nn.ParameterList([nn.Parameter(torch.ones(in_features, **kw)) for _ in range(k)])
        if self.mode == "coupled":
            self.latent = nn.Parameter(torch.zeros(out_features, in_features, **kw))
            self.latents = None
        else:
            self.latent = None
            self.latents = nn.ParameterList(
                [nn.Parameter(torch.zeros(out_features, in_features, **kw)) for _ in range(k)])
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._apply_freezing()
        self._cache: tuple | None = None

    # ----------------------------------------------------------------------------------------------- init
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: RaBiTConfig, in_stat: torch.Tensor | None = None,
                    out_stat: torch.Tensor | None = None, name: str = "",
                    on_paths: Callable[[list[BinaryPath]], None] | None = None) -> "RaBiTLinear":
        """Build from an nn.Linear, initializing the paths with config.init (preconditioned when stats given).

        on_paths receives the initialization's paths, which in coupled mode differ from the layer's own
        paths() (those re-derive B_2.. from the latent) at a few weights."""
        w = linear.weight.detach()
        where = f" in module {name!r}" if name else ""
        if w.ndim != 2:
            raise ValueError(f"expected a 2-D weight{where}, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"weight{where} contains NaN or Inf")
        layer = cls(w.shape[1], w.shape[0], bias=linear.bias is not None or config.add_bias, config=config,
                    device=w.device)
        paths = layer.initialize(w, in_stat, out_stat)
        if on_paths is not None:
            on_paths(paths)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    @torch.no_grad()
    def initialize(self, w: torch.Tensor, in_stat: torch.Tensor | None = None,
                   out_stat: torch.Tensor | None = None) -> list[BinaryPath]:
        cfg = self.config
        w = w.to(torch.float32)

        def fit(m):
            return decompose(m, cfg.num_paths, cfg.init, cfg.isvid_rounds, cfg.svid_power_iters)

        if cfg.precondition and (in_stat is not None or out_stat is not None):
            paths = preconditioned_decompose(w, fit, in_stat, out_stat, cfg.alpha_in, cfg.alpha_out)
        else:
            paths = fit(w)
        self.load_paths(paths, w)
        return paths

    @torch.no_grad()
    def load_paths(self, paths: list[BinaryPath], w: torch.Tensor | None = None) -> None:
        """Set scales and latent weight(s) so that the layer starts from `paths`.

        Independent/frozen: latents[i] = B_i * |target_i|, where target_i = w - (all other paths) is what path i
        was fit to; sign(latents[i]) = B_i exactly and the magnitude says how far each weight is from flipping.
        Coupled: config.latent_init picks the original weight w or the reconstruction sum_i g_i B_i h_i.
        """
        if len(paths) != self.num_paths:
            raise ValueError(f"expected {self.num_paths} paths, got {len(paths)}")
        for i, (g, B, h) in enumerate(paths):
            self.scale_out[i].copy_(g)
            self.scale_in[i].copy_(h)
        approx = reconstruct(paths)
        if w is None:
            w = approx
        if self.mode == "coupled":
            self.latent.copy_(w if self.config.latent_init == "weight" else approx)
        else:
            tiny = torch.finfo(torch.float32).tiny
            for i, (g, B, h) in enumerate(paths):
                target = w - (approx - path_matrix(g, B, h))
                self.latents[i].copy_(B * target.abs().clamp_min(tiny))
        self._cache = None

    def _apply_freezing(self) -> None:
        if self.mode != "frozen":
            return
        for i in range(self.num_paths - 1):
            self.latents[i].requires_grad_(False)
            self.scale_out[i].requires_grad_(False)
            self.scale_in[i].requires_grad_(False)

    # -------------------------------------------------------------------------------------------- forward
    def _signs(self) -> list[torch.Tensor]:
        if self.mode == "coupled":
            return coupled_signs(self.latent, [g.detach() for g in self.scale_out],
                                 [h.detach() for h in self.scale_in])
        return [binarize(lat.detach()) for lat in self.latents]

    def _weight_with_ste(self) -> torch.Tensor:
        cfg = self.config
        clipped = cfg.ste == "clipped"
        signs = self._signs()
        if self.mode == "coupled":
            # Value: sum_i g_i B_i h_i with B_i constants, so the scales get their ordinary gradients.
            value = path_matrix(self.scale_out[0], signs[0], self.scale_in[0])
            for i in range(1, self.num_paths):
                value = value + path_matrix(self.scale_out[i], signs[i], self.scale_in[i])
            mask = None
            if clipped:
                with torch.no_grad():
                    bound = sum(g.abs()[:, None] * h.abs()[None, :] for g, h in zip(self.scale_out, self.scale_in))
                mask = ste_mask(self.latent.detach(), bound, cfg.ste_clip)
            # Straight-through: d loss / d W = d loss / d W_eff (masked when clipped).
            return straight_through(value, self.latent, mask)
        weight = None
        for i, B in enumerate(signs):
            lat = self.latents[i]
            mask = None
            if clipped:
                with torch.no_grad():
                    bound = self.scale_out[i].abs()[:, None] * self.scale_in[i].abs()[None, :]
                mask = ste_mask(lat.detach(), bound, cfg.ste_clip)
            b = straight_through(B, lat, mask) if lat.requires_grad else B
            term = path_matrix(self.scale_out[i], b, self.scale_in[i])
            weight = term if weight is None else weight + term
        return weight

    def _versions(self) -> tuple:
        return tuple((id(p), p._version) for p in self.parameters())

    def effective_weight(self) -> torch.Tensor:
        """The dense out x in weight the forward pass uses (sum_i g_i B_i h_i)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._weight_with_ste()
        # Inference: the weight only changes when a parameter does, so cache it between calls.
        versions = self._versions()
        if self._cache is None or self._cache[0] != versions:
            with torch.no_grad():
                self._cache = (versions, reconstruct(self.paths()), None)
        return self._cache[1]

    def _coupled_state(self) -> tuple:
        """coupled_weight() of the current parameters, kept while no parameter changes.

        The micro-batches of one optimizer step (and gradient checkpointing's re-runs) then share one
        derivation. Not kept under torch.distributed: sharded parameters are gathered into tensors whose
        version counters need not move when their values do.
        """
        clip = self.config.ste_clip if self.config.ste == "clipped" else None
        g = [p.detach() for p in self.scale_out]
        h = [p.detach() for p in self.scale_in]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return coupled_weight(self.latent.detach(), g, h, clip)
        versions = self._versions()
        if self._cache is None or self._cache[0] != versions or self._cache[2] is None:
            state = coupled_weight(self.latent.detach(), g, h, clip)
            self._cache = (versions, state[0], state)  # the weight doubles as the inference cache
        return self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.mode == "coupled" and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.parameters())):
            return coupled_linear(x, self.latent, list(self.scale_out), list(self.scale_in), self.bias,
                                  self._coupled_state())
        weight = self.effective_weight()
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def paths(self) -> list[BinaryPath]:
        """The k paths as detached (g, B, h) with B a +-1 float tensor."""
        signs = self._signs()
        return [(g.detach(), B, h.detach()) for g, B, h in zip(self.scale_out, signs, self.scale_in)]

    def latent_parameters(self) -> list[nn.Parameter]:
        return [self.latent] if self.mode == "coupled" else list(self.latents)

    def scale_parameters(self) -> list[nn.Parameter]:
        return list(self.scale_out) + list(self.scale_in)

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_paths={self.num_paths}, mode={self.mode}")
