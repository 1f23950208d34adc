"""Probe of the block-wise stage on the default model: init (init cache) -> BlockReconstruction -> WikiText-2 test
perplexity (16 windows); saves the student to /tmp/exp/NAME.safetensors for benchmarks/e2e_from_state.py.

Usage: python benchmarks/block_stage_probe.py NAME SAMPLES EPOCHS REFINE_ROUNDS [LATENT_LR SCALE_LR [TRAIN_DATA]]
(docs/RESULTS.md section 10: `refine1 16 0 1`)."""
import os
os.makedirs("/tmp/exp", exist_ok=True)
import time, sys, json, torch
import rabit
from rabit.models import load_model
from rabit.data import calibration_batch, training_sequences, eval_tokens
from rabit.train.trainer import make_student
from rabit.train.blockwise import BlockConfig, BlockReconstruction
from rabit.eval.perplexity import perplexity
name, samples, epochs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
slr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-3
t0=time.time()
teacher, tok = load_model("SmolLM2-135M-Instruct"); teacher.eval()
calib = calibration_batch(tok, "wikitext2-valid", 16, 512)
from rabit.cli.quantize import _initialized_student
student, _ = _initialized_student(teacher, rabit.RaBiTConfig(), calib, False, False, True)
t_init = time.time()-t0
print("init", t_init, flush=True)
data = sys.argv[7] if len(sys.argv) > 7 else "wikitext2-valid"
train, _ = training_sequences(tok, data.split(","), 512)
train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))]
bc = BlockConfig(samples=samples, epochs=epochs, refine_rounds=rounds, refine_samples=16, latent_lr=llr, scale_lr=slr)
t=time.time()
recs = BlockReconstruction(teacher, student, train, bc, run_dir=f"/tmp/exp/run_{name}", progress=False).run()
t_blocks = time.time()-t
print("blocks", t_blocks, flush=True)
test = eval_tokens(tok, "wikitext2-test")
t=time.time(); p = perplexity(student, test, 2048, None, 16); t_ppl=time.time()-t
print("ppl16", p, t_ppl, flush=True)
json.dump({"name": name, "argv": sys.argv[1:], "ppl16": p, "t_init": t_init, "t_blocks": t_blocks, "t_ppl": t_ppl,
           "records": [r.__dict__ for r in recs]}, open(f"/tmp/exp/{name}.json", "w"), indent=1)
from safetensors.torch import save_model
save_model(student, f"/tmp/exp/{name}.safetensors")
