"""CPU time of one coupled-training optimizer step, split into its parts, and the loss of each step.

One step = grad_accum micro-batches of (teacher forward, student forward + distillation loss, backward), then
the gradient norm, Muon on the latents and AdamW on the rest: what Trainer.train does, without its
checkpointing and logging. Times are CPU seconds of this process (time.process_time, all threads), which a
loaded machine distorts far less than wall-clock time; wall_s and tokens_per_s are the step's wall-clock figures.
Prints one JSON line per step (losses and phase times) so that two code versions can be compared step by step
(same seed, same data, same start).

    python benchmarks/train_step_profile.py --steps 3 --seq-len 256 [--profile] [--model PATH|small] [--frozen-latents]
        [--autocast]

--profile adds a torch.profiler table of the last step's operators by self CPU time.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rabit import RaBiTConfig
from rabit.train.losses import batch_distillation_loss
from rabit.train.optim import OptimConfig, Optimizers, prepare_student
from rabit.train.trainer import make_student


def build(model_name: str, seed: int):
    """(teacher, token rows): the default model (or any local one), or a random 4-layer Llama for "small"."""
    torch.manual_seed(seed)
    if model_name == "small":  # a small random Llama, for loss curves over many steps
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        teacher = LlamaForCausalLM(cfg)
        rows = torch.randint(0, teacher.config.vocab_size, (64, 512), generator=torch.Generator().manual_seed(seed))
        return teacher, rows
    from rabit.data import training_sequences
    from rabit.models import load_model
    teacher, tok = load_model(model_name)
    rows, _ = training_sequences(tok, ["wikitext2-valid"], 512, val_fraction=0.05, seed=seed)
    return teacher, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--mode", default="coupled")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--latent-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--data-seed", type=int, default=None, help="shuffle the rows with this seed (same model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--latent-sgd", action="store_true",
                    help="update the latents by plain SGD instead of Muon (times the rest of the step alone)")
    ap.add_argument("--frozen-latents", action="store_true",
                    help="freeze the latents (only scales, norms and biases train, no Muon): the job's default "
                         "distillation (train_latents=False)")
    ap.add_argument("--muon-ns-dtype", default=None, help="OptimConfig.muon_ns_dtype, where the code has it")
    ap.add_argument("--autocast", action="store_true",
                    help="bf16 autocast in the forward passes, as the job does where the CPU has native bf16")
    ap.add_argument("--no-frozen-casts", action="store_true",
                    help="cast the frozen weights to bf16 every step (as before docs/RESULTS.md section 38) instead of "
                         "once (rabit.train.frozen_casts)")
    args = ap.parse_args()
    if not args.no_frozen_casts:
        from rabit.train.frozen_casts import FrozenCasts
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, rows = build(args.model, args.seed)
    teacher.eval().requires_grad_(False)
    rows = rows[:, :args.seq_len]
    if args.data_seed is not None:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(args.data_seed))]
    student = make_student(teacher, RaBiTConfig(mode=args.mode, init="naive", precondition=False))
    student.train()
    # trees before train_latents existed (e.g. 15c0b76, issue 14's filing) take no argument: latents train there
    split = prepare_student(student, **({"train_latents": False} if args.frozen_latents else {}))
    ocfg = OptimConfig(latent_lr=args.latent_lr, scale_lr=1e-3)
    if args.muon_ns_dtype:
        ocfg.muon_ns_dtype = args.muon_ns_dtype
    optim = Optimizers(split, ocfg, total_steps=args.steps)
    params = [p for _, p in split.latents + split.others]
    tokens = args.batch_size * args.grad_accum * args.seq_len
    clock = time.process_time
    # older trees (before rabit.train.frozen_casts) have no casts argument: time them with --no-frozen-casts
    casts_arg = {} if args.no_frozen_casts else {"casts": FrozenCasts()}

    def step(i: int) -> dict:
        t = {"forward_loss": 0.0, "backward": 0.0}
        loss = 0.0
        t_start, wall_start = clock(), time.perf_counter()
        for j in range(args.grad_accum):
            first = ((i * args.grad_accum + j) * args.batch_size) % rows.shape[0]
            batch = rows[first:first + args.batch_size]
            t0 = clock()
            out = batch_distillation_loss(teacher, student, batch, args.gamma, 1.0, 256, autocast=args.autocast,
                                          **casts_arg)
            t1 = clock()
            (out.total / args.grad_accum).backward()
            t["forward_loss"] += t1 - t0
            t["backward"] += clock() - t1
            loss += float(out.total.detach()) / args.grad_accum
        t0 = clock()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optim.apply_schedule()
        if args.latent_sgd:
            with torch.no_grad():
                for _, p in split.latents:
                    p.add_(p.grad, alpha=-args.latent_lr)
        elif optim.muon is not None:
            optim.muon.step()
        t1 = clock()
        if optim.adamw is not None:
            optim.adamw.step()
        optim.step_count += 1
        optim.zero_grad()
        t["muon"] = t1 - t0
        t["adamw"] = clock() - t1
        total = clock() - t_start
        wall = time.perf_counter() - wall_start
        return {"step": i + 1, "loss": loss, "cpu_s": total, "cpu_tokens_per_s": tokens / total, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
                **{k: round(v, 3) for k, v in t.items()}}

    for i in range(args.steps):
        last = i == args.steps - 1
        if args.profile and last:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                row = step(i)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            row = step(i)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
