"""JobSpec: one set of defaults, the command line read both ways, the process split and the run identity."""
import dataclasses

import pytest

from rabit.cli import build_parser
from rabit.cli.options import job_from_args, job_to_argv
from rabit import RaBiTConfig
from rabit.job import JobSpec
from rabit.run_identity import identity_changes
from rabit.train import OptimConfig, TrainConfig


def _parse(*argv) -> JobSpec:
    return job_from_args(build_parser().parse_args(["quantize", *argv]))


def test_the_command_line_defaults_are_the_job_spec_defaults():
    assert _parse() == JobSpec()
    # the trainer's own defaults are the command line's measured ones
    t = TrainConfig()
    assert (t.gamma, t.grad_accum, t.save_every, t.batch_size) == (0.0, 4, 10, 1)
    # ... except that the job distills with frozen latents (measured better after the block stage at CPU
    # budgets) where the library's Trainer trains them, as the method does
    assert t.train_latents and not JobSpec().train_config().train_latents
    assert _parse("--train-latents").train_config().train_latents
    # frozen latents (no Muon) take one sequence per step; latent training the trainer's 4, as one micro-batch,
    # unless set
    assert JobSpec().train.grad_accum == _parse().train.grad_accum == 1
    latent = _parse("--train-latents").train
    assert (latent.batch_size, latent.grad_accum) == (4, 1) and latent.batch_size == t.batch_size * t.grad_accum
    given = _parse("--train-latents", "--grad-accum", "2").train
    assert (given.batch_size, given.grad_accum) == (1, 2)
    assert _parse("--grad-accum", "3").train.grad_accum == 3
    # ... and 256-token sequences; latent training keeps 512, and a given --seq-len is kept either way
    assert JobSpec().data.seq_len == _parse().data.seq_len == 256
    assert _parse("--train-latents").data.seq_len == 512
    assert _parse("--seq-len", "384").data.seq_len == _parse("--train-latents", "--seq-len", "384").data.seq_len == 384
    assert _parse("--train-latents", "--seq-len", "256").data.seq_len == 256
    assert _parse().tokens_per_step == 256 and _parse("--train-latents").tokens_per_step == 4 * 512
    # ... and, rotated, a smaller scale learning rate, smaller still with frozen latents (section 44)
    assert JobSpec().train.optim.scale_lr == _parse().train.optim.scale_lr == _parse("--rotate").train.optim.scale_lr == 1.5e-4
    assert _parse("--train-latents").train.optim.scale_lr == _parse("--rotate", "--train-latents").train.optim.scale_lr == 3e-4
    assert job_to_argv(_parse("--train-latents")) == ["--train-latents"]
    assert _parse("--no-rotate").train.optim.scale_lr == _parse("--no-rotate", "--train-latents").train.optim.scale_lr == 1e-3
    # ... and latents that train from the block stage's refined start a smaller Muon rate than from a plain init
    assert _parse("--train-latents").train.optim.latent_lr == 1e-4
    assert _parse("--train-latents", "--no-blocks").train.optim.latent_lr == OptimConfig().latent_lr == 3e-3
    assert _parse().train.optim.latent_lr == JobSpec().train.optim.latent_lr == 3e-3   # frozen: as run.json had it
    for argv in (["--train-latents"], ["--train-latents", "--no-blocks"]):
        assert sorted(job_to_argv(_parse(*argv))) == sorted(argv) and _parse(*job_to_argv(_parse(*argv))) == _parse(*argv)
    given = _parse("--train-latents", "--latent-lr", "0.001")
    assert given.train.optim.latent_lr == 1e-3 and not given.auto_latent_lr
    assert job_to_argv(given) == ["--train-latents", "--latent-lr", "0.001"] and _parse(*job_to_argv(given)) == given
    assert job_to_argv(_parse("--no-rotate")) == ["--no-rotate"]
    assert _parse("--train-latents", "--scale-lr", "3e-4").train.optim.scale_lr == 3e-4
    given = _parse("--scale-lr", "3e-4")
    assert not given.auto_scale_lr and job_to_argv(given) == ["--scale-lr", "0.0003"] and _parse(*job_to_argv(given)) == given
    # ... and a bias on every quantized layer (RaBiTConfig's own default has none)
    assert JobSpec().rabit.add_bias and not _parse("--no-add-bias").rabit.add_bias and not RaBiTConfig().add_bias
    assert job_to_argv(_parse("--no-add-bias")) == ["--no-add-bias"]
    # ... and no preconditioning (no calibration pass) unless the model stays unrotated or a flag says otherwise
    assert JobSpec().rabit.precondition is _parse().rabit.precondition is _parse("--rotate").rabit.precondition is False
    assert _parse("--no-rotate").rabit.precondition is True and job_to_argv(_parse("--no-rotate")) == ["--no-rotate"]
    for argv, value in ((["--precondition"], True), (["--no-rotate", "--no-precondition"], False)):
        given = _parse(*argv)
        assert given.rabit.precondition is value and not given.auto_precondition
        assert job_to_argv(given) == argv and _parse(*job_to_argv(given)) == given
    # ... and the refinement on all the block stage's rows unless --refine-samples says fewer (rows past the
    # refinement's only cost time when blocks do not train)
    assert _parse().blocks.refine_samples == _parse().blocks.samples == 256
    more = _parse("--block-samples", "352")
    assert more.blocks.refine_samples == 352 and more.auto_refine_samples
    assert job_to_argv(more) == ["--block-samples", "352"] and _parse(*job_to_argv(more)) == more
    fewer = _parse("--block-samples", "352", "--refine-samples", "128")
    assert fewer.blocks.refine_samples == 128 and not fewer.auto_refine_samples
    assert _parse(*job_to_argv(fewer)) == fewer
    given = _parse("--refine-samples", "256")      # the default value, given: kept when the rows change
    assert not given.auto_refine_samples and "--refine-samples" in job_to_argv(given)


