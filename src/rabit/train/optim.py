"""Which parameters train, with which optimizer, at which learning rate.

* Latent weights of RaBiTLinear layers (2-D) -> Muon (torch.optim.Muon's orthogonalized momentum updates), with
  adjust_lr_fn="match_rms_adamw" so that its learning rate is on AdamW's scale. Its Newton-Schulz iteration
  runs in bf16 where bf16 matmuls are native and in fp32 elsewhere (see `Muon`).
* Everything else that trains -> AdamW: the path scales g_i / h_i, RaBiTLinear biases, and the 1-D
  parameters of the rest of the model (RMSNorm / LayerNorm weights and biases).
* Frozen: parameters with requires_grad=False (e.g. the frozen paths of mode="frozen") and, by default,
  every full-precision weight matrix outside RaBiTLinear layers: embeddings, lm_head and layers excluded
  from quantization. They are not quantized, so training them is not the point, and freezing them saves
  their weight gradients (the lm_head alone is 21% of SmolLM2-135M's compute).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layer import RaBiTLinear


@dataclass
class ParamSplit:
    latents: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    others: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"latent": sum(p.numel() for _, p in self.latents),
                "other": sum(p.numel() for _, p in self.others),
                "frozen_tensors": len(self.frozen)}


def prepare_student(model: nn.Module, train_fp_weights: bool = False, train_latents: bool = True) -> ParamSplit:
    """Set requires_grad on the student (see the module docstring) and return the parameter split.

    Parameters that are already frozen (requires_grad=False) inside RaBiTLinear layers stay frozen.
    With train_fp_weights, full-precision matrices outside RaBiTLinear (except embeddings) train with AdamW.
    train_latents=False freezes every latent weight (no Muon): only scales, norms and biases train.
    """
    rabit_params: dict[int, str] = {}
    for mname, module in model.named_modules():
        if isinstance(module, RaBiTLinear):
            for p in module.latent_parameters():
                rabit_params[id(p)] = "latent"
                if not train_latents:
                    p.requires_grad_(False)
            for p in module.scale_parameters():
                rabit_params[id(p)] = "other"
            if module.bias is not None:
                rabit_params[id(module.bias)] = "other"
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        if mod is not None:
            embeddings.update(id(p) for p in mod.parameters())
    for _, p in model.named_parameters():
        kind = rabit_params.get(id(p))
        if kind is not None:
            continue  # RaBiTLinear decides (frozen paths keep requires_grad=False)
        if id(p) in embeddings:
            p.requires_grad_(False)
        elif p.ndim >= 2 and not train_fp_weights:
            p.requires_grad_(False)
        else:
            p.requires_grad_(True)
    return split_parameters(model)


def split_parameters(model: nn.Module) -> ParamSplit:
    """Latents (-> Muon), other trainable parameters (-> AdamW) and frozen parameter names.

    Shared (tied) parameters are listed once, under their first name.
    """
    latent_ids = set()
    for module in model.modules():
        if isinstance(module, RaBiTLinear):
            latent_ids.update(id(p) for p in module.latent_parameters())
    split = ParamSplit()
    for name, p in model.named_parameters():  # named_parameters() already skips duplicates
        if not p.requires_grad:
            split.frozen.append(name)
        elif id(p) in latent_ids:
            if p.ndim != 2:
                raise ValueError(f"latent parameter {name} is not 2-D ({tuple(p.shape)}); Muon needs matrices")
            split.latents.append((name, p))
        else:
            split.others.append((name, p))
    return split


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over warmup_steps, then cosine decay from 1 to min_ratio at total_steps.

    `step` is the 0-based index of the optimizer step about to be taken.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


NS_DTYPES = ("auto", "bfloat16", "float32")


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalization of a 2-D update, computed in `dtype`.

    The same iteration as torch.optim.Muon's (which always uses bf16): X = G / ||G||_F on the wide side, then
    `steps` times A = X X^T, X = a X + (b A + c A A) X. The result is returned in `dtype`.
    """
    if grad.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies bf16 natively (CUDA, AVX512-BF16/AMX CPUs), else fp32.

    Why: without native bf16 a CPU emulates bf16 matmuls; measured on an AVX2 AMD EPYC, the 5 bf16
    iterations on a 1536 x 576 latent cost 12x the CPU time of fp32 ones, which made Muon most of a step.
    """
    from .trainer import native_bf16  # trainer imports this module

    return torch.bfloat16 if native_bf16(device) else torch.float32


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz dtype as a choice (ns_dtype: a torch dtype, or None = per device,
    default_ns_dtype). State and param groups are torch.optim.Muon's, so checkpoints load in either."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    # The pieces of a step, shared with rabit.train.dist_muon.DistributedMuon so that both update alike.
    def _with_grads(self):
        """(group, p) for every parameter with a gradient, its momentum buffer created if new."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon supports dense real parameters only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                yield group, p

    @staticmethod
    def _momentum(group, grad: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """Update the momentum buffer in place; returns the (Nesterov) update to orthogonalize."""
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        return self.ns_dtype or default_ns_dtype(device)

    def _orthogonalize(self, group, update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)

    @staticmethod
    def _apply(group, param: torch.Tensor, update: torch.Tensor, shape) -> None:
        """Decoupled weight decay, then the update at the shape-adjusted learning rate."""
        from torch.optim._muon import _adjust_lr

        lr = group["lr"]
        lr = float(lr) if torch.is_tensor(lr) else lr
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], shape))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        for group, p in list(self._with_grads()):
            update = self._momentum(group, p.grad, self.state[p]["momentum_buffer"])
            self._apply(group, p, self._orthogonalize(group, update, self._ns_dtype(p.device)), p.shape)


