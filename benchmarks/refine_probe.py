"""Held-out output error of single layers after the block stage's refinement (rabit.ops.refine), for different
starting points and with or without a fitted bias: a probe of what the refinement can reach, without the job.

For a few layers of a few blocks of the (by default rotated) model, H = sum x x^T of the layer's inputs is
collected on --fit calibration sequences and a second H on --held-out further sequences. Each variant starts from
an initialization, runs refine_paths (3 rounds, metric damping 0.1, act order: the job's settings) against the
first H, and reports the relative output error tr(E H' E^T) / tr(W H' W^T) on the held-out H' (E = W - Q, with the
fitted bias taken into account where there is one). docs/RESULTS.md sections 36 and 37 (the last column: the
refinement followed by --descent passes of sign descent):

    python benchmarks/refine_probe.py                 # rotated, as the job
    python benchmarks/refine_probe.py --no-rotate
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--data", default="wikitext2-valid")
    ap.add_argument("--no-rotate", action="store_true")
    ap.add_argument("--blocks", default="2,10,18,26")
    ap.add_argument("--layers", default="self_attn.q_proj,self_attn.v_proj,self_attn.o_proj,mlp.gate_proj,"
                                        "mlp.up_proj,mlp.down_proj")
    ap.add_argument("--fit", type=int, default=16, help="calibration sequences of --seq-len tokens")
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--descent", type=int, default=4, help="sign-descent passes of the last column (section 37)")
    ap.add_argument("--cycles", default="",
                    help="comma list: more columns, each sign descent in that many (passes, refit) cycles")
    args = ap.parse_args()
    cycles = [int(c) for c in args.cycles.split(",") if c]
    from rabit.data import tokenize_corpus
    from rabit.models import load_model
    from rabit.ops.precondition import preconditioned_decompose
    from rabit.ops.refine import centered_sums, fitted_bias, refine_paths
    from rabit.ops.svid import decompose, reconstruct
    from rabit.rotation import rotate_

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    if not args.no_rotate:
        rotate_(model, seed=0, values=True)
    n_seq = args.fit + args.held_out
    ids = tokenize_corpus(tok, args.data)[: n_seq * args.seq_len].view(n_seq, args.seq_len)
    blocks = [int(b) for b in args.blocks.split(",")]
    names = args.layers.split(",")
    stats: dict = {}
    current = {"part": "fit"}
    hooks = []
    for b in blocks:
        for name in names:
            def hook(module, inp, out, key=(b, name)):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                d = stats.setdefault((key, current["part"]), {"H": 0, "s": 0, "n": 0})
                d["H"], d["s"], d["n"] = d["H"] + a.T @ a, d["s"] + a.sum(0), d["n"] + a.shape[0]
            hooks.append(model.model.layers[b].get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for i in range(n_seq):
            current["part"] = "fit" if i < args.fit else "held"
            model(ids[i : i + 1])
    for h in hooks:
        h.remove()

    def held_error(E, bias, v):   # sum over held-out tokens of ||E x - bias||^2
        H, s, n = v["H"].float(), v["s"].float(), v["n"]
        err = float(((E @ H) * E).sum())
        if bias is not None:
            err += -2 * float(bias @ (E @ s)) + n * float(bias @ bias)
        return err

    inits = ["isvid+pre", "isvid", "svid", "naive"]
    totals = dict.fromkeys(inits + ["isvid, centered + bias", "the same + sign descent"]
                           + [f"descent x {c} cycles" for c in cycles], 0.0)
    print(f"| block | layer | mean share of H | " + " | ".join(totals) + " |")
    print("|---|---|---:|" + "---:|" * len(totals))
    for b in blocks:
        for name in names:
            W = model.model.layers[b].get_submodule(name).weight.detach().float()
            f, v = stats[((b, name), "fit")], stats[((b, name), "held")]
            H, s, n = f["H"].float(), f["s"].float(), f["n"]
            ref = held_error(W, None, v)
            starts = {
                "isvid+pre": lambda: preconditioned_decompose(W, lambda w: decompose(w, 2, "isvid"),
                                                              H.diagonal().clamp_min(0).sqrt(), None, 1.0, 0.0),
                "isvid": lambda: decompose(W, 2, "isvid"), "svid": lambda: decompose(W, 2, "svid"),
                "naive": lambda: decompose(W, 2, "naive")}
            row = {}
            for key, start in starts.items():
                paths, _ = refine_paths(W, start(), H, rounds=3, damp=0.1, act_order=True)
                row[key] = held_error(W - reconstruct(paths), None, v) / ref
            Hc, _ = centered_sums(H, s, n)
            paths, _ = refine_paths(W, decompose(W, 2, "isvid"), Hc, rounds=3, damp=0.1, act_order=True)
            Q = reconstruct(paths)
            bias = fitted_bias(Q, s, W @ s, n)   # targets W x: the bias is the mean of (W - Q) x
            row["isvid, centered + bias"] = held_error(W - Q, bias, v) / ref
            paths, _ = refine_paths(W, decompose(W, 2, "isvid"), Hc, rounds=3, damp=0.1, act_order=True,
                                    descent=args.descent)
            Q = reconstruct(paths)
            row["the same + sign descent"] = held_error(W - Q, fitted_bias(Q, s, W @ s, n), v) / ref
            for c in cycles:
                paths, _ = refine_paths(W, decompose(W, 2, "isvid"), Hc, rounds=3, damp=0.1, act_order=True,
                                        descent=args.descent, descent_cycles=c)
                Q = reconstruct(paths)
                row[f"descent x {c} cycles"] = held_error(W - Q, fitted_bias(Q, s, W @ s, n), v) / ref
            share = float(s @ s / n / H.trace())
            for k in totals:
                totals[k] += row[k]
            print(f"| {b} | {name} | {share:.2f} | " + " | ".join(f"{row[k]:.4f}" for k in totals) + " |",
                  flush=True)
    print("| all | sum | | " + " | ".join(f"{totals[k]:.4f}" for k in totals) + " |")


if __name__ == "__main__":
    main()