def test_a_job_spec_survives_the_round_trip_through_flags():
    spec = JobSpec(model="some/model", tokens=1234, warmup=3.0)
    spec.rabit.mode, spec.rabit.precondition, spec.rabit.exclude = "frozen", False, ("q_proj", "lm_head")
    spec.rabit.add_bias = False
    spec.train = dataclasses.replace(spec.train, gamma=5.0, batch_size=2, grad_accum=2, autocast=False,
                                     optim=dataclasses.replace(spec.train.optim, latent_lr=1e-2))
    spec.auto_split = False
    spec.data.calib, spec.eval.bos, spec.run.resume, spec.dist.teacher = "austen", True, True, "bf16"
    spec.train.train_latents, spec.eval.stage_windows = True, 0
    spec.rotate, spec.rotate_values = True, False
    spec.resolve_batch()   # what the command line does after reading --train-latents: 512-token rows
    spec.blocks.autocast = False
    assert spec.data.seq_len == 512 and "--seq-len" not in job_to_argv(spec)
    assert _parse(*job_to_argv(spec)) == spec
    spec.blocks.autocast = True
    assert "--block-bf16" in job_to_argv(spec) and _parse(*job_to_argv(spec)) == spec
    for value, flag in ((False, "--no-block-bf16-sums"), (True, "--block-bf16-sums")):
        spec.blocks.sums_bf16 = value
        assert flag in job_to_argv(spec) and _parse(*job_to_argv(spec)) == spec
    assert _parse("--no-block-bf16-sums").blocks.sums_bf16 is False and _parse().blocks.sums_bf16 is None
    # a sequence length given on the command line stays given, even when it equals its mode's default
    given = _parse("--seq-len", "256")
    assert not given.auto_seq_len and job_to_argv(given) == ["--seq-len", "256"] and _parse(*job_to_argv(given)) == given
    assert job_to_argv(_parse()) == []


