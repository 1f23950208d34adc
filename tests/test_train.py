"""Distillation training: the loss, the optimizer split, the teacher's safety, NaN handling, and the
`rabit quantize` command's refusals of bad input (all on tiny random Llama models)."""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rabit import RaBiTConfig, rabit_layers
from rabit.train import (BlockOutputs, OptimConfig, Trainer, TrainConfig, TrainingDiverged, distillation_loss,
                         hidden_mse, kl_divergence, make_student, prepare_student)
from rabit.train.checkpoint import latest_checkpoint, load_checkpoint
from rabit.train.losses import kl_divergence_reference
from rabit.train.optim import lr_factor


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waiting on busy cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_student(mode="coupled", vocab=96, seed=0):
    teacher = make_tiny_llama(vocab_size=vocab, seed=seed)
    return teacher, make_student(teacher, RaBiTConfig(mode=mode, precondition=False))


def rows(n=8, seq=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- loss
def test_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 40)
    kl = kl_divergence(logits.clone().requires_grad_(True), logits, temperature=1.0)
    assert abs(kl.item()) < 1e-6
    kl2 = kl_divergence(logits.clone(), logits, temperature=3.0)
    assert abs(kl2.item()) < 1e-6
    # and through whole models: a student identical to the teacher has zero loss, KL and MSE
    teacher = make_tiny_llama()
    student = copy.deepcopy(teacher)
    ids = rows(2)
    with BlockOutputs(teacher) as rt:
        t = teacher(input_ids=ids).logits
    with BlockOutputs(student) as rs:
        s = student(input_ids=ids).logits
    out = distillation_loss(s, t, rs.hidden(), rt.hidden(), gamma=100.0)
    assert len(rs.hidden()) == 2
    assert abs(out.kl.item()) < 1e-6 and out.mse.item() == 0.0 and abs(out.total.item()) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_matches_autograd_reference(temperature, dtype):
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 50) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(3, 7, 50) * 3).to(dtype)
    a = kl_divergence(s, t, temperature, chunk_tokens=4)
    b = kl_divergence_reference(s, t, temperature)
    assert a.item() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(2.5 * a, s)
    (gb,) = torch.autograd.grad(2.5 * b, s)
    assert ga.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ga.float(), gb.float(), rtol=tol, atol=tol)


def test_mse_term_scales_with_gamma():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    s_hidden = [torch.randn(2, 4, 8) for _ in range(3)]
    t_hidden = [torch.randn(2, 4, 8) for _ in range(3)]
    mse = hidden_mse(s_hidden, t_hidden)
    manual = sum((a - b).pow(2).mean() for a, b in zip(s_hidden, t_hidden)) / 3
    torch.testing.assert_close(mse, manual)
    kl = distillation_loss(s_logits, t_logits, None, None, gamma=0.0).total
    for gamma in (0.0, 1.0, 10.0, 100.0):
        out = distillation_loss(s_logits, t_logits, s_hidden, t_hidden, gamma=gamma)
        torch.testing.assert_close(out.total, kl + gamma * mse)
        torch.testing.assert_close(out.mse, mse)
    with pytest.raises(ValueError, match="gamma"):
        distillation_loss(s_logits, t_logits, s_hidden, t_hidden, gamma=-1.0)


def test_relative_hidden_loss_weighs_tokens_equally():
    from rabit.train.losses import hidden_relative_error

    torch.manual_seed(0)
    t = [torch.randn(1, 4, 8) for _ in range(2)]
    assert float(hidden_relative_error(t, t)) == 0.0
    # every token off by 10% of its own norm: 0.01 whatever the tokens' scales
    scales = torch.tensor([1.0, 300.0, 0.01, 5.0]).view(1, 4, 1)  # token 1 is a "massive activation"
    big = [x * scales for x in t]
    noise = [torch.randn_like(x) for x in big]
    off = [x + 0.1 * n / n.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True) for x, n in zip(big, noise)]
    torch.testing.assert_close(hidden_relative_error(off, big), torch.tensor(0.01), rtol=1e-4, atol=0)
    # the plain MSE of the same error is ~all token 1's
    mse = hidden_mse(off, big)
    only_1 = hidden_mse([o[:, 1:2] for o in off], [b[:, 1:2] for b in big]) / 4
    assert abs(float(mse) / float(only_1) - 1) < 1e-3
    # scale invariance, and selection through distillation_loss
    logits = torch.randn(1, 4, 30)
    a = distillation_loss(logits, logits, off, big, gamma=10.0, hidden_loss="relative")
    b = distillation_loss(logits, logits, [7 * o for o in off], [7 * x for x in big], gamma=10.0,
                          hidden_loss="relative")
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(a.total, 10 * a.mse + a.kl)
    with pytest.raises(ValueError, match="hidden_loss"):
        distillation_loss(logits, logits, off, big, hidden_loss="l1")


