import torch, copy
from rabit import RaBiTConfig, quantize_, rabit_layers
from rabit.models import load_model
from rabit.ops import reconstruct, iterative_residual_svid
m, tok = load_model('SmolLM2-135M-Instruct')
sd = {k: v.clone() for k, v in m.state_dict().items()}
for li in ["weight", "reconstruction"]:
    q = quantize_(copy.deepcopy(m), RaBiTConfig(precondition=False, latent_init=li, isvid_rounds=4))
    tot_e, tot_isvid, tot_w = 0, 0, 0
    for n, l in list(rabit_layers(q).items()):
        W0 = sd[n + ".weight"]
        with torch.no_grad():
            e = torch.linalg.matrix_norm(W0 - l.effective_weight()).item() ** 2
        tot_e += e; tot_w += W0.pow(2).sum().item()
    print(li, "relative error of coupled derivation at step 0:", (tot_e / tot_w) ** 0.5)
# ISVID approximation error itself
tot_e, tot_w = 0, 0
for n, l in list(rabit_layers(q).items()):
    W0 = sd[n + ".weight"]
    p = iterative_residual_svid(W0, 2, 4)
    tot_e += torch.linalg.matrix_norm(W0 - reconstruct(p)).item() ** 2; tot_w += W0.pow(2).sum().item()
print("isvid approximation", (tot_e / tot_w) ** 0.5)