def test_default_batch_is_split_across_processes_and_an_explicit_one_is_checked():
    # the frozen-latent default (one sequence per step): one sequence per process per step
    frozen = JobSpec()
    assert frozen.for_processes(1) is frozen
    two = frozen.for_processes(2)
    assert (two.train.batch_size, two.train.grad_accum) == (2, 1) and two.tokens_per_step == 2 * frozen.tokens_per_step
    assert frozen.for_processes(4).train.batch_size == 4
    # the latent-training default (4 sequences per step, one micro-batch): 2 or 4 processes split it as it is
    spec = _parse("--train-latents")
    two = spec.for_processes(2)
    assert two is spec and two.split_description(2).startswith("4 sequences per step = 1 micro-batch(es) of 4 (2 per")
    assert spec.for_processes(4) is spec
    with pytest.raises(ValueError, match="cannot be split evenly across 3 processes"):
        spec.for_processes(3)
    # a step of 4 taken as 4 micro-batches of 1 (as given) is regrouped for 2 processes: the same step
    spec = _parse("--train-latents")
    spec.train.batch_size, spec.train.grad_accum = 1, 4
    two = spec.for_processes(2)
    assert (two.train.batch_size, two.train.grad_accum) == (2, 2) and two.tokens_per_step == spec.tokens_per_step
    assert two.train_config().optim.warmup_steps == spec.train_config().optim.warmup_steps
    assert two.split_description(2).startswith("4 sequences per step = 2 micro-batch(es) of 2 (1 per process")
    with pytest.raises(ValueError, match="--batch-size 3 is the global micro-batch and must be divisible by the 2"):
        _parse("--batch-size", "3").for_processes(2)


def test_run_identity_ignores_grouping_and_fills_settings_added_later():
    spec = JobSpec(rotate=False)   # what loading an architecture without rotation support resolves
    record = spec.run_record("/m", 100, autocast=False)
    latents = _parse("--train-latents", "--no-rotate").run_record("/m", 100, autocast=False)
    old = {**latents, "train": {k: v for k, v in latents["train"].items() if k not in ("hidden_loss", "train_latents")},
           "distributed": {"checkpoints": "dcp"}}
    # runs from before train_latents existed trained their latents: --train-latents is the same run, today's
    # default (frozen latents, one sequence per step) another one
    assert identity_changes(old, latents) == []
    assert ("train.train_latents", True, False) in identity_changes(old, record)
    latents = _parse("--train-latents", "--rotate")
    regrouped = latents.for_processes(2).run_record("/m", 100, autocast=False)
    assert identity_changes(latents.run_record("/m", 100, autocast=False), regrouped) == []
    # the frozen default's one-sequence step becomes one per process: another run, refused on resume
    assert "train.sequences_per_step" in [k for k, *_ in identity_changes(
        record, spec.for_processes(2).run_record("/m", 100, autocast=False))]
    spec.train.gamma = 5.0
    assert [k for k, *_ in identity_changes(record, spec.run_record("/m", 100, autocast=False))] == ["train.gamma"]
    # runs from before the rotation existed were not rotated: a rotated run is another one, and so are the values
    rotated = JobSpec(rotate=True)
    assert identity_changes({k: v for k, v in record.items() if k != "rotation"}, record) == []
    assert identity_changes(record, rotated.run_record("/m", 100, autocast=False)) == [
        ("rotation", "none", "residual+values")]
    rotated.rotate_values = False
    assert rotated.run_record("/m", 100, autocast=False)["rotation"] == "residual"
    with pytest.raises(RuntimeError, match="resolved when the model is loaded"):
        JobSpec().run_record("/m", 100, autocast=False)


