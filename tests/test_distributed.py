"""Multi-process distillation (torch.distributed, gloo on CPU, FSDP2 + DCP) on a tiny random Llama.

One launch of 2 processes (module fixture) runs: a bit-exactness check of DistributedMuon on unevenly sharded
matrices, an uninterrupted 4-step run, the same run stopped after step 2, and a run where rank 1 fails. The tests
then compare the 2-process losses with the ordinary 1-process Trainer at the same global batch, resume the stopped
run in 1 process, and check that the failure stopped both ranks with the error.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rabit.config import RaBiTConfig
from rabit.train import distributed as D
from rabit.train.optim import OptimConfig
from rabit.train.trainer import StepLog, Trainer, TrainConfig, make_student

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RCFG = dict(init="naive", precondition=False)  # coupled, k=2; a cheap init (the values come from a file anyway)
# Later steps: the step-1 gradients agree to fp32 summation order (~1e-7), but the updates amplify that (an
# update can move residuals of the coupled derivation across zero, flipping signs of path 2): ~1e-4 by step 4
# (measured: 3e-5 with PyTorch's scale-gradient formula, 2e-4 with the native kernel; 2e-4 also between the
# kernel and the formula in one process). A different batch moves a step's loss by percents. The Newton-Schulz
# iterations run in fp32 here (_config): in bf16, where a CPU has it natively (the default), the two runs' slightly
# different gradients round to different bf16 values and the losses of steps 3-4 parted by 0.8 % on a Zen 5 machine
# (2e-5 in fp32; docs/RESULTS.md section 46).
REL = 1e-3


def _config() -> TrainConfig:
    # global micro-batch 4 (2 rows per rank at 2 processes), 2 micro-batches per step, checkpoints every 2 steps
    return TrainConfig(steps=4, batch_size=4, grad_accum=2, gamma=10.0, autocast=False, save_every=2,
                       keep_checkpoints=2, keep_last_good=False, seed=0,
                       optim=OptimConfig(muon_ns_dtype="float32"))


def _models(root: Path):
    teacher = make_tiny_llama()
    student = make_student(teacher, RaBiTConfig(**RCFG), initialize=False)
    student.load_state_dict(torch.load(root / "student.pt"))
    return teacher, student


def _muon_check(env) -> bool:
    """DistributedMuon on Shard(0) DTensors (uneven rows; one matrix with no row on rank 1) == the one-process Muon
    (rabit.train.optim.Muon: torch.optim.Muon with the Newton-Schulz dtype chosen per device)."""
    from torch import nn

    from rabit.train.optim import Muon as rabit_muon
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5, 9), (1, 3), (6, 4)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    ref = [nn.Parameter(w.clone()) for w in weights]
    sharded = [nn.Parameter(distribute_tensor(w.clone(), env.mesh, [Shard(0)])) for w in weights]
    ref_opt = rabit_muon(ref, **kw)  # the one-process Muon, same Newton-Schulz dtype
    opt = D.DistributedMuon(sharded, bucket_numel=40, **kw)  # small buckets: several rounds of gathers
    for step_grads in grads:
        for p, q, gr in zip(ref, sharded, step_grads):
            p.grad = gr.clone()
            q.grad = distribute_tensor(gr.clone(), env.mesh, [Shard(0)])
        ref_opt.step()
        opt.step()
    return all(torch.equal(p.detach(), q.detach().full_tensor()) for p, q in zip(ref, sharded))


def _worker(root: str) -> None:
    """Body of each of the 2 spawned processes."""
    root = Path(root)
    env = D.init_distributed("cpu")
    ok = _muon_check(env)
    (root / f"muon-{env.rank}.json").write_text(json.dumps({"equal": ok}))
    train = torch.load(root / "train.pt")

    teacher, student = _models(root)
    D.DistributedTrainer(teacher, student, train, _config(), root / "two", env, progress=False).train()

    teacher, student = _models(root)
    D.DistributedTrainer(teacher, student, train, _config(), root / "stopped", env, progress=False).train(stop_at=2)

    def fail_on_rank1(trainer, step):
        if step == 2 and trainer.env.rank == 1:
            raise RuntimeError("injected failure on rank 1")

    # a run that one process started and stopped after step 2 (local checkpoints), continued by two processes
    teacher, student = _models(root)
    trainer = D.DistributedTrainer(teacher, student, train, _config(), root / "one-then-two", env, progress=False)
    (root / f"one-then-two-resumed-{env.rank}.json").write_text(json.dumps({"resumed": trainer.resume(),
                                                                           "step": trainer.step}))
    trainer.train()

    (root / "fail-start").write_text(str(time.time()))
    teacher, student = _models(root)
    D.DistributedTrainer(teacher, student, train, _config(), root / "fail", env, progress=False,
                         step_callback=fail_on_rank1).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher = make_tiny_llama()
    student = make_student(teacher, RaBiTConfig(**RCFG))
    torch.save(student.state_dict(), root / "student.pt")
    train = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(0))
    torch.save(train, root / "train.pt")
    # the 1-process reference: the ordinary single-process Trainer with the same global batch
    Trainer(teacher, student, train, _config(), root / "ref", progress=False).train()
    teacher, student = _models(root)
    Trainer(teacher, student, train, _config(), root / "one-then-two", progress=False).train(stop_at=2)
    error = None
    try:
        D.spawn(_worker, 2, str(root), threads=1, timeout=600)
    except Exception as e:  # noqa: BLE001 - the injected failure, checked below
        error = e
    return {"root": root, "error": error, "ended": time.time()}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in StepLog.read(run_dir / "log.jsonl")]


def test_distributed_muon_equals_torch_muon_bit_for_bit(runs):
    for rank in (0, 1):
        assert json.loads((runs["root"] / f"muon-{rank}.json").read_text())["equal"]


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    root = runs["root"]
    ref, two = _losses(root / "ref"), _losses(root / "two")
    assert len(ref) == len(two) == 4
    assert two[0] == pytest.approx(ref[0], rel=1e-6)   # the same parameters: only the reductions differ
    assert two == pytest.approx(ref, rel=REL)
    rows = StepLog.read(root / "two" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["world_size"] for r in rows} == {2}
    assert rows[-1]["tokens"] == 4 * 4 * 2 * 16  # steps x global batch x micro-batches x seq_len
    assert (root / "two" / "dcp" / "step-000004" / ".metadata").is_file()


def test_stopped_two_process_run_resumes_with_one_process(runs, monkeypatch):
    root = runs["root"]
    run = root / "stopped"
    assert [r["step"] for r in StepLog.read(run / "log.jsonl")] == [1, 2]
    state = json.loads((run / "dcp" / "step-000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    # a 1-process group in this process
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    env = D.init_distributed("cpu")
    try:
        assert env.world_size == 1
        teacher, student = _models(root)  # initial weights: the checkpoint must replace them
        # the frozen embedding comes from the checkpoint's fixed folder, not from the student it resumes into
        student.get_input_embeddings().weight.data.mul_(-1.0)
        trainer = D.DistributedTrainer(teacher, student, torch.load(root / "train.pt"), _config(), run, env,
                                       progress=False)
        assert trainer.resume() and trainer.step == 2 and trainer.sampler.state_dict()["index"] == 16
        trainer.train()
    finally:
        D.destroy_distributed()
    resumed, two, ref = _losses(run), _losses(root / "two"), _losses(root / "ref")
    assert len(resumed) == 4
    assert resumed[:2] == two[:2]  # the first session's rows are kept as written
    assert resumed[2:] == pytest.approx(two[2:], rel=REL)  # the same continuation as the uninterrupted run
    assert resumed[2:] == pytest.approx(ref[2:], rel=REL)
    assert StepLog.read(run / "log.jsonl")[-1]["world_size"] == 1


def _checkpoint_keys(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def test_checkpoints_write_the_parameters_that_do_not_train_once(runs):
    dcp = runs["root"] / "two" / "dcp"
    steps = [json.loads((dcp / s / "state.json").read_text()) for s in ("step-000002", "step-000004")]
    assert [(st["version"], st["fixed"]) for st in steps] == [(2, "fixed-000002")] * 2
    assert sorted(p.name for p in dcp.iterdir() if p.is_dir()) == ["fixed-000002", "step-000002", "step-000004"]
    fixed = json.loads((dcp / "fixed-000002" / "state.json").read_text())
    assert fixed["format"] == D.DCP_FIXED_FORMAT
    embed = "model.embed_tokens.weight"   # frozen (latents train here); DCP prefixes the "model" entry
    assert embed in fixed["keys"] and all("latent" not in k for k in fixed["keys"])
    assert "model." + embed in _checkpoint_keys(dcp / "fixed-000002")
    in_step = _checkpoint_keys(dcp / "step-000004")
    assert "model." + embed not in in_step and any(k.startswith("model.") and "latent" in k for k in in_step)
    # `rabit verify` checks the fixed folder with the checkpoints, and finds a damaged file in it
    from rabit.integrity_checkpoints import verify_path

    reports = verify_path(runs["root"] / "two")
    assert {Path(r.path).name for r in reports} >= {"fixed-000002", "step-000002", "step-000004"}
    assert all(not r.problems for r in reports)


@pytest.mark.parametrize("tied", [False, True])
def test_the_frozen_parameters_of_a_tied_model_are_named_once_and_left_out_under_each_name(tied):
    from rabit.train.optim import prepare_student

    student = make_student(make_tiny_llama(tied=tied), RaBiTConfig(**RCFG), initialize=False)
    prepare_student(student, train_latents=False)
    every, once = D.frozen_parameter_names(student)
    heads = {"model.embed_tokens.weight", "lm_head.weight"}
    assert heads <= every and (len(heads & once) == 1 if tied else heads <= once)
    latents = {n for n in every if n.endswith(".latent")}
    assert len(latents) == 7 * 2 and latents <= once      # 7 layers a block, 2 blocks
    assert not any(n.endswith((".scale_in.0", ".scale_out.1")) for n in every)


def _one_process_group(monkeypatch):
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    return D.init_distributed("cpu")


def test_a_version_1_checkpoint_with_every_parameter_still_resumes(runs, tmp_path, monkeypatch):
    root, run = runs["root"], tmp_path / "v1"
    train = torch.load(root / "train.pt")
    env = _one_process_group(monkeypatch)
    try:
        with monkeypatch.context() as m:   # the writer as it was before the fixed folders
            m.setattr(D, "DCP_VERSION", 1)
            m.setattr(D.DistributedTrainer, "_save_fixed", lambda self: None)
            whole = D.DistributedTrainer._state_dicts
            m.setattr(D.DistributedTrainer, "_state_dicts", lambda self, model="all": whole(self, "all"))
            D.DistributedTrainer(*_models(root), train, _config(), run, env, progress=False).train(stop_at=2)
        state = json.loads((run / "dcp" / "step-000002" / "state.json").read_text())
        assert state["version"] == 1 and state["fixed"] is None
        assert "model.model.embed_tokens.weight" in _checkpoint_keys(run / "dcp" / "step-000002")
        teacher, student = _models(root)
        student.get_input_embeddings().weight.data.mul_(-1.0)
        trainer = D.DistributedTrainer(teacher, student, train, _config(), run, env, progress=False)
        assert trainer.resume() and trainer.step == 2
        trainer.train()
        # the continuation writes version 2, its fixed folder beside the version-1 checkpoint
        assert json.loads((run / "dcp" / "step-000004" / "state.json").read_text())["fixed"] == "fixed-000004"
    finally:
        D.destroy_distributed()
    assert _losses(run) == pytest.approx(_losses(root / "ref"), rel=REL)


def test_a_missing_fixed_folder_is_reported(runs, tmp_path, monkeypatch):
    import shutil

    from rabit.train.checkpoint import CheckpointError

    run = tmp_path / "copy"
    shutil.copytree(runs["root"] / "stopped", run)
    shutil.rmtree(run / "dcp" / "fixed-000002")
    env = _one_process_group(monkeypatch)
    try:
        trainer = D.DistributedTrainer(*_models(runs["root"]), torch.load(runs["root"] / "train.pt"), _config(),
                                       run, env, progress=False)
        with pytest.raises(CheckpointError, match="fixed-000002.*the parameters that do not train.*missing"):
            trainer.resume()
    finally:
        D.destroy_distributed()
    # `rabit verify` on the checkpoint alone says so too
    from rabit.integrity_checkpoints import verify_path

    problems = [str(p) for r in verify_path(run / "dcp" / "step-000002") for p in r.problems]
    assert len(problems) == 1 and "fixed-000002" in problems[0] and "missing (named by step-000002)" in problems[0]


def test_one_process_run_resumes_with_two_processes(runs):
    root = runs["root"]
    for rank in (0, 1):
        assert json.loads((root / f"one-then-two-resumed-{rank}.json").read_text()) == {"resumed": True, "step": 2}
    rows, ref = StepLog.read(root / "one-then-two" / "log.jsonl"), _losses(root / "ref")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["world_size"] == rows[3]["world_size"] == 2  # steps 3-4 ran in the process group
    assert [r["loss"] for r in rows] == pytest.approx(ref, rel=REL)
    assert (root / "one-then-two" / "checkpoints" / "step-000002").is_dir()
    assert (root / "one-then-two" / "dcp" / "step-000004" / ".metadata").is_file()


def test_a_failure_on_one_rank_stops_every_rank_with_the_error(runs):
    err = runs["error"]
    assert err is not None, "the injected failure did not stop the run"
    assert "injected failure on rank 1" in str(err)
    started = float((runs["root"] / "fail-start").read_text())
    # no rank was left waiting in a collective: that would last until spawn's 600 s timeout. The bound leaves room
    # for a loaded machine (69 s was seen under a parallel job); it is a hang check, not a speed test.
    assert runs["ended"] - started < 240
    assert multiprocessing.active_children() == []
    # rank 0 logged the one step that completed, and no checkpoint was claimed for the failed step
    assert [r["step"] for r in StepLog.read(runs["root"] / "fail" / "log.jsonl")] == [1]
    assert not (runs["root"] / "fail" / "dcp" / "latest").exists()


def failure(p) -> str:
    """A failed multi-process run's stderr: every rank's error lines first (the rank that failed first is often
    not the one whose traceback ends the output), then the tail."""
    errors = [line for line in p.stderr.splitlines() if "Error" in line or "rank" in line.lower()]
    return "\n".join(errors[:40]) + "\n...\n" + p.stderr[-3000:]


def test_cli_nproc_2_with_default_batch_end_to_end(tmp_path):
    """`rabit quantize --nproc 2` with the default batch (4 x 1): the step is split across the processes; rank-0-only
    output, a saved model; a bad combination fails in the launching process with one line."""
    from rabit.testing import tiny_tokenizer

    make_tiny_llama(vocab_size=512).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    corpora = Path(__file__).resolve().parents[1] / "src" / "rabit" / "corpora" / "austen"
    (tmp_path / "train.txt").write_text((corpora / "emma.txt").read_text(encoding="utf-8")[:20000])
    (tmp_path / "eval.txt").write_text((corpora / "persuasion.txt").read_text(encoding="utf-8")[:6000])

    def cmd(out, *extra):
        args = ["--model", tmp_path / "model", "--out", out, "--train-data", tmp_path / "train.txt",
                "--eval-data", tmp_path / "eval.txt", "--eval-seq-len", "64", "--eval-windows", "1", "--seq-len",
                "32", "--tokens", "256", "--save-every", "2", "--calib-samples", "2", "--calib-len", "32",
                "--val-sequences", "2", "--no-progress", "--threads", "1", "--skip-init-eval", "--train-latents", *extra]
        return [sys.executable, "-m", "rabit", "quantize", *map(str, args)]

    env = dict(os.environ, RABIT_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(cmd(tmp_path / "run", "--nproc", "2"), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, failure(p)
    assert p.stderr.count("run folder:") == 1 and p.stderr.count("2-bit after distillation") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 256 tokens / (4 x 1 x 32) = 2 steps, each one micro-batch of 4 sequences, 2 per process
    assert summary["world_size"] == 2 and summary["train"]["steps"] == 2 and summary["eval"]["final"] > 1
    assert summary["step_split"].startswith("4 sequences per step = 1 micro-batch(es) of 4 (2 per process x 2")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["batch_size"] == 4
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "memory.json").is_file()
    # the out-of-domain score, as a one-process run gives it
    ood = summary["eval"]["ood"]
    assert "not trained on" in ood["description"] and ood["final"] > 1 < ood["fp"]
    # a whole-job budget: rank 0 decides the training time after its block stage, and every rank trains to it
    # (with the residual stream rotated: every rank and the final rebuild of the student see the same weights)
    argv = cmd(tmp_path / "job", "--nproc", "2", "--job-minutes", "0.1", "--rotate")
    del argv[argv.index("--tokens"):argv.index("--tokens") + 2]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, failure(p)
    assert p.stderr.count("training gets") == 1
    evals = json.loads((tmp_path / "job" / "evals.json").read_text())
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert evals["job_train_seconds"] >= 0.6 and summary["train"]["steps"] >= 3
    assert summary["rotation"] == {"seed": 0, "values": True}
    assert summary["eval"]["fp"] == pytest.approx(json.loads((tmp_path / "run" / "summary.json").read_text())
                                                  ["eval"]["fp"], rel=1e-4)   # the rotated teacher: same function
    assert 1 < summary["eval"]["final"] < float("inf")
    # a batch the user set that does not split: one line from the launching process, nothing started or written
    p = subprocess.run(cmd(tmp_path / "run2", "--nproc", "2", "--batch-size", "3", "--tokens", "768"), capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "must be divisible by the 2 processes" in p.stderr, p.stderr
    assert not (tmp_path / "run2").exists()


_FAILING_WORKER = """
import sys, time
import torch.distributed as dist
from rabit.cli.quantize_distributed import run_worker
from rabit.train.process_group import init_distributed

def run_quantize(spec):
    env = init_distributed("cpu")
    try:
        dist.barrier()
        if env.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        time.sleep(0.5)
        dist.barrier()  # rank 0 waits for rank 1, which is gone: its own error is a consequence and not shown
        return 0
    finally:
        dist.destroy_process_group()

import rabit.cli.quantize_distributed as q
q.run_quantize = run_quantize
sys.exit(run_worker(None))  # the spec only reaches run_quantize, replaced here
"""


def test_a_worker_error_is_shown_once_and_the_others_stop_quietly():
    from rabit.train.launch import launch_workers

    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", "import sys\nfrom rabit.train.launch import launch_workers\n"
                        f"sys.exit(launch_workers([sys.executable, '-c', {_FAILING_WORKER!r}], 2))"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.count("injected failure on rank 1") == 1, p.stderr
    assert p.stderr.count("Traceback") == 1  # an internal error keeps its traceback, shown once
    assert "Connection" not in p.stderr and "gloo" not in p.stderr.lower()
    assert time.time() - t0 < 280
    assert launch_workers  # imported in this process too: the module is importable without a process group
