"""Shared by the block-stage benchmarks: the job's full-precision teacher (rotated as the job rotates it) and its
initialized student, both cut to their first `blocks` decoder blocks, and the block stage's calibration rows drawn
from the job's training mix as the job draws them."""
from rabit.cli.quantize import _initialized_student, load_teacher
from rabit.data import calibration_batch
from rabit.job import JobSpec


def job_blocks(blocks: int, rows: int):
    """(spec, teacher, student, rows of token ids) for the default job, cut to `blocks` decoder blocks."""
    spec = JobSpec()
    teacher, tok = load_teacher(spec, "cpu")
    d = spec.data
    calib = None
    if spec.rabit.precondition:
        calib = calibration_batch(tok, d.calib_sources, d.calib_samples, d.calib_len, seed=spec.train.seed)
    student, _ = _initialized_student(teacher, spec.rabit, calib, False, False, True)
    teacher.model.layers = teacher.model.layers[:blocks]
    student.model.layers = student.model.layers[:blocks]
    pool = calibration_batch(tok, d.sources, rows, spec.blocks.seq_len, seed=spec.train.seed + 1, mix=d.mix)
    return spec, teacher, student, pool