def test_lr_schedule_warmup_and_cosine():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ optimizer split
@pytest.mark.parametrize("mode", ["coupled", "independent", "frozen"])
def test_optimizer_split_latents_to_muon_rest_to_adamw(mode, tmp_path):
    teacher, student = tiny_student(mode)
    tr = Trainer(teacher, student, rows(), TrainConfig(steps=2, autocast=False), tmp_path, progress=False)
    muon = {id(p) for g in tr.optim.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in tr.optim.adamw.param_groups for p in g["params"]}
    assert isinstance(tr.optim.muon, torch.optim.Muon) and isinstance(tr.optim.adamw, torch.optim.AdamW)
    assert not muon & adamw
    latents, scales, frozen = set(), set(), set()
    for layer in rabit_layers(student).values():
        for p in layer.latent_parameters():
            (latents if p.requires_grad else frozen).add(id(p))
        for p in layer.scale_parameters():
            (scales if p.requires_grad else frozen).add(id(p))
    assert muon == latents
    assert scales <= adamw
    if mode == "frozen":
        assert len(frozen) == 3 * len(rabit_layers(student))  # latent + 2 scales of path 0 per layer
    else:
        assert not frozen
    # everything else in AdamW is a 1-D norm weight; embeddings and lm_head train nowhere
    for name, p in student.named_parameters():
        if id(p) in adamw and id(p) not in scales:
            assert p.ndim == 1 and "norm" in name
        if "embed" in name or "lm_head" in name:
            assert not p.requires_grad and id(p) not in muon | adamw
        if id(p) in frozen:
            assert id(p) not in muon | adamw
    # every trainable parameter is in exactly one optimizer
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert trainable == muon | adamw


def test_muon_uses_adamw_matched_lr():
    teacher, student = tiny_student()
    split = prepare_student(student)
    from rabit.train.optim import Optimizers

    opt = Optimizers(split, OptimConfig(latent_lr=1e-4, scale_lr=1e-3, warmup_steps=0), total_steps=10)
    assert opt.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert opt.lrs() == {"muon": pytest.approx(1e-4), "adamw": pytest.approx(1e-3)}


