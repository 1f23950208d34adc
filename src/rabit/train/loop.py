"""The one distillation loop, for one process and for many.

What differs between them sits in a small strategy object, `Collective`: how a micro-batch's rows are split
(all rows / this rank's slice), how step losses are averaged (as they are / all-reduced), and how the gradient
norm is computed and clipped (clip_grad_norm_ / over all shards). Checkpoints are the trainer's own (local
files in train.trainer.Trainer, torch.distributed.checkpoint in train.distributed.DistributedTrainer). The loop
itself (logging, progress, NaN/Inf stops with the last good state saved, the result) is the same for both.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError


# A time-budgeted run (TrainConfig.time_budget_s) trains with these provisional steps, whose warm-up keeps the
# learning rate near zero, until BUDGET_PROBE_STEPS steps are timed; the first step (allocations, kernel
# builds) is left out of the estimate when there are others. From the second step on, the rates are those of a
# provisional schedule sized at the first step's pace (slower than the rest: fewer steps, so a warm-up no longer
# than the one chosen later), so that only the first step trains at a near-zero rate (a 13-minute job's timed
# steps were 3 of its ~27).
PROVISIONAL_STEPS = 1_000_000
BUDGET_PROBE_STEPS = 3
# After the warm-up's estimate, the first session estimates the step count again at these fractions of it, from
# its later half of step times, and adopts an estimate that differs by more than BUDGET_TOLERANCE: step times
# drift within a run on a shared or throttled machine (a 13-minute job on 2 cores had steps of 2.4 s at first and
# 1.8 s later, and used 77 % of its training budget; 8 runs sharing a GPU overran theirs by 1.7x). The learning
# rate then follows the cosine of the new length from where it is, a small step in the rate. The checks use the
# mean step time, as the time spent adds up (the median ran 1-4 % under it, so the 13-minute jobs overran their
# training budgets by up to 15 s), and a projected overrun is corrected from BUDGET_OVERRUN_TOLERANCE on (the job's
# end is a promise; leaving a few seconds unused is not worth a change of schedule).
BUDGET_CHECKS = (0.25, 0.5, 0.75, 0.9)
BUDGET_TOLERANCE = 0.05
BUDGET_OVERRUN_TOLERANCE = 0.01


def warmup_steps_for(rule: float, steps: int) -> int:
    """Warm-up steps of a run of `steps` steps: a fraction of them if rule < 1, else a count (at most steps)."""
    return min(int(round(rule * steps)) if rule < 1 else int(rule), steps)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class TrainingDiverged(InputError, RuntimeError):
    """The loss (or the gradient) became NaN or Inf."""


class Collective:
    """One process: every row of a micro-batch is this process' own; nothing to reduce."""

    world_size = 1
    rank = 0
    is_main = True
    distributed = False  # part of a process group (log rows then carry world_size)

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def all_true(self, flag: bool) -> bool:
        return bool(flag)

    def grad_norm_and_clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