@dataclass
class OptimConfig:
    latent_lr: float = 3e-3
    scale_lr: float = 1e-3
    weight_decay: float = 0.0          # AdamW (scales, norms)
    latent_weight_decay: float = 0.0   # Muon (decoupled; pulls latents towards 0, i.e. towards sign flips)
    betas: tuple[float, float] = (0.9, 0.95)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5             # Newton-Schulz iterations of Muon's orthogonalization
    muon_ns_dtype: str = "auto"        # their dtype: auto = bf16 where native (default_ns_dtype), else fp32
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def validate(self) -> None:
        for name in ("latent_lr", "scale_lr"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.weight_decay < 0 or self.latent_weight_decay < 0:
            raise ValueError("weight decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ValueError(f"muon_ns_steps must be in [1, 99], got {self.muon_ns_steps}")
        if self.muon_ns_dtype not in NS_DTYPES:
            raise ValueError(f"muon_ns_dtype must be one of {', '.join(NS_DTYPES)}, got {self.muon_ns_dtype!r}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")


class Optimizers:
    """Muon for the latents plus AdamW for the rest, driven by one warm-up + cosine schedule.

    The schedule is a pure function of the step, so its whole state is `self.step` (saved in checkpoints).
    """

    def __init__(self, split: ParamSplit, config: OptimConfig, total_steps: int):
        config.validate()
        self.config = config
        self.total_steps = int(total_steps)
        self.step_count = 0
        self.split = split
        self.muon = None
        self.adamw = None
        if split.latents:
            ns_dtype = None if config.muon_ns_dtype == "auto" else getattr(torch, config.muon_ns_dtype)
            self.muon = Muon([p for _, p in split.latents], lr=config.latent_lr,
                             weight_decay=config.latent_weight_decay, momentum=config.muon_momentum,
                             nesterov=True, ns_steps=config.muon_ns_steps, adjust_lr_fn="match_rms_adamw",
                             ns_dtype=ns_dtype)
        if split.others:
            self.adamw = torch.optim.AdamW([p for _, p in split.others], lr=config.scale_lr,
                                           betas=config.betas, weight_decay=config.weight_decay)
        if self.muon is None and self.adamw is None:
            raise ValueError("the model has no trainable parameters")
        self._base = {"muon": config.latent_lr, "adamw": config.scale_lr}
        self._provisional: tuple[int, int] | None = None
        self.apply_schedule()

    def set_provisional_schedule(self, total_steps: int | None, warmup_steps: int = 0) -> None:
        """Rates from a (total_steps, warmup_steps) schedule for now, without changing the stored one (the schedule
        state of checkpoints); None: back to the stored one. For a time budget's timed steps (train.loop)."""
        self._provisional = None if total_steps is None else (int(total_steps), int(warmup_steps))
        self.apply_schedule()

    def named(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("muon", self.muon), ("adamw", self.adamw)) if v is not None}

    def factor(self, step: int | None = None) -> float:
        c = self.config
        total, warmup = self._provisional or (self.total_steps, c.warmup_steps)
        return lr_factor(self.step_count if step is None else step, total, warmup, c.min_lr_ratio)

    def apply_schedule(self) -> None:
        f = self.factor()
        for key, opt in self.named().items():
            for group in opt.param_groups:
                group["lr"] = self._base[key] * f

    def lrs(self) -> dict[str, float]:
        return {key: opt.param_groups[0]["lr"] for key, opt in self.named().items()}

    def zero_grad(self) -> None:
        for opt in self.named().values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.apply_schedule()
        for opt in self.named().values():
            opt.step()
        self.step_count += 1
        self.apply_schedule()

    def scheduler_state(self) -> dict:
        c = self.config
        return {"step": self.step_count, "total_steps": self.total_steps, "warmup_steps": c.warmup_steps,
                "min_lr_ratio": c.min_lr_ratio, "base_lr": dict(self._base)}

    def load_scheduler_state(self, state: dict) -> None:
        mine = self.scheduler_state()
        for key in ("total_steps", "warmup_steps", "min_lr_ratio", "base_lr"):
            if state.get(key) != mine[key]:
                raise ValueError(f"checkpoint scheduler {key}={state.get(key)!r} differs from this run's "
                                 f"{mine[key]!r}")
        self.step_count = int(state["step"])
        self.apply_schedule()
