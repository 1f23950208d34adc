"""`rabit diagnose PATH`: per-layer path correlations of a 2-bit model (paper Table 1), as a table, JSON and PNG."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ..atomic_io import atomic_write_json

# Keys under which a rabit folder's config.json may record the model it was quantized from (first found wins):
# in "quantization_config", then at the top level.
TEACHER_KEYS = ("base_model", "teacher", "base_model_name_or_path", "source_model", "model_name_or_path")


def add_parser(sub):
    p = sub.add_parser(
        "diagnose", help="per-layer correlations between the binary paths of a 2-bit model (paper Table 1)",
        description="For each quantized layer, on calibration data: Corr(y1, y2) between the outputs of the "
                    "two paths, and Corr(yt - y1, y2), how well path 2 follows what path 1 leaves of the "
                    "full-precision teacher layer's output yt. RaBiT: about -0.35..-0.5 and 0.58..0.65; "
                    "standard QAT: about 0. Writes a table, a JSON file and a PNG plot.")
    p.add_argument("path", help="a saved rabit folder (or, with --ptq, a full-precision model to quantize)")
    p.add_argument("--teacher", default=None,
                   help="the full-precision model the folder was quantized from (default: the base model "
                        "recorded in the folder's config.json)")
    p.add_argument("--ptq", action="store_true",
                   help="PATH is a full-precision model: quantize it with the default post-training "
                        "initialization (ISVID + preconditioning) and diagnose that; the teacher is PATH")
    p.add_argument("--calib-source", default="wikitext2-valid", help="calibration corpus (default: wikitext2-valid)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration sequences (default: 8)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    from ..bos import add_bos_args

    add_bos_args(p, "calibration sequences")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="results file (default: ./rabit-diagnose-<model>.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot file (default: the JSON path with .png)")
    return p


def _slug(path: str) -> str:
    name = Path(path.rstrip("/\\")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def recorded_teacher(folder) -> str | None:
    """The base model recorded in a rabit folder's config.json, if any."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    for scope in (data.get("quantization_config") or {}, data):
        if not isinstance(scope, dict):
            continue
        for key in TEACHER_KEYS:
            v = scope.get(key)
            if isinstance(v, str) and v.strip():
                return v
    return None


def run(args) -> int:
    for name in ("calib_samples", "calib_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import torch

    from ..data import calibration_batch
    from ..diagnose import path_correlations, plot_correlations, quantized_layers, summarize
    from ..models import is_rabit_folder, load_model, resolve_model_path

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_model_path(args.path)
    out_json = Path(args.json) if args.json else Path.cwd() / f"rabit-diagnose-{_slug(args.path)}.json"
    out_png = Path(args.plot) if args.plot else out_json.with_suffix(".png")

    if args.ptq:
        if Path(resolved).is_dir() and is_rabit_folder(resolved):
            raise ValueError(f"--ptq needs a full-precision model, but {args.path} is a rabit folder")
        if args.teacher:
            raise ValueError("--ptq uses PATH itself as the teacher: do not give --teacher")
        teacher_name = args.path
    else:
        if not Path(resolved).exists():
            raise FileNotFoundError(f"model folder {args.path} does not exist")
        if not is_rabit_folder(resolved):
            raise ValueError(f"{args.path} is not a quantized rabit folder (no quantization_config with "
                             "quant_method 'rabit' in config.json); use --ptq to diagnose the post-training "
                             "initialization of a full-precision model")
        teacher_name = args.teacher or recorded_teacher(resolved)
        if not teacher_name:
            raise ValueError(f"{args.path} does not record its base model: give the full-precision teacher "
                             "with --teacher")

    t0 = time.time()
    teacher, tok = load_model(teacher_name, device=device)
    if quantized_layers(teacher) or is_rabit_folder(resolve_model_path(teacher_name)):
        raise ValueError(f"the teacher {teacher_name} is itself quantized: give the full-precision model")
    from ..bos import resolve_bos

    calib = calibration_batch(tok, args.calib_source, args.calib_samples, args.calib_len, seed=args.seed,
                              add_bos=resolve_bos(tok, args.bos).use)
    if args.ptq:
        import copy

        from ..config import RaBiTConfig
        from ..quantize import collect_channel_stats, find_linear_layers, quantize_

        cfg = RaBiTConfig()
        stats = collect_channel_stats(teacher, find_linear_layers(teacher, cfg), calib, progress=True)
        student = quantize_(copy.deepcopy(teacher), cfg, stats=stats, progress=True)
    else:
        student, _ = load_model(args.path, device=device)
        from ..rotation import ROTATION_ATTR, rotate_

        rot = getattr(student, ROTATION_ATTR, None)
        if rot is not None:   # compare layer by layer with the teacher the student was made from
            rotate_(teacher, seed=rot["seed"], values=rot["values"])
            print(f"rotated the teacher as the student's source was (seed {rot['seed']}, values "
                  f"{'too' if rot['values'] else 'not'})", flush=True)
    print(f"loaded student {args.path} and teacher {teacher_name} in {time.time() - t0:.1f} s", flush=True)

    t0 = time.time()
    results = path_correlations(student, teacher, calib, batch_size=args.batch_size, progress=True)
    seconds = time.time() - t0
    summary = summarize(results)

    print("\n| layer | Corr(y1, y2) | Corr(yt - y1, y2) | rel. err. path 1 | rel. err. all |")
    print("|---|---:|---:|---:|---:|")
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"
    for name, r in results.items():
        print(f"| {name} | {f(r['corr_paths'])} | {f(r['corr_residual'])} | {r['rel_err_1']:.3f} | "
              f"{r['rel_err_all']:.3f} |")
    if "corr_paths_mean" in summary:
        print(f"\nmean over {summary['layers']} layers: Corr(y1, y2) = {summary['corr_paths_mean']:+.3f} "
              f"[{summary['corr_paths_min']:+.3f}, {summary['corr_paths_max']:+.3f}], "
              f"Corr(yt - y1, y2) = {summary['corr_residual_mean']:+.3f} "
              f"[{summary['corr_residual_min']:+.3f}, {summary['corr_residual_max']:+.3f}] "
              "(paper, RaBiT: -0.35..-0.5 and 0.58..0.65; standard QAT: about 0)")

    doc = dict(model=args.path, teacher=teacher_name, ptq=args.ptq, calib_source=args.calib_source,
               calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, seconds=seconds,
               summary=summary, layers=results)
    atomic_write_json(out_json, doc, allow_nan=True, sort_keys=False)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plot_correlations(results, out_png, title=f"{args.path}{' (PTQ init)' if args.ptq else ''}: path correlations "
                                               f"on {args.calib_source}")
    print(f"\nwrote {out_json} and {out_png}")
    return 0
