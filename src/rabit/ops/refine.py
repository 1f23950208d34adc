"""Output-aware refinement of k binary paths: pure functions on tensors.

Iterative residual SVID fits the paths to the weight in the (preconditioned) Frobenius norm. What matters is
the layer's output on real inputs: with H = sum over calibration tokens of x x^T (in x in), the output error
of an approximation Q of W is

    err(Q) = sum_t ||(W - Q) x_t||^2 = trace((W - Q) H (W - Q)^T).

Two closed-form moves lower it, alternated for a few rounds (each round is kept only if err falls):

* signs, scales fixed: GPTQ-style column-by-column rounding with error feedback (Frantar et al. 2022). Each
  weight picks the nearest of the 2^k values sum_i +-g_i[r] h_i[c] its paths can express; the rounding error
  of column c is pushed onto the columns not yet rounded through the Cholesky factor of H^-1.
* scales, signs fixed: least squares in the H metric. The row scales g_i[r] solve one k x k system per row;
  the column scales h_i solve one (k * in) system (or one in x in system per path, Gauss-Seidel, when that is
  too large).
* signs again, scales fixed: coordinate descent (sign_descent). GPTQ rounds each column once, against the error
  of the columns before it; a weight whose move to another level lowers its row's error, given every other
  weight, is then moved, column after column, for a few passes. On the default model it lowers the held-out
  output error left by GPTQ and the refits by 4-12 % (docs/RESULTS.md section 37).

A path is a triple (g, B, h) as in rabit.ops.svid.
"""
from __future__ import annotations

import itertools

import torch

from ..kernels import gptq_cpu, sign_descent_cpu
from .svid import coupled_signs, path_matrix, reconstruct

# The references a damping is relative to (damped): "mean", GPTQ's mean of diag H, or "clipped", that mean with each
# entry clipped at DAMP_CLIP x the median entry. A few massive-activation channels set the mean alone where they
# exist (SmolLM2's twelfth down_proj: mean 651x its median, one channel 890,000x), so that a ridge relative to the
# mean swamps every other channel and the output-aware fit becomes nearly a plain weight fit there; where no channel
# stands out by DAMP_CLIP the two are the same. The block stage measured "clipped" worse on that model
# (docs/RESULTS.md section 45): the heavy ridge of that one layer is a regularization that pays.
DAMP_REFERENCES = ("mean", "clipped")
DAMP_CLIP = 10.0

# Above this many unknowns the column scales are refit one path at a time (an in x in solve each) instead of
# jointly ((k * in) x (k * in)).
JOINT_SOLVE_LIMIT = 2048


def load_native_kernels(descent: bool = True) -> None:
    """Build (on first use: a compile) and load the native CPU kernels refine_paths calls, now rather than inside
    its first call; with descent, sign_descent's too. One that cannot be built is left to the fallback."""
    gptq_cpu.is_available()
    if descent:
        sign_descent_cpu.is_available()


def output_error(w: torch.Tensor, paths, H: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T) for Q = sum of the paths."""
    e = w.to(torch.float32) - reconstruct(paths)
    return float(((e @ H) * e).sum())


def damp_scale(H: torch.Tensor, reference: str = "mean") -> torch.Tensor:
    """What a damping of H is relative to: the mean of its diagonal, or ("clipped") that mean with each entry
    clipped at DAMP_CLIP times the median entry (DAMP_REFERENCES)."""
    d = H.diagonal().to(torch.float32)
    if reference == "clipped":
        d = torch.minimum(d, DAMP_CLIP * d.median())
    elif reference != "mean":
        raise ValueError(f"damping reference must be one of {DAMP_REFERENCES}, got {reference!r}")
    return d.mean()


def damped(H: torch.Tensor, damp: float = 0.01, reference: str = "mean") -> torch.Tensor:
    """H + damp * s * I, s = damp_scale(H, reference): positive definite even where calibration never excited a
    channel."""
    H = H.to(torch.float32).clone()
    scale = damp_scale(H, reference)
    if not scale > 0:
        scale = torch.ones((), dtype=H.dtype)
    H.diagonal().add_(damp * scale)
    return H


def _sign_combinations(k: int, like: torch.Tensor) -> torch.Tensor:
    """All 2^k sign vectors as a (2^k, k) tensor."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k)), dtype=like.dtype, device=like.device)