class ProcessGroupCollective(Collective):
    """Every rank of the process group (env: a process_group.DistEnv): each trains on its contiguous slice of the
    global micro-batch, losses are all-reduced means, the gradient norm runs over all shards."""

    distributed = True

    def __init__(self, env):
        self.env = env
        self.world_size, self.rank, self.is_main = env.world_size, env.rank, env.is_main
        self.peak_grad_bytes = 0

    def _reduce_device(self):
        return self.env.device if self.env.backend == "nccl" else "cpu"

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        b = idx.numel() // self.world_size
        return idx[self.rank * b:(self.rank + 1) * b]

    def mean(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._reduce_device())
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self._reduce_device())
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item()) == 0

    def grad_norm_and_clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        import torch.distributed as dist

        grads = [_local(p.grad) for p in params if p.grad is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in grads))
        sq = torch.zeros((), dtype=torch.float32, device=self.env.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        if self.world_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = float(sq.sqrt())
        if max_norm > 0 and math.isfinite(norm):
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        return norm


@dataclass
class TrainResult:
    steps: int
    tokens: int                 # tokens trained on over the whole run (all sessions)
    seconds: float              # training time of this session (excluding checkpoint writes)
    session_tokens: int
    tokens_per_second: float
    resumed_from: int | None
    last: dict | None           # the last step's log row


class _LastGood:
    """An in-memory copy of the trainable parameters, the optimizer state and the step/data/RNG position,
    taken just before each optimizer step (when the step's losses and gradients were all finite), into
    buffers allocated once. If a later step produces NaN/Inf, this is the state that is saved."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []
        self.position: dict | None = None

    @staticmethod
    def _tensors(trainer) -> list[torch.Tensor]:
        # local shards of sharded (DTensor) tensors: every rank keeps and restores its own part
        out = [_local(p) for _, p in trainer.split.latents + trainer.split.others]
        for opt in trainer.optim.named().values():
            for p in opt.param_groups[0]["params"] + [q for g in opt.param_groups[1:] for q in g["params"]]:
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        out.append(_local(v))
        return out

    @torch.no_grad()
    def capture(self, trainer, position: dict) -> None:
        src = self._tensors(trainer)
        same = len(src) == len(self.sources) and all(a.data_ptr() == b.data_ptr() for a, b in zip(src, self.sources))
        if not same:
            self.sources = src
            self.buffers = [torch.empty_like(t) for t in src]
        torch._foreach_copy_(self.buffers, self.sources)
        self.position = position

    @torch.no_grad()
    def restore(self, trainer) -> bool:
        if self.position is None:
            return False
        current = self._tensors(trainer)
        n = len(self.sources)
        if len(current) < n or any(a.data_ptr() != b.data_ptr() for a, b in zip(current, self.sources)):
            return False  # the optimizer replaced its state tensors: cannot restore in place
        if len(current) > n:
            # the optimizer state was created after the capture (it was empty then): drop it again
            for opt in trainer.optim.named().values():
                opt.state.clear()
        torch._foreach_copy_(self.sources, self.buffers)
        pos = self.position
        trainer.step = pos["step"]
        trainer.optim.step_count = pos["step"]
        trainer.optim.apply_schedule()
        trainer.sampler.load_state_dict(pos["data"])
        torch.set_rng_state(pos["rng"])
        return True



class DistillLoop:
    """The training loop shared by Trainer and DistributedTrainer. A subclass sets cfg, student, split, optim,
    sampler, train_rows, device, log, step, last_saved, resumed_from, tokens_per_step, progress,
    step_callback, collective and _last_good, and provides losses(), save() and checkpoint_root."""

    checkpoint_root: Path

    # ------------------------------------------------------------------------------------- time budget
    def budget_pending(self) -> bool:
        """A time budget whose steps are not chosen yet."""
        return self.cfg.time_budget_s > 0 and self.cfg.steps == PROVISIONAL_STEPS

    def set_total_steps(self, steps: int, warmup_steps: int) -> None:
        """Fix the run's length (and so its learning-rate schedule from this step on)."""
        self.cfg.steps = int(steps)
        self.cfg.optim.warmup_steps = int(warmup_steps)
        self.optim.config.warmup_steps = int(warmup_steps)
        self.optim.total_steps = int(steps)
        self.optim.set_provisional_schedule(None)
        self.optim.apply_schedule()

    def adopt_budgeted_steps(self, saved: dict | None) -> None:
        """On resume: a time-budgeted run keeps the steps its first session chose (stored in its checkpoint)."""
        if (self.cfg.time_budget_s > 0 and saved and saved.get("time_budget_s") == self.cfg.time_budget_s
                and saved.get("steps") not in (None, PROVISIONAL_STEPS)):
            self.set_total_steps(int(saved["steps"]), int(saved.get("optim", {}).get("warmup_steps", 0)))
            self.cfg.budget_refined = bool(saved.get("budget_refined", False))
            self.cfg.budget_checks = int(saved.get("budget_checks", 0))

    def _steps_that_fit(self, per_step: float, spent: float) -> int:
        """The steps done plus those the rest of the time budget holds at per_step seconds each (fewer than done
        when the budget is already spent)."""
        return self.step + int((self.cfg.time_budget_s - spent) / max(per_step, 1e-9))

    def _choose_budgeted_steps(self, step_times: list[float]) -> int:
        """Steps that fit the time budget, from this session's step times (every rank agrees: means of all)."""
        times = step_times[1:] or step_times
        per_step, spent = self.collective.mean([statistics.median(times), sum(step_times)])
        steps = max(self.step, self._steps_that_fit(per_step, spent))
        self.set_total_steps(steps, warmup_steps_for(self.cfg.budget_warmup, steps))
        return steps

    def _provisional_schedule(self, step_times: list[float]) -> None:
        """After the first timed step: the learning-rate schedule of the steps that fit the budget at that step's
        pace, for the rest of the timed steps. The run's length stays pending, and checkpoints store the pending
        schedule (a session resumed before the length is chosen times its steps again, at near-zero rates)."""
        per_step, spent = self.collective.mean([step_times[0], sum(step_times)])
        steps = max(BUDGET_PROBE_STEPS, self._steps_that_fit(per_step, spent))
        self.optim.set_provisional_schedule(steps, warmup_steps_for(self.cfg.budget_warmup, steps))

    def budget_to_refine(self) -> bool:
        """At the end of the warm-up a time budget's step count is estimated once more: the timed first steps run
        slower than the rest (a 48-minute budget was 13 % under-used), and until then no learning rate depended
        on the total (the warm-up's rates depend on its length only), so changing it changes no rate used."""
        return (self.cfg.time_budget_s > 0 and not self.cfg.budget_refined and not self.budget_pending()
                and self.step >= self.cfg.optim.warmup_steps)

    def _refine_budgeted_steps(self, step_times: list[float]) -> int:
        """The step count from the steps after the timed ones (a resumed session: its own steps, and the earlier
        sessions' steps counted at that pace)."""
        times = step_times[BUDGET_PROBE_STEPS:] if self.resumed_from is None else step_times
        # only where the warm-up outlasts the timed steps (else rates after it already used the total)
        if self.cfg.optim.warmup_steps > BUDGET_PROBE_STEPS and times and self.step < self.cfg.steps:
            per_step = statistics.median(times)
            before = (self.resumed_from or 0) * per_step
            per_step, spent = self.collective.mean([per_step, sum(step_times) + before])
            steps = max(self.step, self._steps_that_fit(per_step, spent))
            self.set_total_steps(steps, self.cfg.optim.warmup_steps)
        self.cfg.budget_refined = True
        return self.cfg.steps

    def budget_to_check(self) -> bool:
        """A first session's time budget is re-estimated at BUDGET_CHECKS of its steps (a resumed session keeps the
        steps it was given, whatever its own speed)."""
        cfg, done = self.cfg, self.cfg.budget_checks
        return (cfg.time_budget_s > 0 and cfg.budget_refined and self.resumed_from is None
                and done < len(BUDGET_CHECKS) and self.step >= BUDGET_CHECKS[done] * cfg.steps)

    def _check_budgeted_steps(self, step_times: list[float]) -> int:
        """The step count from the mean of the later half of this session's step times; kept unless it is more
        than BUDGET_TOLERANCE above the planned one or BUDGET_OVERRUN_TOLERANCE below it."""
        per_step = statistics.fmean(step_times[len(step_times) // 2:])
        per_step, spent = self.collective.mean([per_step, sum(step_times)])
        steps = max(self.step + 1, self._steps_that_fit(per_step, spent))
        planned = self.cfg.steps
        if steps > planned * (1 + BUDGET_TOLERANCE) or steps < planned * (1 - BUDGET_OVERRUN_TOLERANCE):
            self.set_total_steps(steps, self.cfg.optim.warmup_steps)
        self.cfg.budget_checks += 1
        return self.cfg.steps

    def _load_position(self, path: Path, state: dict) -> None:
        """The schedule and data position a checkpoint's state stores (both checkpoint kinds store them alike)."""
        from .checkpoint import CheckpointError

        try:
            self.optim.load_scheduler_state(state["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: bad scheduler state: {e}") from None
        self.sampler.load_state_dict(state["data"])

    def _trainable_ok(self) -> bool:
        ok = all(bool(torch.isfinite(_local(p)).all()) for _, p in self.split.latents + self.split.others)
        return self.collective.all_true(ok)

    def _diverged(self, what: str, value: float, step: int) -> None:
        self.optim.zero_grad()
        if self._last_good is not None and self._last_good.restore(self):
            # state after step (step - 2): the last one whose step produced finite losses and gradients
            # (the state after step - 1 is what produced the non-finite value, so it is not trusted)
            path = self.save()
            where = f"saved the last good state (after step {self.step}) to {path}"
        elif self._trainable_ok() and self.step > self.last_saved:
            path = self.save()
            where = f"saved the last state with finite parameters (after step {self.step}) to {path}"
        elif self.last_saved >= 0:
            where = f"the last good state is the checkpoint of step {self.last_saved} in {self.checkpoint_root}"
        else:
            where = "no good state could be saved (the initial parameters are not finite)"
        raise TrainingDiverged(f"{what} is {value} at step {step}; stopped and {where}. "
                               "Try lower learning rates (--latent-lr / --scale-lr).")

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train to config.steps (or stop after step `stop_at`, saving a checkpoint there)."""
        cfg, col = self.cfg, self.collective
        total = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
        self.student.train()
        desc = "distilling" + (f" ({col.world_size} proc)" if col.distributed else "")
        bar = tqdm(total=None if self.budget_pending() else cfg.steps, initial=self.step, unit="step", desc=desc,
                   disable=not self.progress, dynamic_ncols=True)
        train_seconds, session_tokens, last = 0.0, 0, None
        # what the time budget counts (its seconds spent are their sum): each step with the checkpoint written after
        # it (a run whose latents train writes ~1 GB every save_every steps: 35 checkpoints took ~84 s of a 60-minute
        # job, which ended 58 s late, docs/RESULTS.md section 49); the log's seconds and tokens/s stay the steps' own
        budget_times: list[float] = []
        params = [p for _, p in self.split.latents + self.split.others]
        if col.is_main:
            self.log.truncate_after(self.step)  # drop steps a killed session logged after its last checkpoint
        try:
            while self.step < total:
                step_no = self.step + 1
                if self.step_callback is not None:
                    self.step_callback(self, step_no)
                t0 = time.perf_counter()
                position = ({"step": self.step, "data": self.sampler.state_dict(), "rng": torch.get_rng_state()}
                            if self._last_good is not None else None)
                local = [0.0, 0.0, 0.0]
                for _ in range(cfg.grad_accum):
                    idx = col.local_rows(self.sampler.take(cfg.batch_size))
                    out = self.losses(self.train_rows[idx].to(self.device))
                    # every rank runs backward (FSDP's collectives); a non-finite step is refused below
                    (out.total / cfg.grad_accum).backward()
                    for i, v in enumerate((out.total, out.kl, out.mse)):
                        local[i] += float(v.detach()) / cfg.grad_accum
                loss, kl, mse = col.mean(local)
                if not math.isfinite(loss):
                    self._diverged("the loss", loss, step_no)
                grad_norm = col.grad_norm_and_clip(params, cfg.max_grad_norm)
                if not math.isfinite(grad_norm):
                    self._diverged("the gradient norm", grad_norm, step_no)
                if self._last_good is not None:
                    self._last_good.capture(self, position)
                lrs = self.optim.lrs()
                t_opt = time.perf_counter()
                self.optim.step()
                t_opt = time.perf_counter() - t_opt
                self.optim.zero_grad()
                self.step = step_no
                dt = time.perf_counter() - t0
                train_seconds += dt
                budget_times.append(dt)
                session_tokens += self.tokens_per_step
                tok_s = session_tokens / max(train_seconds, 1e-9)
                last = {"step": step_no, "loss": loss, "kl": kl, "mse": mse, "grad_norm": grad_norm,
                        "lr_latent": lrs.get("muon"), "lr_scale": lrs.get("adamw"),
                        "tokens": step_no * self.tokens_per_step, "seconds": dt, "tokens_per_s": tok_s,
                        "optimizer_seconds": t_opt, **({"world_size": col.world_size} if col.distributed else {})}
                if col.is_main:
                    self.log.write(last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", kl=f"{kl:.4g}", mse=f"{mse:.4g}", tok_s=f"{tok_s:.0f}",
                                refresh=False)
                chosen = None
                if self.budget_pending() and len(budget_times) >= BUDGET_PROBE_STEPS:
                    chosen = self._choose_budgeted_steps(budget_times)
                elif self.budget_pending() and len(budget_times) == 1 and self.resumed_from is None:
                    self._provisional_schedule(budget_times)
                elif self.budget_to_refine():
                    chosen = self._refine_budgeted_steps(budget_times)
                elif self.budget_to_check():
                    chosen = self._check_budgeted_steps(budget_times)
                if chosen is not None:
                    total = chosen if stop_at is None else min(chosen, int(stop_at))
                    bar.total = chosen
                    bar.refresh()
                if self.step % cfg.save_every == 0 or self.step == total:
                    t_save = time.monotonic()
                    self.save()
                    budget_times[-1] += time.monotonic() - t_save
            if self.last_saved != self.step:
                self.save()
        finally:
            bar.close()
            self.log.close()
        return TrainResult(steps=self.step, tokens=self.step * self.tokens_per_step, seconds=train_seconds,
                           session_tokens=session_tokens,
                           tokens_per_second=session_tokens / train_seconds if train_seconds else 0.0,
                           resumed_from=self.resumed_from, last=last)