def test_rotation_is_on_where_supported_and_a_resume_hint_names_its_flag(tmp_path):
    from rabit.cli.quantize import load_teacher
    from rabit.run_folder import different_run_error

    assert _parse().rotate is None and _parse("--rotate").rotate is True and _parse("--no-rotate").rotate is False
    assert job_to_argv(_parse("--no-rotate")) == ["--no-rotate"] and job_to_argv(_parse()) == []
    old = JobSpec(rotate=False).run_record("/m", 100, autocast=False)
    new = JobSpec(rotate=True).run_record("/m", 100, autocast=False)
    assert "--resume --no-rotate" in str(different_run_error(tmp_path, old, new))
    # settings a --x / --no-x pair sets are named by the flag that gives the stored value
    unrotated = _parse("--no-rotate")
    before = unrotated.run_record("/m", 100, autocast=False)
    unrotated.rabit.precondition = False
    message = str(different_run_error(tmp_path, before, unrotated.run_record("/m", 100, autocast=False)))
    assert "rabit_config.precondition: True -> False" in message and "--resume --precondition;" in message
    # a run from before the layers' biases existed had none: --no-add-bias continues it
    record = _parse("--no-rotate").run_record("/m", 100, autocast=False)
    del record["rabit_config"]["add_bias"]
    message = str(different_run_error(tmp_path, record, _parse("--no-rotate").run_record("/m", 100, autocast=False)))
    assert "rabit_config.add_bias: False -> True" in message and "--resume --no-add-bias;" in message
    assert different_run_error(tmp_path, record, _parse("--no-rotate", "--no-add-bias").run_record(
        "/m", 100, autocast=False)) is None
    # nor sign descent in its block stage: --refine-descent 0 continues it
    record = _parse("--no-rotate").run_record("/m", 100, autocast=False)
    del record["stages"]["blocks"]["descent_passes"]
    message = str(different_run_error(tmp_path, record, _parse("--no-rotate").run_record("/m", 100, autocast=False)))
    assert "stages.blocks.descent_passes: 0 -> 4" in message and "--resume --refine-descent 0;" in message
    assert different_run_error(tmp_path, record, _parse("--no-rotate", "--refine-descent", "0").run_record(
        "/m", 100, autocast=False)) is None
    # a run from before the dampings' reference existed damped relative to the mean, today's default; a run with
    # the clipped reference is continued by naming it
    record = _parse("--no-rotate").run_record("/m", 100, autocast=False)
    del record["stages"]["blocks"]["damp_reference"]
    assert different_run_error(tmp_path, record, _parse("--no-rotate").run_record("/m", 100, autocast=False)) is None
    record = _parse("--no-rotate", "--refine-damp-reference", "clipped").run_record("/m", 100, autocast=False)
    message = str(different_run_error(tmp_path, record, _parse("--no-rotate").run_record("/m", 100, autocast=False)))
    assert "stages.blocks.damp_reference: 'clipped' -> 'mean'" in message
    assert "--resume --refine-damp-reference clipped;" in message
    # runs from before the equal mix became the default mixed by size: the hint continues them
    record = _parse("--no-rotate", "--data-mix", "size").run_record("/m", 100, autocast=False)
    message = str(different_run_error(tmp_path, record, _parse("--no-rotate").run_record("/m", 100, autocast=False)))
    assert "data.mix: 'size' -> 'equal'" in message and "--resume --data-mix size;" in message
    from conftest import make_tiny_llama
    from rabit.testing import tiny_tokenizer

    make_tiny_llama().save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    said = []
    spec = _parse("--model", str(tmp_path / "llama"))
    load_teacher(spec, "cpu", said.append)
    assert spec.rotate is True and said == ["rotating the residual stream and the attention values (seed 0) ..."]
    assert spec.train.optim.scale_lr == 1.5e-4 and spec.rabit.precondition is False


def test_validate_names_the_flag():
    with pytest.raises(ValueError, match="--tokens 10 is smaller than one optimizer step"):
        _parse("--tokens", "10").validate()
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        _parse("--resume", "--overwrite").validate()


def test_ablation_cells_train_latents_with_the_latent_step_size():
    # `rabit ablate` compares modes by how their latents train: its cells take Muon's 4-sequence step, unless
    # --extra sets the batch
    import argparse

    from rabit.cli.ablate import add_parser, base_job

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    spec = base_job(parser.parse_args(["ablate"]))
    assert spec.train.train_latents and spec.train.batch_size * spec.train.grad_accum == 4
    assert "--grad-accum" not in job_to_argv(spec)
    spec = base_job(parser.parse_args(["ablate", "--extra", "--grad-accum 2"]))
    assert spec.train.grad_accum == 2 and job_to_argv(spec)[job_to_argv(spec).index("--grad-accum") + 1] == "2"


def test_ablation_cells_precondition_as_their_init_says_whatever_the_rotation(tmp_path):
    # the job preconditions only unrotated models by default; an ablation cell's init names it either way
    import argparse

    from rabit.cli.ablate import add_parser, base_job, cell_job

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = base_job(parser.parse_args(["ablate"]))
    for init, flag in (("isvid+pre", "--precondition"), ("isvid", "--no-precondition")):
        cell = cell_job(base, tmp_path, "coupled", init)
        assert flag in job_to_argv(cell)
        rebuilt = _parse(*job_to_argv(cell))
        rebuilt.rotate = True
        rebuilt.resolve_batch()   # what loading a rotatable model does: the cell's choice stays
        assert rebuilt.rabit.precondition is (init == "isvid+pre")
