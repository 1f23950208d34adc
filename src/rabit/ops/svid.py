"""SVID and its residual variants: pure functions on tensors.

A binary path (``BinaryPath``) is a triple (g, B, h): B in {-1,+1} (out x in), g >= 0 per output row, h >= 0 per
input column, and it stands for the matrix g[:, None] * B * h[None, :].
"""
from __future__ import annotations

import torch

from .binarize import binarize

BinaryPath = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def path_matrix(g: torch.Tensor, B: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return g[:, None] * B * h[None, :]


def reconstruct(paths: list[BinaryPath]) -> torch.Tensor:
    out = path_matrix(*paths[0])
    for p in paths[1:]:
        out = out + path_matrix(*p)
    return out


def rank1_nonnegative(m: torch.Tensor, iters: int = 30, v0: torch.Tensor | None = None,
                      tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation u v^T of a non-negative matrix, with u, v >= 0.

    By Perron-Frobenius the leading singular vectors of a non-negative matrix can be taken non-negative, so
    power iteration started from a positive vector stays non-negative. Non-negative matrices have a large
    spectral gap, so a few dozen iterations reach the SVD's answer to float precision (tested against SVD);
    this is much cheaper than a full SVD of an 11008 x 4096 matrix. It stops early once v moves by less than
    `tol`; `v0` warm-starts it (iterative residual SVID passes the previous fit's h). The singular value is
    split evenly (u = sqrt(s) * left, v = sqrt(s) * right).
    """
    if m.ndim != 2:
        raise ValueError(f"rank1_nonnegative needs a 2-D matrix, got shape {tuple(m.shape)}")
    m = m.to(torch.float32)
    v = m.mean(dim=0) if v0 is None or not torch.any(v0 > 0) else v0.to(torch.float32).clamp_min(0)
    if not torch.any(v > 0):
        return m.new_zeros(m.shape[0]), m.new_zeros(m.shape[1])
    v = v / v.norm()
    for _ in range(iters):
        u = m @ v
        u = u / u.norm().clamp_min(1e-30)
        v_next = m.T @ u
        v_next = v_next / v_next.norm().clamp_min(1e-30)
        done = (v_next - v).norm() < tol
        v = v_next
        if done:
            break
    u = m @ v
    s = u.norm()
    u = u / s.clamp_min(1e-30)
    root = s.sqrt()
    return (root * u).clamp_min(0), (root * v).clamp_min(0)


def svid(w: torch.Tensor, iters: int = 30, v0: torch.Tensor | None = None, check: bool = True) -> BinaryPath:
    """Sign-Value-Independent Decomposition: w ~ g * sign(w) * h with (g, h) the rank-1 factors of |w|.

    For non-negative g, h the sign is the optimal B for any magnitudes, and then ||w - g B h||_F = ||(|w| -
    g h^T)||_F, which the best rank-1 approximation of |w| minimizes: the pair is the exact optimum of a
    single path (up to the power iteration's convergence).
    """
    if check:
        _check_matrix(w)
    w = w.to(torch.float32)
    B = binarize(w)
    g, h = rank1_nonnegative(w.abs(), iters, v0)
    return g, B, h


def naive_residual_sign(w: torch.Tensor, num_paths: int) -> list[BinaryPath]:
    """Baseline: B_i = sign(residual), per-row scale mean|residual|, h_i = 1."""
    _check_matrix(w)
    residual = w.to(torch.float32)
    ones = residual.new_ones(residual.shape[1])
    paths = []
    for _ in range(num_paths):
        B = binarize(residual)
        g = residual.abs().mean(dim=1)
        paths.append((g, B, ones.clone()))
        residual = residual - path_matrix(g, B, ones)
    return paths


def residual_svid(w: torch.Tensor, num_paths: int, iters: int = 30) -> list[BinaryPath]:
    """Greedy residual SVID: path i fits what paths 1..i-1 leave of w."""
    _check_matrix(w)
    residual = w.to(torch.float32)
    paths = []
    for _ in range(num_paths):
        p = svid(residual, iters)
        paths.append(p)
        residual = residual - path_matrix(*p)
    return paths


def iterative_residual_svid(
    w: torch.Tensor, num_paths: int, rounds: int = 4, iters: int = 30, return_errors: bool = False
):
    """Iterative residual SVID: greedy init, then `rounds` Gauss-Seidel sweeps refitting each path to
    w minus all the other paths.

    Each refit is the optimal single path for its target, so the error cannot increase; a refit that comes
    out worse because of the power iteration's finite convergence is rejected, which makes the error
    sequence non-increasing exactly. With return_errors, also returns the Frobenius error after greedy init
    and after each round.
    """
    w = w.to(torch.float32)
    paths = residual_svid(w, num_paths, iters)
    mats = [path_matrix(*p) for p in paths]
    approx = torch.stack(mats).sum(0) if num_paths > 1 else mats[0].clone()
    errors = [torch.linalg.matrix_norm(w - approx).item()]
    for _ in range(rounds):
        for i in range(num_paths):
            target = w - (approx - mats[i])
            candidate = svid(target, iters, v0=paths[i][2], check=False)
            cand_mat = path_matrix(*candidate)
            if torch.linalg.matrix_norm(target - cand_mat) <= torch.linalg.matrix_norm(target - mats[i]):
                approx = approx + (cand_mat - mats[i])
                paths[i], mats[i] = candidate, cand_mat
        errors.append(torch.linalg.matrix_norm(w - approx).item())
    return (paths, errors) if return_errors else paths


def decompose(w: torch.Tensor, num_paths: int, init: str = "isvid", rounds: int = 4,
              iters: int = 30) -> list[BinaryPath]:
    """Initialize k paths for w with the named method ("naive", "svid" or "isvid")."""
    if init == "naive":
        return naive_residual_sign(w, num_paths)
    if init == "svid":
        return residual_svid(w, num_paths, iters)
    if init == "isvid":
        return iterative_residual_svid(w, num_paths, rounds, iters)
    raise ValueError(f"unknown init {init!r}; choose one of naive, svid, isvid")


def coupled_signs(latent: torch.Tensor, g: list[torch.Tensor], h: list[torch.Tensor]) -> list[torch.Tensor]:
    """The coupled derivation: B_1 = sign(W), R_1 = W - g_1 B_1 h_1, B_2 = sign(R_1), ...

    Returns the sign planes only (no gradient flows through a sign).
    """
    signs = []
    with torch.no_grad():
        residual = latent
        for gi, hi in zip(g, h):
            B = binarize(residual)
            signs.append(B)
            residual = residual - path_matrix(gi, B, hi)
    return signs


def _check_matrix(w: torch.Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
