"""FSDP2 placement: sharding (or replicating) a model across the ranks, filled from rank 0 or from every rank."""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from ..quantize import rabit_layers
from .losses import decoder_layers
from .process_group import DistEnv

def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard (FSDP2) each decoder block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def place_model(model: nn.Module, env: DistEnv, shard: bool, from_rank0: bool,
                reshard_after_forward: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Shard (or replicate) `model` across the ranks and move it to env.device.

    from_rank0=False: every rank holds the same full model (e.g. loaded from the same file).
    from_rank0=True: only rank 0 holds the real model; the others hold the same architecture on the meta device
    (no memory), and parameters and buffers are broadcast from rank 0 after sharding, so only rank 0 ever holds a
    full copy. dtype casts floating parameters and buffers before placement (e.g. a bf16 teacher).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dtype is not None:
        model.to(dtype)
    full_sd = None
    if from_rank0 and env.world_size > 1:
        if env.is_main:
            if _on_meta(model):
                raise ValueError("rank 0 must hold the real model (it is on the meta device)")
            full_sd = {k: v.detach() for k, v in model.state_dict().items()}
        elif not _on_meta(model):
            raise ValueError(f"rank {env.rank}: with from_rank0 the model must be built on the meta device")
    if shard:
        shard_model(model, env.mesh, reshard_after_forward)
    if _on_meta(model):
        model.to_empty(device=env.device)
    else:
        model.to(env.device)
    if full_sd is not None or (from_rank0 and env.world_size > 1):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_sd if env.is_main else {}, options=opts)
        with torch.no_grad():
            for _, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the sd
                dist.broadcast(buf.data, src=0)
        del full_sd
        gc.collect()
    for layer in rabit_layers(model).values():
        layer._cache = None
    return model


def meta_model(hf_config, dtype: torch.dtype) -> nn.Module:
    """The architecture of `hf_config` on the meta device (no memory), for ranks that receive weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()