@torch.no_grad()
def gptq_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = False, damp_reference: str = "mean"):
    """What gptq_signs needs of the metric alone, (perm, U): the column order (None = natural; with act_order,
    decreasing H diagonal) and the upper Cholesky factor of the damped H^-1 in that order, rows contiguous.
    The same for every call with the same H: refine_paths computes it once per layer, not once per round (the
    factorizations are most of a native gptq_signs call)."""
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    Hp = H if perm is None else H[perm][:, perm]
    L = torch.linalg.cholesky(damped(Hp, damp, damp_reference))
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).contiguous()  # rows contiguous (native loop)
    return perm, U


@torch.no_grad()
def gptq_signs(w: torch.Tensor, g: list[torch.Tensor], h: list[torch.Tensor], H: torch.Tensor,
               block_size: int = 128, damp: float = 0.01, act_order: bool = False,
               factor: tuple | None = None, damp_reference: str = "mean") -> list[torch.Tensor]:
    """Sign planes for fixed scales, chosen column by column with GPTQ error feedback in the metric H.

    act_order: round the columns in order of decreasing H diagonal (GPTQ's "act order"): the inputs that carry
    the most energy are rounded first, while the most columns remain to absorb their error.
    factor: gptq_factor(H, damp, act_order, damp_reference), when the caller already has it (H, damp, act_order
    and damp_reference are then not used)."""
    perm, U = gptq_factor(H, damp, act_order, damp_reference) if factor is None else factor
    if perm is not None:
        signs = gptq_signs(w[:, perm], g, [hi[perm] for hi in h], H, block_size, damp, factor=(None, U))
        inv = torch.argsort(perm)
        return [s[:, inv].contiguous() for s in signs]
    W = w.to(torch.float32).clone()
    n = W.shape[1]
    k = len(g)
    combos = _sign_combinations(k, W)                       # (2^k, k)
    G = torch.stack([gi.to(torch.float32) for gi in g], 1)  # (out, k)
    Hs = torch.stack([hi.to(torch.float32) for hi in h], 0)  # (k, in)
    choice = torch.empty(W.shape[0], n, dtype=torch.long, device=W.device)
    if _native_columns(W, U, G, Hs):
        _gptq_columns(W, U, G, Hs, combos, choice, block_size, gptq_cpu.block_columns)
    else:
        # The column loop runs thousands of tiny ops: on a CPU one thread is several times faster than a pool.
        threads = torch.get_num_threads()
        if W.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            _gptq_columns(W, U, G, Hs, combos, choice, block_size, _block_columns_reference)
        finally:
            torch.set_num_threads(threads)
    signs = combos[choice]                                     # (out, in, k)
    return [signs[..., i].contiguous() for i in range(k)]


def _native_columns(W, U, G, Hs) -> bool:
    """Whether the native column loop applies: fp32 CPU tensors with finite values (the kernel matches the
    reference bitwise there; torch.argmin's handling of NaN is left to the reference)."""
    if W.device.type != "cpu" or W.dtype != torch.float32 or not gptq_cpu.is_available():
        return False
    return all(bool(torch.isfinite(t).all()) for t in (W, U, G, Hs))


def _gptq_columns(W, U, G, Hs, combos, choice, block_size: int, block_columns) -> None:
    """GPTQ over blocks of columns: block_columns rounds one block (native or reference), and the block's
    errors are pushed onto the later columns by one matrix product."""
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        # every value the paths can express at each weight of the block: (bs, out, 2^k)
        levels = (G[None] * Hs[:, i1:i2].T[:, None, :]) @ combos.T
        err1 = block_columns(W[:, i1:i2], levels.contiguous(), U[i1:i2, i1:i2], choice[:, i1:i2])
        if i2 < n:
            W[:, i2:] -= err1 @ U[i1:i2, i2:]


