"""Muon for FSDP2-sharded latents: each matrix orthogonalized once, on its owner rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .fsdp import _is_dtensor, _local
from .optim import Muon


class DistributedMuon(Muon):
    """rabit's Muon (torch.optim.Muon with a Newton-Schulz dtype) for FSDP2-sharded (Shard(0) DTensor) 2-D
    parameters, with one owner per matrix.

    For each matrix: the Nesterov momentum update is formed on the local rows, cast to the Newton-Schulz dtype
    (bf16 where native, else fp32, as the one-process Muon), gathered on the matrix's owner rank, orthogonalized
    there, and the rows are scattered back; every rank then applies weight decay and the update to its own rows.
    Owners are assigned greedily by size (the same way on every rank), so each rank does ~1/N of the
    Newton-Schulz work. Momentum, orthogonalization and the update are the one-process Muon's own methods, the
    state ("momentum_buffer", sharded like the parameter) and hyper-parameters torch.optim.Muon's, and the update
    equals single-process Muon's bit for bit. Plain (non-DTensor) parameters are updated locally, which is only
    valid in a single process.
    """

    def __init__(self, params, *, group=None, bucket_numel: int = 1 << 26, ns_dtype: torch.dtype | None = None,
                 **kwargs):
        super().__init__(params, ns_dtype=ns_dtype, **kwargs)
        self._pg = group
        self._bucket_numel = int(bucket_numel)

    def _world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self._pg), dist.get_world_size(self._pg)

    def _update(self) -> None:   # Muon.step's body: runs the closure, then this
        rank, world = self._world()
        items = list(self._with_grads())
        loads = [0] * world
        owners = []
        for _, p in items:
            owner = min(range(world), key=lambda r: (loads[r], r))
            loads[owner] += p.numel()
            owners.append(owner)

        def finish(group, p, update_local):
            self._apply(group, _local(p), update_local, p.shape)

        bucket = []
        size = 0
        for (group, p), owner in zip(items, owners):
            update = self._momentum(group, _local(p.grad), _local(self.state[p]["momentum_buffer"]))
            if not _is_dtensor(p) and world > 1:
                raise RuntimeError("DistributedMuon: a non-sharded parameter in a multi-process run; shard the "
                                   "model with fully_shard first")
            dtype = self._ns_dtype(p.device)

            def ns(x, group=group, dtype=dtype):
                return self._orthogonalize(group, x, dtype)

            if world == 1:  # the local rows are the whole matrix
                finish(group, p, ns(update))
                continue
            bucket.append((group, p, owner, update.to(dtype), ns))
            size += p.numel()
            if size >= self._bucket_numel:
                self._sharded_round(bucket, rank, world, finish)
                bucket, size = [], 0
        if bucket:
            self._sharded_round(bucket, rank, world, finish)

    def _sharded_round(self, bucket, rank, world, finish) -> None:
        from torch.distributed.tensor import Shard

        # gloo has no bf16 collectives: send fp32 (bf16 -> fp32 -> bf16 is exact); fp32 updates travel as fp32.
        fp32 = dist.get_backend(self._pg) == "gloo" or any(b[3].dtype == torch.float32 for b in bucket)
        wire = torch.float32 if fp32 else torch.bfloat16
        pending, meta = [], []
        for group, p, owner, upd, ns in bucket:
            if tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"DistributedMuon needs parameters sharded on dim 0, got {p.placements}")
            n, m = p.shape
            chunk = -(-n // world)
            rows = upd.shape[0]
            if rows != max(0, min(chunk, n - rank * chunk)):
                raise RuntimeError(f"unexpected shard layout: {rows} local rows of {n} on rank {rank}/{world}")
            send = torch.zeros(chunk, m, dtype=wire, device=upd.device)
            send[:rows].copy_(upd)
            recv = [torch.empty_like(send) for _ in range(world)] if rank == owner else None
            dst = dist.get_global_rank(self._pg, owner) if self._pg is not None else owner
            pending.append(dist.gather(send, recv, dst=dst, group=self._pg, async_op=True))
            meta.append((group, p, owner, recv, n, m, chunk, rows, dst, ns, upd.dtype))
        for w in pending:
            w.wait()
        pending, outs = [], []
        for group, p, owner, recv, n, m, chunk, rows, src, ns, dtype in meta:
            out = torch.empty(chunk, m, dtype=wire, device=p.device)
            scatter = None
            if rank == owner:
                o = ns(torch.cat(recv)[:n].to(dtype))
                padded = torch.zeros(world * chunk, m, dtype=wire, device=o.device)
                padded[:n].copy_(o)
                scatter = list(padded.split(chunk))
            pending.append(dist.scatter(out, scatter, src=src, group=self._pg, async_op=True))
            outs.append((group, p, out, rows, dtype))
        for w in pending:
            w.wait()
        for group, p, out, rows, dtype in outs:
            finish(group, p, out[:rows].to(dtype))