# ------------------------------------------------------------------------------------------- training
def test_training_reduces_loss_and_never_touches_the_teacher(tmp_path):
    teacher = make_tiny_llama()
    # 1 bit with the naive init leaves something to learn on a random tiny model
    student = make_student(teacher, RaBiTConfig(num_paths=1, init="naive", precondition=False))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {k: p.requires_grad for k, p in teacher.named_parameters()}
    data = rows(16, 24)
    cfg = TrainConfig(steps=12, grad_accum=2, gamma=10.0, autocast=False, save_every=5,
                      optim=OptimConfig(latent_lr=3e-3, scale_lr=3e-3))
    tr = Trainer(teacher, student, data, cfg, tmp_path, progress=False)
    first = tr.evaluate(data[:4])
    result = tr.train()
    last = tr.evaluate(data[:4])
    assert result.steps == 12 and result.tokens == 12 * 2 * 24
    assert last["loss"] < 0.8 * first["loss"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in teacher.named_parameters():
        assert p.grad is None and p.requires_grad == flags[k]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert {"loss", "kl", "mse", "grad_norm", "lr_latent", "lr_scale", "tokens_per_s"} <= set(log[0])
    assert latest_checkpoint(tmp_path).name == "step-000012"


def test_gradient_checkpointing_trains_exactly_like_the_run_without_it(tmp_path):
    """bf16 autocast, 3 steps with and without recomputing activations: the same losses and the same trained
    weights (checkpointing only changes when activations are computed, not what)."""
    teacher, student = tiny_student()
    runs = {}
    for ckpt in (False, True):
        s = copy.deepcopy(student)
        cfg = TrainConfig(steps=3, autocast=True, gradient_checkpointing=ckpt, save_every=10)
        res = Trainer(teacher, s, rows(), cfg, tmp_path / str(ckpt), progress=False).train()
        enabled = getattr(s, "is_activation_checkpointing", None)        # transformers >= 5
        enabled = s.is_gradient_checkpointing if enabled is None else enabled
        assert res.steps == 3 and enabled == ckpt
        log = (tmp_path / str(ckpt) / "log.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in log]
        assert len(losses) == 3
        runs[ckpt] = (losses, {k: v.detach().clone() for k, v in s.state_dict().items()})
    (loss_a, w_a), (loss_b, w_b) = runs[False], runs[True]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert any(not torch.equal(w_a[k], v) for k, v in student.state_dict().items())   # it did train
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_nan_in_the_loss_stops_with_the_step_after_saving_the_last_good_state(tmp_path):
    teacher, student = tiny_student()

    def poison(trainer, step):
        if step == 4:
            layer = next(iter(rabit_layers(trainer.student).values()))
            with torch.no_grad():
                layer.scale_out[0][0] = float("nan")

    cfg = TrainConfig(steps=10, grad_accum=1, autocast=False, save_every=100)
    tr = Trainer(teacher, student, rows(), cfg, tmp_path, progress=False, step_callback=poison)
    with pytest.raises(TrainingDiverged, match=r"step 4\b") as info:
        tr.train()
    assert "last good state" in str(info.value)
    # the poisoned state (after step 3) produced the NaN, so the state saved is the one after step 2
    assert "after step 2" in str(info.value)
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 2 and ck.state["scheduler"]["step"] == 2 and ck.state["data"]["index"] == 2
    assert all(torch.isfinite(t).all() for t in ck.model.values() if t.is_floating_point())


def test_nan_in_the_second_step_saves_the_initial_state(tmp_path):
    teacher, student = tiny_student()
    initial = {k: v.clone() for k, v in student.state_dict().items()}

    def poison(trainer, step):
        if step == 2:
            # (an infinite latent is no longer enough: the fused coupled op derives finite signs from it)
            with torch.no_grad():
                next(iter(rabit_layers(trainer.student).values())).scale_out[0][0] = float("nan")

    tr = Trainer(teacher, student, rows(), TrainConfig(steps=5, grad_accum=1, autocast=False, save_every=100), tmp_path,
                 progress=False, step_callback=poison)
    with pytest.raises(TrainingDiverged, match="at step 2"):
        tr.train()
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 0 and not ck.state["optimizers"]["muon"]["state"]
    for k, v in initial.items():
        assert torch.equal(ck.model[k], v), k
    # and that state resumes
    teacher2, student2 = tiny_student()
    tr2 = Trainer(teacher2, student2, rows(), TrainConfig(steps=5, grad_accum=1, autocast=False, save_every=100), tmp_path,
                  progress=False)
    assert tr2.resume() and tr2.step == 0
    assert tr2.train().steps == 5


def test_huge_learning_rate_is_reported_as_divergence(tmp_path):
    teacher, student = tiny_student()
    cfg = TrainConfig(steps=20, autocast=False, save_every=100, optim=OptimConfig(latent_lr=1e30, scale_lr=1e30))
    tr = Trainer(teacher, student, rows(), cfg, tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"(NaN|nan|inf) at step \d+") as info:
        tr.train()
    assert "saved the last good state" in str(info.value)
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for t in ck.model.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------ CLI refusals
class FakeClock:
    """time.perf_counter for rabit.train.loop: every call advances 0.25 s, so each step (four calls) lasts 0.75 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.25
        return self.now

    def monotonic(self):   # checkpoint writes (timed with monotonic) take no time on this clock
        return self.now


def budgeted_config(**kw):
    from rabit.train.loop import PROVISIONAL_STEPS

    optim = OptimConfig(latent_lr=3e-3, scale_lr=3e-3, warmup_steps=PROVISIONAL_STEPS, min_lr_ratio=0.1)
    return TrainConfig(steps=PROVISIONAL_STEPS, grad_accum=1, autocast=False, save_every=3, time_budget_s=9.0,
                       budget_warmup=0.25, optim=optim, **kw)


def test_time_budget_chooses_the_steps_from_the_timed_first_steps(tmp_path, monkeypatch):
    from rabit.train import loop

    monkeypatch.setattr(loop, "time", FakeClock())
    teacher, student = tiny_student()
    tr = Trainer(teacher, student, rows(16, 12), budgeted_config(), tmp_path, progress=False)
    assert tr.budget_pending()
    result = tr.train()
    # 3 timed steps (2.25 s of the 9 s budget), then (9 - 2.25) / 0.75 = 9 more
    assert result.steps == 12 and tr.cfg.steps == 12 and not tr.budget_pending()
    assert tr.cfg.optim.warmup_steps == 3  # 25 % of the 12 chosen steps
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[0]["lr_latent"] < 1e-7  # the first timed step barely moves the weights
    # the next two follow a schedule sized at the first step's pace: 1 + (9 - 0.75) / 0.75 = 12 steps, warm-up 3
    assert [r["lr_latent"] for r in log[1:3]] == pytest.approx([2e-3, 3e-3], rel=1e-6)
    assert log[3]["lr_latent"] == pytest.approx(3e-3, rel=1e-6)  # warm-up over from step 4 (index 3)
    assert log[-1]["lr_latent"] < 0.15 * 3e-3  # the cosine ends near min_lr_ratio at the chosen last step
    saved = load_checkpoint(latest_checkpoint(tmp_path)).state["config"]
    assert saved["steps"] == 12 and saved["time_budget_s"] == 9.0


class SpeedUpClock(FakeClock):
    """Each of the first `slow_steps` steps takes 1.5 s, the later ones 0.75 s (a machine warming up, or whose load
    drops during the run)."""

    def __init__(self, slow_steps: int):
        super().__init__()
        self.slow_calls, self.calls = 4 * slow_steps, 0   # four calls per step

    def perf_counter(self):
        self.calls += 1
        self.now += 0.5 if self.calls <= self.slow_calls else 0.25
        return self.now


def train_under(clock, tmp_path, monkeypatch, budget_s: float = 30.0):
    """(trainer, result) of a time-budgeted run of the tiny student under a fake clock."""
    from rabit.train import loop

    monkeypatch.setattr(loop, "time", clock)
    teacher, student = tiny_student()
    cfg = budgeted_config()
    cfg.time_budget_s = budget_s
    tr = Trainer(teacher, student, rows(16, 12), cfg, tmp_path, progress=False)
    return tr, tr.train()


def test_time_budget_is_estimated_again_at_the_end_of_the_warmup(tmp_path, monkeypatch):
    tr, result = train_under(SpeedUpClock(slow_steps=3), tmp_path, monkeypatch)
    # timed: 3 + (30 - 4.5) / 1.5 = 20 steps, warm-up 5; at step 5: 5 + (30 - 6) / 0.75 = 37
    assert tr.cfg.budget_refined and tr.cfg.optim.warmup_steps == 5
    assert result.steps == 37 == tr.cfg.steps
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # timed steps 2-3 at the first step's pace: 1 + (30 - 1.5) / 1.5 = 20 steps, warm-up 5 (as chosen after 3)
    assert [r["lr_latent"] for r in log[:3]] == pytest.approx([3e-9, 2 / 5 * 3e-3, 3 / 5 * 3e-3], rel=1e-6)
    assert log[4]["lr_latent"] == pytest.approx(3e-3, rel=1e-6)  # the warm-up ended as first planned
    saved = load_checkpoint(latest_checkpoint(tmp_path)).state["config"]
    assert saved["steps"] == 37 and saved["budget_refined"] is True


def test_time_budget_follows_a_machine_that_speeds_up(tmp_path, monkeypatch):
    tr, result = train_under(SpeedUpClock(slow_steps=10), tmp_path, monkeypatch)
    # timed: 3 + (30 - 4.5) / 1.5 = 20 steps (warm-up 5), unchanged at the end of the warm-up and at 25 % and
    # 50 %; at 75 % (step 15) the later half of the step times (3 slow, 5 fast) averages 1.03 s:
    # 15 + int((30 - 18.75) / 1.03) = 25; at 90 % (step 23) it is 0.75 s: 23 + (30 - 24.75) / 0.75 = 30
    assert result.steps == 30 == tr.cfg.steps and tr.cfg.budget_checks == 4
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(r["seconds"] for r in log) == pytest.approx(30.0)   # the whole budget (20 steps: 22.5 s)
    assert log[-1]["lr_latent"] < 0.15 * 3e-3   # the cosine still ends near min_lr_ratio, at the new last step
    saved = load_checkpoint(latest_checkpoint(tmp_path)).state["config"]
    assert saved["steps"] == 30 and saved["budget_checks"] == 4


class SkewedClock(FakeClock):
    """Every fourth step takes 2.25 s, the others 0.75 s: the median step (0.75 s) is well under the mean
    (1.125 s), as on a machine with periodic slow steps."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def perf_counter(self):
        self.calls += 1
        step = (self.calls - 1) // 4 + 1     # four calls per step
        self.now += 0.75 if step % 4 == 0 else 0.25
        return self.now


def test_time_budget_is_not_overrun_when_some_steps_are_slow(tmp_path, monkeypatch):
    tr, result = train_under(SkewedClock(), tmp_path, monkeypatch)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    spent = sum(r["seconds"] for r in log)
    # the timed steps and the warm-up's estimate see mostly fast steps (36 steps planned, 40.5 s at this pace);
    # the checks' means cut the run back to what the 30 s hold, leaving less than one slow step unused
    assert 30.0 - 2.25 < spent <= 30.0
    assert result.steps == tr.cfg.steps == len(log) < 36
    assert log[-1]["lr_latent"] < 0.15 * 3e-3   # the cosine still ends near min_lr_ratio, at the new last step


class SavingClock(FakeClock):
    """Steps of 0.75 s (FakeClock), and every checkpoint write takes 1.5 s."""

    writes = 0

    def monotonic(self):          # called before and after each write
        self.writes += 1
        if self.writes % 2 == 0:
            self.now += 1.5
        return self.now


def test_time_budget_counts_the_checkpoint_writes(tmp_path, monkeypatch):
    clock = SavingClock()
    tr, result = train_under(clock, tmp_path, monkeypatch)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    writes = clock.writes // 2
    assert writes == len([s for s in range(1, result.steps + 1) if s % 3 == 0 or s == result.steps])
    # the steps alone were timed at 0.75 s (40 of them would fit), a write every third step adds 0.5 s a step; the
    # checks bring the steps and the writes together within the 30 s, less than one step and write short of it
    assert sum(r["seconds"] for r in log) == pytest.approx(0.75 * result.steps)   # the log: the steps' own time
    spent = 0.75 * result.steps + 1.5 * writes
    assert 30.0 - 2.25 < spent <= 30.0 + 0.01
    assert result.steps < 30 and tr.cfg.steps == result.steps


def test_time_budget_resume_keeps_the_steps_the_first_session_chose(tmp_path, monkeypatch):
    from rabit.train import loop

    monkeypatch.setattr(loop, "time", FakeClock())
    data = rows(16, 12)
    teacher, student = tiny_student()
    whole = Trainer(teacher, copy.deepcopy(student), data, budgeted_config(), tmp_path / "whole", progress=False)
    whole.train()
    first = Trainer(teacher, copy.deepcopy(student), data, budgeted_config(), tmp_path / "cut", progress=False)
    assert first.train(stop_at=6).steps == 6  # "killed" after step 6's checkpoint
    # the next session runs at another speed: the chosen 12 steps stay (and so the schedule)
    monkeypatch.setattr(loop, "time", type("Slow", (FakeClock,), {"perf_counter": lambda self: FakeClock.perf_counter(self) * 3})())
    second = Trainer(teacher, copy.deepcopy(student), data, budgeted_config(), tmp_path / "cut", progress=False)
    assert second.resume() and second.cfg.steps == 12 and second.step == 6
    assert second.train().steps == 12
    lrs = lambda d: [json.loads(line)["lr_latent"] for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert lrs(tmp_path / "cut") == pytest.approx(lrs(tmp_path / "whole"))


@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory):
    """A tiny Llama + tiny tokenizer folder and small local corpora."""
    from rabit.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    make_tiny_llama(vocab_size=512).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpora = Path(__file__).resolve().parents[1] / "src" / "rabit" / "corpora" / "austen"
    (root / "train.txt").write_text((corpora / "emma.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    (root / "eval.txt").write_text((corpora / "persuasion.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    (root / "tiny.txt").write_text("Too short.", encoding="utf-8")
    return root


def cli_args(files, out, *extra):
    return ["quantize", "--model", str(files / "model"), "--out", str(out), "--train-data", str(files / "train.txt"),
            "--eval-data", str(files / "eval.txt"), "--eval-seq-len", "64", "--eval-windows", "2", "--seq-len", "32",
            "--tokens", "128", "--grad-accum", "1", "--save-every", "2", "--calib-samples", "2", "--calib-len", "32",
            "--val-sequences", "1", "--no-progress", "--threads", "1", *extra]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    from rabit.cli import main

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))

    def run(args):
        return main([str(a) for a in args])
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_full_run_then_refuses_to_clobber_it(cli, tiny_run_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(cli_args(tiny_run_files, out)) == 0
    for name in ("run.json", "log.jsonl", "loss.png", "summary.json", "summary.md", "model.safetensors", "evals.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 4 and summary["train"]["tokens"] == 128
    assert summary["eval"]["fp"] > 1 and summary["eval"]["init"] > 1 and summary["eval"]["final"] > 1
    assert "first 2 windows of 64 tokens" in capsys.readouterr().out
    # the FP perplexity is cached under RABIT_CACHE/ppl
    assert list((tmp_path / "cache" / "ppl").glob("*.json"))
    before = snapshot(out)
    # a different run in the same folder: refused, nothing touched
    assert cli(cli_args(tiny_run_files, out, "--gamma", "5", "--isvid-rounds", "2")) == 2
    err = capsys.readouterr().err
    # the error names each differing setting and the flags that would continue the stored run
    assert "different run" in err and "train.gamma: 0.0 -> 5.0" in err and "rabit_config.isvid_rounds: 8 -> 2" in err
    assert "--resume --isvid-rounds 8 --gamma 0.0" in err
    # the same run again without --resume: refused too
    assert cli(cli_args(tiny_run_files, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # a folder with someone else's files
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(cli_args(tiny_run_files, other)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before and (other / "notes.txt").read_text() == "mine"
    # resuming a finished run only finishes the report (no training step is redone); a run.json written
    # before a setting existed (here hidden_loss) resumes as that setting's default
    info = json.loads((out / "run.json").read_text())
    del info["train"]["hidden_loss"]
    (out / "run.json").write_text(json.dumps(info))
    assert cli(cli_args(tiny_run_files, out, "--resume", "--skip-init-eval")) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # --overwrite starts over, replacing only the run's files
    (out / "keep.txt").write_text("keep")
    assert cli(cli_args(tiny_run_files, out, "--gamma", "5", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["train"]["gamma"] == 5.0
    assert (out / "keep.txt").read_text() == "keep"
    # the second run took its initialized paths from the init cache the first one wrote: same starting model
    assert len(list((tmp_path / "cache" / "init").glob("*.safetensors"))) == 1
    evals = json.loads((out / "evals.json").read_text())
    assert evals["init_cached"] is True and evals["init"] == summary["eval"]["init"]
    # ... and an independent run with the same init settings shares them too, starting exactly where an
    # independent run without the cache starts (not from the coupled layers' re-derived signs, which differ
    # from the decomposition at a weight on this model)
    indep = tmp_path / "indep"
    assert cli(cli_args(tiny_run_files, indep, "--mode", "independent")) == 0
    evals = json.loads((indep / "evals.json").read_text())
    solo = tmp_path / "indep-solo"
    assert cli(cli_args(tiny_run_files, solo, "--mode", "independent", "--no-init-cache")) == 0
    solo_evals = json.loads((solo / "evals.json").read_text())
    assert evals["init_cached"] is True and solo_evals["init_cached"] is False
    assert evals["init"] == solo_evals["init"]


def test_cli_time_budget_run(cli, tiny_run_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(tiny_run_files, out)
    del args[args.index("--tokens"):args.index("--tokens") + 2]
    assert cli(args + ["--train-minutes", "0.02"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert summary["train"]["steps"] >= 3 and run["train"]["time_budget_s"] == pytest.approx(1.2)
    said = capsys.readouterr()
    assert "0.02 minutes of steps (chosen after timing the first 3)" in said.out + said.err
    saved = load_checkpoint(latest_checkpoint(out)).state["config"]
    assert saved["steps"] == summary["train"]["steps"]


def test_job_budget_sets_aside_the_final_evaluation():
    from rabit.cli.quantize import JOB_EVAL_MARGIN, JOB_MIN_TRAIN_SECONDS, JOB_SAVE_SECONDS, job_training_seconds
    from rabit.job import JobSpec

    spec = JobSpec(job_minutes=10)
    spec.eval.windows, spec.eval.ood_windows, spec.eval.seq_len = 16, 8, 2048
    spec.data.val_sequences, spec.data.seq_len = 8, 512
    evals = {}
    # 600 s budget, 300 s used; 5 s per window x (16 final + 2 x 8 out of domain + 2 x 8 x 512 / 2048 held-out),
    # a quarter more for a slower machine after training
    assert JOB_EVAL_MARGIN == 1.25
    got = job_training_seconds(spec, evals, elapsed=300.0, window_seconds=5.0, final_windows=16)
    reserve = 1.25 * 5.0 * (16 + 16 + 4) + JOB_SAVE_SECONDS
    assert got == pytest.approx(600 - 300 - reserve) and evals["job_reserve_seconds"] == pytest.approx(reserve)
    # decided once: a resumed session (later, faster or slower) keeps the first session's training time
    assert job_training_seconds(spec, evals, elapsed=10.0, window_seconds=1.0, final_windows=16) == got
    # a budget already spent still trains its minimum (a tenth of the budget, at most a minute); nothing timed: a
    # tenth of the budget is kept back for the evaluation
    assert job_training_seconds(spec, {}, elapsed=590.0, window_seconds=5.0, final_windows=16) == JOB_MIN_TRAIN_SECONDS
    spec.job_minutes = 1
    assert job_training_seconds(spec, {}, elapsed=59.0, window_seconds=5.0, final_windows=16) == pytest.approx(6.0)
    spec.job_minutes = 10
    assert job_training_seconds(spec, {}, elapsed=100.0, window_seconds=None, final_windows=16) == pytest.approx(440)
    # the full-precision out-of-domain figure already cached: its windows are not set aside a second time
    cached = job_training_seconds(spec, {}, elapsed=300.0, window_seconds=5.0, final_windows=16, ood_fp_windows=0)
    assert cached == pytest.approx(got + 1.25 * 5.0 * 8)


def test_job_block_budget_leaves_the_evaluations_and_a_share_of_training():
    from types import SimpleNamespace

    from rabit.cli.quantize import JOB_BLOCK_TRAIN_SHARE, JOB_SAVE_SECONDS, job_block_seconds
    from rabit.job import JobSpec

    spec = JobSpec(job_minutes=10)
    spec.eval.windows, spec.eval.ood_windows, spec.eval.seq_len = 16, 8, 2048
    spec.data.val_sequences, spec.data.seq_len = 8, 512
    scorer = SimpleNamespace(window_seconds=5.0, stage_windows=4, final_windows=lambda: 16)
    # 600 s: 100 used, 5 s per window x (4 block-stage windows + 16 final + 2 x 8 out of domain + 4 held-out; those
    # after training with a quarter's margin), saving, and 30 % kept for training
    reserve = 1.25 * 5.0 * (16 + 16 + 4) + JOB_SAVE_SECONDS
    assert JOB_BLOCK_TRAIN_SHARE == 0.3
    assert job_block_seconds(spec, 100.0, scorer) == pytest.approx(600 - 100 - 5.0 * 4 - reserve - 180)
    # stages scored on all windows, the block-stage score skipped, or the budget spent
    every = SimpleNamespace(window_seconds=5.0, stage_windows=None, final_windows=lambda: 16)
    assert job_block_seconds(spec, 100.0, every) == pytest.approx(600 - 100 - 5.0 * 16 - reserve - 180)
    spec.eval.skip_init = True
    assert job_block_seconds(spec, 100.0, scorer) == pytest.approx(600 - 100 - reserve - 180)
    assert job_block_seconds(spec, 500.0, scorer) == 0.0


def test_job_budget_knows_whether_the_fp_out_of_domain_figure_is_cached(tmp_path, monkeypatch):
    from rabit.cli.quantize import _out_of_domain, ood_fp_windows_to_run
    from rabit.job import JobSpec
    from rabit.testing import tiny_tokenizer

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    teacher, tok = make_tiny_llama(vocab_size=512).eval(), tiny_tokenizer()
    spec = JobSpec()
    spec.eval.seq_len, spec.eval.ood_windows = 64, 3
    assert ood_fp_windows_to_run(spec, teacher, tok) == 3
    evals = {}
    _out_of_domain(spec, teacher, copy.deepcopy(teacher), tok, evals, progress=False)
    assert evals["ood"]["fp"] == pytest.approx(evals["ood"]["final"]) and "not trained on" in evals["ood"]["description"]
    assert ood_fp_windows_to_run(spec, teacher, tok) == 0           # the end of the job will read it from the cache
    teacher.model.norm.weight.data.mul_(1.5)                          # another model: not cached
    assert ood_fp_windows_to_run(spec, teacher, tok) == 3
    spec.eval.ood_windows = 0
    assert ood_fp_windows_to_run(spec, teacher, tok) == 0


def test_bf16_evaluation_is_cached_apart_from_fp32_and_stays_close_to_it(tmp_path, monkeypatch):
    from rabit.cli.quantize import _out_of_domain, ood_fp_windows_to_run, record_eval_autocast
    from rabit.job import JobSpec
    from rabit.testing import tiny_tokenizer

    monkeypatch.setenv("RABIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    teacher, tok = make_tiny_llama(vocab_size=512).eval(), tiny_tokenizer()
    student = copy.deepcopy(teacher)
    student.model.norm.weight.data.mul_(1.3)
    spec = JobSpec()
    spec.eval.seq_len, spec.eval.ood_windows = 64, 3
    fp32, bf16 = {}, {}
    _out_of_domain(spec, teacher, student, tok, fp32, progress=False)
    # the fp32 figure in the cache does not stand in for the bf16 one
    assert ood_fp_windows_to_run(spec, teacher, tok) == 0 and ood_fp_windows_to_run(spec, teacher, tok, None, True) == 3
    _out_of_domain(spec, teacher, student, tok, bf16, progress=False, autocast=True)
    assert ood_fp_windows_to_run(spec, teacher, tok, None, True) == 0
    for key in ("fp", "final"):   # bf16 rounding moves the figure, a little
        assert bf16["ood"][key] != fp32["ood"][key]
        assert bf16["ood"][key] == pytest.approx(fp32["ood"][key], rel=0.02)
    assert bf16["ood"]["final"] != pytest.approx(bf16["ood"]["fp"], rel=1e-3)
    # auto follows training's autocast; a resumed run keeps its first session's choice (before the choice: fp32)
    assert [spec.eval.autocast(t) for t in (False, True)] == [False, True]
    spec.eval.dtype = "float32"
    assert spec.eval.autocast(True) is False
    spec.eval.dtype = "bfloat16"
    assert spec.eval.autocast(False) is True
    spec.eval.dtype = "fp8"
    with pytest.raises(ValueError, match="--eval-dtype"):
        spec.validate()
    assert record_eval_autocast({}, True) is True and record_eval_autocast({"eval_autocast": False}, True) is False
    assert record_eval_autocast({"fp": 21.0}, True) is False


def test_cli_eval_dtype_reaches_every_perplexity_and_the_summary(cli, tiny_run_files, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli(cli_args(tiny_run_files, out, "--eval-dtype", dtype, "--tokens", "32")) == 0
        runs[dtype] = (json.loads((out / "summary.json").read_text())["eval"],
                       json.loads((out / "evals.json").read_text()))
    (e32, v32), (e16, v16) = runs["float32"], runs["bfloat16"]
    assert v32["eval_autocast"] is False and v16["eval_autocast"] is True
    assert "bf16 autocast" in e16["description"] and "autocast" not in e32["description"]
    for key in ("fp", "final"):
        assert e16[key] != e32[key] and e16[key] == pytest.approx(e32[key], rel=0.05)


def test_cli_job_budget_run(cli, tiny_run_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(tiny_run_files, out)
    del args[args.index("--tokens"):args.index("--tokens") + 2]
    assert cli(args + ["--job-minutes", "0.05"]) == 0   # 3 s, about what the tiny job spends before training
    said = capsys.readouterr()
    assert "what the job's 0.05 minutes leave after the block stage" in said.err
    assert "training gets" in said.err
    evals = json.loads((out / "evals.json").read_text())
    run = json.loads((out / "run.json").read_text())
    saved = load_checkpoint(latest_checkpoint(out)).state["config"]
    assert 0.3 <= evals["job_train_seconds"] < 3.0   # at least a tenth of the budget
    assert saved["time_budget_s"] == pytest.approx(evals["job_train_seconds"])
    assert run["job_minutes"] == 0.05 and run["train"]["time_budget_s"] == pytest.approx(3.0)
    assert run["tokens"] is None   # no token budget: the steps are chosen as it runs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == saved["steps"] >= 3
    # what followed training, part by part, next to what the budget kept for it (in the log too)
    end, stages = summary["stages"]["end_seconds"], summary["stages"]
    assert set(end) == {"held_out", "final", "ood", "save"} and all(v >= 0 for v in end.values())
    assert 0 < sum(end.values()) < summary["wall_seconds"]
    assert end["final"] > 0 and end["save"] > 0
    assert stages["job_reserve_seconds"] == pytest.approx(evals["job_reserve_seconds"])
    assert f"job budget: {sum(end.values()):.0f} s after training ({evals['job_reserve_seconds']:.0f} s kept" \
        in said.err
    # a resumed run keeps the training time its first session decided (not a new one from its own clock), so its
    # checkpoint's settings match and it trains nothing again
    from safetensors.torch import load_file

    before = load_file(out / "model.safetensors")
    assert cli(args + ["--job-minutes", "0.05", "--resume"]) == 0
    assert json.loads((out / "evals.json").read_text())["job_train_seconds"] == evals["job_train_seconds"]
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "summary.json").read_text())["train"]["steps"] == summary["train"]["steps"]


@pytest.mark.parametrize("case", ["eval-data", "too-small", "budget", "bad-model", "no-tokenizer", "bad-lr",
                                  "two-budgets", "no-minutes", "job-and-tokens", "job-and-train-minutes",
                                  "no-job-minutes"])
def test_cli_bad_input_is_refused_and_writes_nothing(case, cli, tiny_run_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(tiny_run_files, out)
    if case == "eval-data":
        args[args.index("--train-data") + 1] = "wikitext2-test"
        expect = "evaluation data"
    elif case == "too-small":
        args[args.index("--train-data") + 1] = str(tiny_run_files / "tiny.txt")
        expect = "fewer than"
    elif case == "budget":
        args[args.index("--tokens") + 1] = "31"
        expect = "smaller than one optimizer step"
    elif case == "bad-model":
        args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
        expect = "does not exist"
    elif case == "no-tokenizer":
        bare = tmp_path / "bare"
        make_tiny_llama(vocab_size=512).save_pretrained(bare)
        args[args.index("--model") + 1] = str(bare)
        expect = "tokenizer"
    elif case == "two-budgets":
        args += ["--train-minutes", "1"]
        expect = "--tokens or --train-minutes"
    elif case == "no-minutes":
        del args[args.index("--tokens"):args.index("--tokens") + 2]
        args += ["--train-minutes", "0"]
        expect = "--train-minutes must be > 0"
    elif case == "job-and-tokens":
        args += ["--job-minutes", "5"]
        expect = "--tokens or --job-minutes"
    elif case == "job-and-train-minutes":
        del args[args.index("--tokens"):args.index("--tokens") + 2]
        args += ["--job-minutes", "5", "--train-minutes", "2"]
        expect = "give one time budget"
    elif case == "no-job-minutes":
        del args[args.index("--tokens"):args.index("--tokens") + 2]
        args += ["--job-minutes", "-1"]
        expect = "--job-minutes must be > 0"
    else:
        args += ["--latent-lr", "-1"]
        expect = "latent_lr"
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or err.count("error:") == 1
    assert not out.exists()


def test_train_latents_false_keeps_latents_bit_identical_and_trains_scales(tmp_path):
    teacher, student = tiny_student()
    layers = list(rabit_layers(student).values())
    latents0 = [p.detach().clone() for layer in layers for p in layer.latent_parameters()]
    scales0 = [p.detach().clone() for layer in layers for p in layer.scale_parameters()]
    cfg = TrainConfig(steps=2, grad_accum=1, autocast=False, train_latents=False)
    tr = Trainer(teacher, student, rows(), cfg, tmp_path, progress=False)
    assert tr.optim.muon is None and not tr.split.latents
    tr.train()
    latents = [p.detach() for layer in layers for p in layer.latent_parameters()]
    scales = [p.detach() for layer in layers for p in layer.scale_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(latents0, latents))
    assert any(not torch.equal(a, b) for a, b in zip(scales0, scales))
    # part of the run identity: a checkpoint written with frozen latents does not resume a run that trains them
    from rabit.run_identity import train_settings_changes

    assert [k for k, _, _ in train_settings_changes(cfg.to_dict(), TrainConfig(steps=2, grad_accum=1,
                                                                               autocast=False).to_dict())] \
        == ["train.train_latents"]
