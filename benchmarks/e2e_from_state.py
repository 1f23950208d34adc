"""End-to-end distillation from a saved student state (benchmarks/block_stage_probe.py): FULL steps training latents
and scales, then SCALES steps with the latents frozen; WikiText-2 test perplexity (16 windows) and Austen's Persuasion
(8 windows). Steps are 4 x 512 tokens.

Usage: python benchmarks/e2e_from_state.py NAME STATE.safetensors FULL SCALES [TRAIN_DATA [LATENT_LR [SCALE_LR]]]
(docs/RESULTS.md section 10: `ref_full20 /tmp/exp/refine1.safetensors 20 0`)."""
import time, sys, json, os, torch
import rabit
from rabit.models import load_model
from rabit.data import training_sequences, eval_tokens
from rabit.train.trainer import make_student, Trainer, TrainConfig
from rabit.train.optim import OptimConfig
from rabit.eval.perplexity import perplexity
from rabit import rabit_layers
name, state, full, scales = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = sys.argv[5] if len(sys.argv) > 5 else "wikitext2-valid"
llr = float(sys.argv[6]) if len(sys.argv) > 6 else 3e-3
slr2 = float(sys.argv[7]) if len(sys.argv) > 7 else 1e-3
teacher, tok = load_model("SmolLM2-135M-Instruct"); teacher.eval()
student = make_student(teacher, rabit.RaBiTConfig(), initialize=False)
from safetensors.torch import load_model as load_st
load_st(student, state)
train, _ = training_sequences(tok, data.split(","), 512)
res = {"name": name, "argv": sys.argv[1:]}
def phase(steps, latents, lr_s, tag):
    for m in rabit_layers(student).values():
        for p in m.latent_parameters(): p.requires_grad_(latents)
    tcfg = TrainConfig(steps=steps, batch_size=1, grad_accum=4, gamma=0.0, save_every=10**6,
                       optim=OptimConfig(latent_lr=llr, scale_lr=lr_s, warmup_steps=max(1, round(0.05*steps))))
    t = time.time()
    r = Trainer(teacher, student, train, tcfg, f"/tmp/exp/e2e_{name}_{tag}", progress=False).train()
    res[tag] = {"seconds": time.time()-t, "tok_s": r.tokens_per_second, "last": r.last}
    print(tag, res[tag], flush=True)
if full: phase(full, True, 1e-3, "full")
if scales: phase(scales, False, slr2, "scales")
for p in student.parameters(): p.requires_grad_(False)
student.eval()
test = eval_tokens(tok, "wikitext2-test"); ood = eval_tokens(tok, "austen-persuasion")
t=time.time(); res["ppl16"] = perplexity(student, test, 2048, None, 16); res["t_ppl"] = time.time()-t
res["ppl_austen8"] = perplexity(student, ood, 2048, None, 8)
print(res, flush=True)
json.dump(res, open(f"/tmp/exp/{name}.json", "w"), indent=1)
from safetensors.torch import save_model
save_model(student, f"/tmp/exp/{name}.safetensors")
