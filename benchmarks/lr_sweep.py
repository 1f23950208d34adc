"""lr sweep on a 6-block proxy of SmolLM2-135M (full width, first 6 of 30 blocks), default step config.

    python benchmarks/lr_sweep.py STEPS LATENT_LR,SCALE_LR[,GAMMA] ...   (appends to docs/data/lr_sweep.jsonl)
"""
import sys, time, torch, tempfile, json, copy
torch.set_num_threads(1)
from rabit.models import load_model
from rabit.data import training_sequences, calibration_batch
from rabit.config import RaBiTConfig
from rabit.train import make_student, Trainer, TrainConfig, OptimConfig
NL = 6; STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
model, tok = load_model("SmolLM2-135M-Instruct")
model.model.layers = model.model.layers[:NL]; model.config.num_hidden_layers = NL
if getattr(model.config, "layer_types", None): model.config.layer_types = model.config.layer_types[:NL]
train, val = training_sequences(tok, "wikitext2-valid", 512, seed=0)
calib = calibration_batch(tok, "wikitext2-valid", 16, 512)
t = time.time(); student0 = make_student(model, RaBiTConfig(), calibration=calib, calib_autocast=True)
print("init", time.time() - t, flush=True)
configs = [tuple(map(float, c.split(","))) for c in sys.argv[2:]] or [(0.0, 3e-4), (1e-5, 3e-4), (3e-5, 3e-4), (1e-4, 3e-4)]
out = open(sys.argv[0].replace("lr_sweep.py", "") + "../docs/data/lr_sweep.jsonl", "a")
for c in configs:
    llr, slr = c[:2]; gamma = c[2] if len(c) > 2 else 100.0
    student = copy.deepcopy(student0)
    cfg = TrainConfig(steps=STEPS, grad_accum=4, autocast=True, save_every=10**6, gamma=gamma,
                      optim=OptimConfig(latent_lr=llr, scale_lr=slr, warmup_steps=max(1, round(0.05 * STEPS))))
    tr = Trainer(model, student, train, cfg, tempfile.mkdtemp(), progress=False)
    v0 = tr.evaluate(val[:4]); t = time.time(); r = tr.train(); v1 = tr.evaluate(val[:4])
    rec = {"layers": NL, "steps": STEPS, "tokens_per_step": 2048, "latent_lr": llr, "scale_lr": slr, "gamma": gamma,
           "val_before": v0, "val_after": v1, "last_train": r.last, "seconds": time.time() - t}
    print(json.dumps(rec), flush=True); out.write(json.dumps(rec) + "\n"); out.flush()