def _block_columns_reference(W1, levels, U1, choice) -> torch.Tensor:
    """One block of GPTQ's column loop in PyTorch ops: the reference of rabit.kernels.gptq_cpu.block_columns
    (writes choice, returns the errors divided by U's diagonal; W1 is not modified)."""
    W1 = W1.clone()
    err1 = torch.zeros_like(W1)
    for j in range(W1.shape[1]):
        col = W1[:, j]
        idx = (col[:, None] - levels[j]).abs().argmin(1)
        choice[:, j] = idx
        err = (col - levels[j].gather(1, idx[:, None]).squeeze(1)) / U1[j, j]
        W1[:, j:].sub_(err[:, None] * U1[j, j:][None, :])
        err1[:, j] = err
    return err1


def _solve_psd(A: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Solve A x = b for (batched) symmetric positive semi-definite A, with a relative ridge."""
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    A = A + ridge * scale[..., None, None] * eye
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        return torch.linalg.lstsq(A, b[..., None]).solution[..., 0]
    return torch.cholesky_solve(b[..., None], L)[..., 0]


def _positive(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scales stay positive: a non-positive least-squares scale is replaced by a small positive one (the
    coupled derivation and the packed format assume g, h > 0 with the sign carried by B)."""
    floor = 1e-3 * like.abs().mean().clamp_min(1e-12)
    return torch.where(x > floor, x, floor)


@torch.no_grad()
def refit_row_scales(w: torch.Tensor, paths, H: torch.Tensor, products: list | None = None) -> list[torch.Tensor]:
    """Least-squares g_i (per row, k x k systems) in the metric H, signs and column scales fixed.

    products: an empty list to receive P_i = (B_i * h_i) @ H, which refit_column_scales can reuse (the paths'
    outputs in the metric, row scales aside)."""
    w = w.to(torch.float32)
    A = [B * h[None, :] for _, B, h in paths]     # row r of path i is g_i[r] * A_i[r]
    P = [a @ H for a in A]
    k = len(paths)
    M = torch.stack([torch.stack([(P[i] * A[j]).sum(1) for j in range(k)], -1) for i in range(k)], -2)
    v = torch.stack([(P[i] * w).sum(1) for i in range(k)], -1)
    g = _solve_psd(M, v)
    if products is not None:
        products.extend(P)
    return [_positive(g[:, i], paths[i][0]) for i in range(k)]


@torch.no_grad()
def refit_column_scales(w: torch.Tensor, paths, H: torch.Tensor, WH: torch.Tensor | None = None,
                        products: list | None = None) -> list[torch.Tensor]:
    """Least-squares h_i in the metric H, signs and row scales fixed.

    The objective is quadratic in the stacked h with blocks Q_ij = H * (G_i^T G_j) (elementwise), where
    G_i = g_i[:, None] * B_i, and linear term b_i = column sums of G_i * (W H).
    WH: w @ H when the caller has it (refine_paths computes it once per layer). products: refit_row_scales's
    P_i for these paths' signs and column scales, from which the Gauss-Seidel refit (large layers) takes the
    other paths' outputs in the metric instead of multiplying them by H again."""
    w = w.to(torch.float32)
    k, n = len(paths), w.shape[1]
    G = [g[:, None] * B for g, B, _ in paths]
    if WH is None:
        WH = w @ H
    if k * n <= JOINT_SOLVE_LIMIT:
        # Q is symmetric: the blocks below the diagonal are the transposes of those above
        GG = {(i, j): G[i].T @ G[j] for i in range(k) for j in range(i, k)}
        Q = torch.cat([torch.cat([H * (GG[(i, j)] if i <= j else GG[(j, i)].T) for j in range(k)], 1)
                       for i in range(k)], 0)
        b = torch.cat([(G[i] * WH).sum(0) for i in range(k)])
        h = _solve_psd(Q, b)
        return [_positive(h[i * n:(i + 1) * n], paths[i][2]) for i in range(k)]
    hs = [p[2].clone() for p in paths]
    # (path_j @ H) = g_j * P_j while h_j is the one P_j was made with
    PH = [None] * k if products is None else list(products)
    for i in range(k):  # Gauss-Seidel over the paths
        othersH = None
        for j in range(k):
            if j == i:
                continue
            if PH[j] is None:
                PH[j] = (paths[j][1] * hs[j][None, :]) @ H
            term = paths[j][0][:, None] * PH[j]
            othersH = term if othersH is None else othersH + term
        targetH = WH - othersH if othersH is not None else WH
        b = (G[i] * targetH).sum(0)
        hs[i] = _positive(_solve_psd(H * (G[i].T @ G[i]), b), paths[i][2])
        PH[i] = None          # h_i changed
    return hs


@torch.no_grad()
def refit_scales(w: torch.Tensor, paths, H: torch.Tensor, WH: torch.Tensor | None = None):
    """Row scales, then column scales, by least squares in the metric H (signs fixed). WH: w @ H, if known."""
    products = []
    g = refit_row_scales(w, paths, H, products)
    paths = [(gi, B, h) for gi, (_, B, h) in zip(g, paths)]
    h = refit_column_scales(w, paths, H, WH, products)
    return [(g, B, hi) for hi, (g, B, _) in zip(h, paths)]


@torch.no_grad()
def refine_paths(w: torch.Tensor, paths, H: torch.Tensor, rounds: int = 2, damp: float = 0.01,
                 block_size: int = 128, act_order: bool = False, descent: int = 0, descent_cycles: int = 1,
                 damp_reference: str = "mean"):
    """Alternate scale refits and GPTQ sign choices for `rounds` rounds, keeping the best paths by output
    error. Returns (paths, errors): errors[0] is the starting output error, then one per round (the best so
    far, so the sequence never increases). descent: passes of sign_descent after the rounds, then a refit of the
    scales (one more entry in errors); descent_cycles: that many (passes, refit) cycles, each from the last one's
    refitted scales, stopping early when a cycle does not lower the error (one entry each). The metric is
    damped(H, damp, damp_reference)."""
    w = w.to(torch.float32)
    Hd = damped(H, damp, damp_reference)
    best = [(g.float(), B.float(), h.float()) for g, B, h in paths]
    errors = [output_error(w, best, Hd)]
    factor = gptq_factor(H, damp, act_order, damp_reference) if rounds > 0 else None
    WH = w @ Hd if rounds > 0 or descent > 0 else None

    def keep(cand) -> bool:
        """Take cand if it lowers the error; one errors entry either way. False: stop iterating."""
        nonlocal best
        err = output_error(w, cand, Hd)
        if err < errors[-1]:
            best = cand
            errors.append(err)
            return True
        errors.append(errors[-1])
        return False

    for _ in range(rounds):
        cand = refit_scales(w, best, Hd, WH)
        signs = gptq_signs(w, [g for g, _, _ in cand], [h for _, _, h in cand], H, block_size, factor=factor)
        if not keep(refit_scales(w, [(g, B, h) for (g, _, h), B in zip(cand, signs)], Hd, WH)):
            break
    # after the last round only: the next round's GPTQ rounding would choose every sign afresh
    for _ in range(max(1, int(descent_cycles)) if descent > 0 else 0):
        cand, _ = sign_descent(w, best, Hd, descent, act_order)
        if not keep(refit_scales(w, cand, Hd, WH)):
            break
    return best, errors


@torch.no_grad()
def sign_descent(w: torch.Tensor, paths, H: torch.Tensor, passes: int = 1, act_order: bool = True):
    """Coordinate descent on the sign planes with the scales fixed, in the metric H (as given: damp it first).

    Each weight can take one of 2^k levels, sum_i +-g_i[r] h_i[c]. Rows are independent (the error of row r is
    e_r H e_r^T, e = w - q); each pass walks the columns (act_order: by decreasing H diagonal, the inputs with the
    most energy first) and moves a weight to the level that lowers its row's error most given all the others, if
    any does: moving it by -a (its error grows by a) changes the error by 2 a (e_r H)_c + a^2 H_cc. No pass raises
    the error. Returns (paths, moves): the new paths (scales unchanged) and the weights moved in each pass."""
    w = w.to(torch.float32)
    k = len(paths)
    g = torch.stack([p[0].to(torch.float32) for p in paths]).contiguous()   # (k, out)
    h = torch.stack([p[2].to(torch.float32) for p in paths]).contiguous()   # (k, in)
    Hf = H.to(torch.float32).contiguous()
    n = w.shape[1]
    order = (torch.argsort(Hf.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(n, device=w.device))
    weights = torch.tensor([2 ** (k - 1 - i) for i in range(k)], device=w.device)
    # the level index of each weight: bit (k - 1 - i) set where path i's sign is +1 (_sign_combinations' order)
    choice = sum((p[1] > 0).to(torch.int64) * weights[i] for i, p in enumerate(paths)).contiguous()
    combos = _sign_combinations(k, w)
    S = combos[choice]                                                           # (out, in, k)
    Q = sum(S[..., i] * torch.outer(g[i], h[i]) for i in range(k))
    # G = (w - q) H once: each pass keeps it up to date as it moves weights (one axpy per move)
    G = ((w - Q) @ Hf).contiguous()
    native = (w.device.type == "cpu" and sign_descent_cpu.is_available() and bool(torch.isfinite(G).all())
              and sign_descent_cpu.supports(g, h, Hf, order, choice, G))
    moves = []
    for _ in range(passes):
        if native:
            moved = sign_descent_cpu.descent_pass(g, h, Hf, order, choice, G)
        else:
            moved = _sign_descent_reference(g, h, Hf, order, choice, G)
        moves.append(int(moved.sum()))
        if moves[-1] == 0:
            break
    S = combos[choice]
    return [(g[i].clone(), S[..., i].contiguous(), h[i].clone()) for i in range(k)], moves


def _sign_descent_reference(g, h, H, order, choice, G) -> torch.Tensor:
    """One pass of sign_descent's column loop over all rows at once (the native kernel's ground truth and
    fallback): updates choice and G = (w - q) H in place, returns the moves of each row."""
    k, out = g.shape
    combos = _sign_combinations(k, G)                                # (2^k, k)
    moved = torch.zeros(out, dtype=torch.int64, device=G.device)
    rows = torch.arange(out, device=G.device)
    for c in order.tolist():
        gh = g * h[:, c:c + 1]                                       # (k, out): g_i[r] h_i[c]
        lv = sum(combos[:, i][None, :] * gh[i][:, None] for i in range(k))   # (out, 2^k) levels
        cur = choice[:, c]
        a = lv[rows, cur][:, None] - lv                              # the error grows by a at column c
        d = (2 * a) * G[:, c:c + 1] + (a * a) * H[c, c]
        d = torch.where(d < 0, d, torch.full_like(d, float("inf")))
        d[rows, cur] = 0.0                                           # staying put: no change; moves must lower it
        best = d.argmin(1)
        mv = best != cur
        if bool(mv.any()):
            step = a[rows, best][mv]
            G[mv] = G[mv] + step[:, None] * H[c][None, :]
            choice[mv, c] = best[mv]
            moved += mv.to(torch.int64)
    return moved


@torch.no_grad()
def output_target(w: torch.Tensor, H: torch.Tensor, T: torch.Tensor, damp: float = 0.01,
                  damp_reference: str = "mean") -> torch.Tensor:
    """The weight W_t whose outputs on inputs x~ best match targets t in least squares: W_t H = T with
    H = sum x~ x~^T and T = sum t x~^T. Written W + (T - W H) H^-1 around a reference weight W, so that the
    damping of H shrinks only the correction, never W itself."""
    L = torch.linalg.cholesky(damped(H, damp, damp_reference))
    return w + torch.cholesky_solve((T - w @ H).T.contiguous(), L).T


@torch.no_grad()
def corrected_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01,
                     damp_reference: str = "mean") -> torch.Tensor:
    """The weight W_t whose output on inputs x~ (a quantized model's) best matches, in least squares, what W
    gives on the inputs x the full-precision model sees: output_target with t = W x, i.e. T = W C with
    C = sum x x~^T. It is W exactly when the inputs carry no error."""
    return output_target(w, H, w @ C, damp, damp_reference)


@torch.no_grad()
def centered_sums(H: torch.Tensor, s: torch.Tensor, n: int, T: torch.Tensor | None = None,
                  s_t: torch.Tensor | None = None):
    """(H_c, T_c): the sums H = sum x~ x~^T and T = sum t x~^T of n tokens turned into the sums of deviations from
    the means, sum (x~ - m~)(x~ - m~)^T and sum (t - m_t)(x~ - m~)^T, given s = sum x~ and s_t = sum t.

    With a free bias b, min over (Q, b) of sum ||Q x~ + b - t||^2 is the same problem on centered inputs and
    targets, and b = m_t - Q m~ (fitted_bias). A quantized layer then spends its sign and scale choices on how its
    inputs vary, not on their mean: the normalized inputs of the layers after a norm share one direction that
    carries about half their energy (RESULTS.md section 36), which the binary paths otherwise have to reproduce."""
    if n < 1:
        raise ValueError(f"need at least one token, got n={n}")
    s = s.to(torch.float32)
    Hc = H - torch.outer(s, s) / n
    if T is None:
        return Hc, None
    if s_t is None:
        raise ValueError("T needs s_t, the sum of the targets")
    return Hc, T - torch.outer(s_t.to(torch.float32), s) / n


@torch.no_grad()
def fitted_bias(q: torch.Tensor, s: torch.Tensor, s_t: torch.Tensor, n: int) -> torch.Tensor:
    """The least-squares bias of a layer computing Q x~ + b towards targets t: mean(t) - Q mean(x~), from the sums
    s = sum x~ and s_t = sum t of n tokens."""
    return (s_t.to(torch.float32) - q.to(torch.float32) @ s.to(torch.float32)) / n


@torch.no_grad()
def coupled_latent(paths, preferred: torch.Tensor | None = None) -> torch.Tensor:
    """A latent weight whose coupled derivation (B_1 = sign(W), B_2 = sign(W - g_1 B_1 h_1), ...) gives exactly
    the paths' sign planes, so that a coupled layer starts from refined signs.

    The derivation is elementwise, so each weight takes the first of these that derives its signs: the
    `preferred` latent (e.g. the original weight), the reconstruction sum_i g_i B_i h_i, and, for k = 2, the
    value B_1 * a_1 / 2 (a_1 = g_1 h_1 > 0; it derives B_2 = -B_1, the one case the reconstruction misses,
    where |a_2| >= a_1). For k > 2 a few weights may still derive other signs; mismatches() counts them.
    """
    g = [p[0] for p in paths]
    h = [p[2] for p in paths]
    signs = [p[1] for p in paths]
    candidates = ([preferred.to(torch.float32)] if preferred is not None else []) + [reconstruct(paths)]
    if len(paths) == 2:
        candidates.append(signs[0] * 0.5 * path_matrix(g[0], torch.ones_like(signs[0]), h[0]).abs())
    latent = candidates[-1].clone()
    settled = torch.zeros_like(latent, dtype=torch.bool)
    for cand in candidates:
        derived = coupled_signs(cand, g, h)
        ok = torch.stack([d == s for d, s in zip(derived, signs)]).all(0) & ~settled
        latent = torch.where(ok, cand, latent)
        settled |= ok
    return latent


def mismatches(latent: torch.Tensor, paths) -> int:
    """How many weights' coupled derivation from `latent` differs from the paths' signs."""
    derived = coupled_signs(latent, [p[0] for p in paths], [p[2] for p in paths])
    return int(torch.stack([d != p[1] for d, p in zip(derived, paths)]).any(0).sum())
